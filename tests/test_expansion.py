"""The series of Eq. 1 converges, never gets worse with more terms, and inverts exactly."""

import functools
import math

import pytest
import torch

from fpxint_hf.expansion import (
    expand as expand_any,
)
from fpxint_hf.expansion import (
    outlier_budget,
    reconstruct,
    relative_error,
    residual_ratio,
    resolve_group_size,
    rtn,
    snr_db,
)

# these tests were written for the legacy rule (fpxint_hf 0.1); the nested series has tests/test_nested_series.py
expand = functools.partial(expand_any, series="legacy", fit="minmax")


@pytest.fixture(scope="module")
def w():
    """A heavy-tailed (Student-t, 3 dof) matrix at LLM weight scale."""
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02


@pytest.mark.parametrize(
    "clip,frac", [("minmax", 0.0), ("laplace", 0.0), ("laplace", 0.01), ("search", 0.01)]
)
def test_error_falls_8x_per_4bit_term(w, clip, frac):
    e = expand(w, bits=4, terms=4, group_size=128, clip=clip, outlier_fraction=frac)
    errs = [relative_error(reconstruct(e, k), w) for k in range(1, 5)]
    for before, after in zip(errs, errs[1:], strict=False):
        assert after <= before / 8, errs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_never_rises(w, bits, group_size, symmetric):
    e = expand(w, bits=bits, terms=3, group_size=group_size, symmetric=symmetric)
    errs = [relative_error(reconstruct(e, k), w) for k in range(1, 4)]
    assert errs[0] >= errs[1] >= errs[2]
    # the residual grid is (2^X - 2)x finer per term, so the error must fall at least ~that much
    assert errs[2] <= errs[1] / (residual_ratio(bits, "legacy") * 0.7) or errs[2] < 1e-6


def test_two_4bit_terms_within_1p5x_of_8bit_rtn(w):
    two_terms = relative_error(reconstruct(expand(w, bits=4, terms=2, group_size=128)), w)
    rtn8 = relative_error(rtn(w, 8, 128), w)
    assert two_terms <= 1.5 * rtn8, (two_terms, rtn8)


def test_one_term_matches_rtn_at_same_grid(w):
    # with no saturation the first term is min-max RTN up to the float16 rounding of scale and bias
    one = relative_error(reconstruct(expand(w, bits=4, terms=1, group_size=128, clip="minmax")), w)
    ref = relative_error(rtn(w, 4, 128), w)
    assert one <= 1.05 * ref


def test_residual_is_bounded_by_half_a_step(w):
    e = expand(w, bits=4, terms=3, group_size=64)
    for k in range(1, 4):
        step = e.scale.float() / residual_ratio(4, "legacy") ** (k - 1)
        r = (w - reconstruct(e, k)).reshape(w.shape[0], -1, 64).abs().amax(-1)
        assert (r <= step * 0.5 * (1 + 1e-3) + 1e-7).all()


def test_outliers_are_kept_exactly_and_help(w):
    plain = expand(w, bits=4, terms=1, group_size=None, clip="minmax")
    sat = expand(w, bits=4, terms=1, group_size=None, clip="laplace", outlier_fraction=0.01)
    k = outlier_budget(w.shape[1], 0.01)
    assert sat.outlier_idx.shape == (w.shape[0], k) and sat.outlier_val.dtype == torch.float16
    assert (sat.outlier_val != 0).any()
    assert relative_error(reconstruct(sat), w) < 0.8 * relative_error(reconstruct(plain), w)


def test_tol_stops_early_and_records_terms(w):
    e = expand(w, bits=8, terms=4, group_size=128, tol=1e-4)
    assert 1 <= e.terms_used < 4
    assert (w - reconstruct(e)).abs().max() < 1e-4
    assert (e.codes[e.terms_used :] == 2 ** (8 - 1)).all()  # unused terms hold the zero code


def test_deterministic(w):
    a, b = (
        expand(w, bits=4, terms=3, group_size=64, outlier_fraction=0.01),
        expand(w, bits=4, terms=3, group_size=64, outlier_fraction=0.01),
    )
    assert (
        torch.equal(a.codes, b.codes)
        and torch.equal(a.scale, b.scale)
        and torch.equal(a.outlier_idx, b.outlier_idx)
    )


def test_codes_in_range(w):
    for bits in (2, 3, 4, 8):
        e = expand(w, bits=bits, terms=3, group_size=32)
        assert e.codes.dtype == torch.uint8 and int(e.codes.max()) < 2**bits


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 5}, "bits=5"),
        ({"clip": "magic"}, "clip='magic'"),
        ({"group_size": 100}, "does not divide"),
    ],
)
def test_bad_arguments(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expand(w, **kwargs)


def test_non_finite_weight_raises(w):
    bad = w.clone()
    bad[3, 7] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        expand(bad)


def test_zero_and_constant_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    e = expand(w, bits=4, terms=2, group_size=32)
    assert torch.isfinite(reconstruct(e)).all()
    assert relative_error(reconstruct(e), w) < 1e-3


def test_resolve_group_size_fallback():
    assert resolve_group_size(576, 128) == 64
    assert resolve_group_size(1536, 128) == 128
    assert resolve_group_size(100, None) == 100
    with pytest.warns(UserWarning, match="per-channel"):
        assert resolve_group_size(97, 64) == 97


def test_snr_is_scale_free(w):
    approx = reconstruct(expand(w, bits=4, terms=2, group_size=64))
    assert snr_db(approx, w) == pytest.approx(snr_db(approx * 1000, w * 1000), abs=1e-3)
