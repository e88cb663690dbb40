"""Packed-integer CPU kernels (``kernels.py``) and the ``int4``/``int8``/``auto`` forward modes of
``FPxINTLinear``: every fast path matches the reference path."""

import copy
import itertools

import pytest
import torch

from fpxint_hf import backends, kernels
from fpxint_hf.expansion import expand, reconstruct, snr_db
from fpxint_hf.linear import FORWARD_MODES, FPxINTLinear
from fpxint_hf.model_ops import set_active_terms, set_forward_mode

needs_int4 = pytest.mark.skipif(
    bool(kernels._ops_missing(kernels._INT4_OPS)), reason=f"torch {torch.__version__} lacks the CPU int4 ops"
)
needs_int8 = pytest.mark.skipif(
    bool(kernels._ops_missing(kernels._INT8_OPS)),
    reason=f"torch {torch.__version__} lacks _weight_int8pack_mm",
)


def make(in_features=256, out_features=81, terms=3, group_size=64, frac=0.0, symmetric=False, bits=4, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features)
    kw = dict(bits=bits, terms=terms, group_size=group_size, symmetric=symmetric, outlier_fraction=frac)
    kw |= dict(series="legacy", fit="minmax")  # the rule these kernel tests were written for
    return lin, expand(lin.weight, **kw), FPxINTLinear.from_linear(lin, **kw)


def run(m, x, mode, k=None):
    m.forward_mode, m.active_terms = mode, k
    return m(x)


def kind(m):
    """Which kernel the module's cache holds: "int4", "int8" or "dense"."""
    prepared = m._kernel_cache[2]
    return {kernels.Int4Weights: "int4", kernels.Int8Weights: "int8", kernels.DenseWeights: "dense"}[
        type(prepared)
    ]


LAYOUTS = [  # (in_features, group_size, symmetric, outlier fraction); out_features = 81 (odd)
    (256, 32, False, 0.0),
    (256, 64, True, 0.02),
    (256, 128, False, 0.02),
    (256, None, False, 0.0),
    (256, None, True, 0.02),
    (192, 64, False, 0.02),
    (192, None, True, 0.0),  # per-channel 192: one scale repeated over 3 kernel groups of 64
    (576, 64, True, 0.0),
]


@needs_int4
@pytest.mark.parametrize(("in_features", "group_size", "symmetric", "frac"), LAYOUTS)
def test_int4_matches_reference_fp32(in_features, group_size, symmetric, frac):
    _, _, m = make(in_features, 81, 3, group_size, frac, symmetric)
    x = torch.randn(2, 3, in_features)
    for k in (1, 2, 3):
        ref = run(m, x, "reference", k)
        fast = run(m, x, "int4", k)
        assert fast.shape == ref.shape == (2, 3, 81) and fast.dtype == torch.float32
        assert snr_db(fast, ref) >= 60, (k, snr_db(fast, ref))
        assert kind(m) == "int4" and m._kernel_cache[0][1] == k


@needs_int4
@pytest.mark.parametrize("bits", [2, 3])
def test_int4_kernel_runs_2_and_3_bit_codes(bits):
    _, _, m = make(bits=bits, frac=0.02, group_size=32)
    x = torch.randn(5, 256)
    for k in (1, 2, 3):
        assert snr_db(run(m, x, "int4", k), run(m, x, "reference", k)) >= 60


@needs_int8
@pytest.mark.parametrize(("symmetric", "frac"), [(False, 0.0), (True, 0.0), (False, 0.02), (True, 0.02)])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_collapsed_int8_matches_reference_fp32(symmetric, frac, bits):
    _, _, m = make(256, 81, 3, None, frac, symmetric, bits)
    x = torch.randn(4, 256)
    ks = [k for k in (1, 2, 3) if kernels.int8_supported(bits, 256, 256, k, "legacy")]
    assert ks == ([1, 2, 3] if bits == 2 else [1, 2])
    for k in ks:
        fast = run(m, x, "int8", k)
        assert snr_db(fast, run(m, x, "reference", k)) >= 60, k
        assert kind(m) == "int8"


@needs_int8
def test_collapsed_int8_single_8bit_term():
    _, _, m = make(terms=2, group_size=None, bits=8, frac=0.02)
    x = torch.randn(3, 256)
    assert snr_db(run(m, x, "int8", 1), run(m, x, "reference", 1)) >= 60
    with pytest.raises(ValueError, match="wider than int8"):
        run(m, x, "int8", 2)


def test_collapsed_range_is_the_exact_extreme_of_the_codes():
    for widths in [(4, 4), (2, 2, 2, 2), (4, 2, 2), (3, 3), (4, 2)]:  # nested: every code of every term
        mult = kernels.collapse_multipliers(widths, len(widths), "nested")
        ranges = [range(-(2 ** (b - 1)), 2 ** (b - 1)) for b in widths]
        values = [sum(m * c for m, c in zip(mult, cs, strict=True)) for cs in itertools.product(*ranges)]
        assert kernels.collapsed_range(widths, len(widths), "nested") == (min(values), max(values))
        assert len(set(values)) == 2 ** sum(widths)  # one integer per level: the nested grid is uniform
        shift = kernels.collapse_shift(widths, len(widths), "nested")
        fits = max(values) - min(values) <= 255
        assert (shift is not None) == fits
        if fits:
            assert -128 <= min(values) + shift and max(values) + shift <= 127
    for bits, k in [(2, 1), (2, 3), (3, 2), (4, 1), (4, 2)]:
        h, r = 2 ** (bits - 1), 2**bits - 2
        ranges = [range(-h, h)] + [range(-(h - 1), h)] * (k - 1)
        values = [sum(c * r ** (k - 1 - i) for i, c in enumerate(cs)) for cs in itertools.product(*ranges)]
        assert kernels.collapsed_range(bits, k, "legacy") == (min(values), max(values))


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_as_good_as_the_reference(mode, dtype):
    if kernels._ops_missing(kernels._INT4_OPS if mode == "int4" else kernels._INT8_OPS):
        pytest.skip(f"torch {torch.__version__} lacks the {mode} ops")
    lin, _, m = make(frac=0.02, group_size=None if mode == "int8" else 64)
    x = torch.randn(16, 256)
    for k in (1, 2):
        exact = run(m, x, "reference", k)  # fp32 series
        ref = run(m, x.to(dtype), "reference", k)
        fast = run(m, x.to(dtype), mode, k)
        assert fast.dtype == dtype
        assert snr_db(fast, exact) >= min(40.0, snr_db(ref, exact) - 3), (
            k,
            snr_db(fast, exact),
            snr_db(ref, exact),
        )
        assert snr_db(fast, lin(x)) >= snr_db(ref, lin(x)) - 1.0


@needs_int4
@needs_int8
def test_auto_picks_a_kernel_where_one_applies_and_falls_back_otherwise():
    x = torch.randn(3, 256)
    xb = x.bfloat16()
    _, _, per_channel = make(group_size=None)
    _, _, grouped = make(group_size=64)
    _, _, small_groups = make(group_size=16)
    _, _, eight_bit = make(group_size=None, bits=8)
    cases = [
        (per_channel, 2, xb, "int8"),  # one int8 matmul for both terms
        (per_channel, 1, xb, "int8"),
        (per_channel, 3, xb, "int4"),  # 14²·8 does not fit int8
        (grouped, 2, xb, "int4"),
        (grouped, 3, xb, "int4"),
        (eight_bit, 1, xb, "int8"),
        (eight_bit, 2, xb, "dense"),
        (small_groups, 2, xb, "dense"),  # no kernel group size divides 16
        (grouped, 2, x, "dense"),  # float32 / float16 kernels are unvectorized on CPU: dequantize once
        (per_channel, 2, x.half(), "dense"),
        (grouped, 2, x.double(), "dense"),
    ]
    for m, k, xi, expected in cases:
        out = run(m, xi, "auto", k)
        assert kind(m) == expected, (m.extra_repr(), k, xi.dtype)
        assert out.dtype == xi.dtype
        assert snr_db(out, run(m, xi, "reference", k)) >= (35 if xi.dtype == torch.bfloat16 else 60)
        query = backends.LayerQuery(m.term_bits[:k], k, m.group_size, 256, m.series, "cpu", xi.dtype)
        m.forward_mode = "auto"
        assert expected == backends.choose_path("auto", query).name == m.forward_path(xi.dtype).name
    cuda = backends.LayerQuery((4, 4), 2, 64, 256, "legacy", "cuda", xb.dtype)
    path = backends.choose_path("auto", cuda)
    assert path.name == "dense" and [n for n, _ in path.refused] == ["int8", "int4"]
    assert all("not the CPU" in why for n, why in path.refused if n == "int4"), path
    xg = xb.clone().requires_grad_()  # the kernels have no backward: auto differentiates through dense
    out = run(grouped, xg, "auto", 2)
    out.float().sum().backward()
    assert torch.equal(out, run(grouped, xb, "reference", 2)) and xg.grad.shape == xg.shape


def test_unsupported_explicit_mode_raises_with_the_reason():
    x = torch.randn(2, 256)
    _, _, small_groups = make(group_size=16)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        run(small_groups, x, "int4")
    _, _, grouped = make(group_size=64)
    with pytest.raises(ValueError, match="not per-channel"):
        run(grouped, x, "int8")
    assert "CUDA" in kernels.int4_supported(4, 64, "cuda", torch.float16).reason
    assert not kernels.int8_supported(4, 256, 256, 2, "legacy", "cuda", torch.bfloat16)
    assert kernels.int4_supported(4, 64) and kernels.int4_supported(4, 64).reason == ""
    assert set(FORWARD_MODES) == {"reference", "terms", "dense", "int4", "int8", "auto"}


@needs_int4
def test_cache_is_rebuilt_after_load_expansion_state_dict_and_dtype_change():
    _, _, m = make(group_size=64, frac=0.02)
    _, e2, m2 = make(group_size=64, frac=0.02, seed=1)
    x = torch.randn(4, 256)
    set_forward_mode(m, "int4")
    first = m(x)
    prepared = m._kernel_cache[2]
    assert torch.equal(m(x), first) and m._kernel_cache[2] is prepared  # cached
    m.load_expansion(e2)
    assert m._kernel_cache is None
    assert snr_db(m(x), run(m2, x, "reference") - m2.bias + m.bias) >= 60
    _, _, m3 = make(group_size=64, frac=0.02, seed=2)
    m.load_state_dict(m3.state_dict())
    assert snr_db(run(m, x, "int4"), run(m3, x, "reference")) >= 60
    m.scale = m3.scale.clone() * 2  # buffer replaced without load_expansion: identity check rebuilds
    assert not torch.allclose(run(m, x, "int4"), run(m3, x, "int4"))
    m.load_state_dict(m3.state_dict())
    m.bfloat16()
    assert m._kernel_cache is None
    out = run(m, x.bfloat16(), "int4")
    assert m._kernel_cache[0][2] == torch.bfloat16 and out.dtype == torch.bfloat16
    assert snr_db(out, run(m3, x, "reference")) >= 35
    set_active_terms(m, 1)
    run(m, x.bfloat16(), "int4", 1)
    assert m._kernel_cache[0][1] == 1 and m._kernel_cache[2].terms == 1


@needs_int4
@needs_int8
def test_fast_modes_leave_state_dict_unchanged():
    _, _, m = make(group_size=None, frac=0.02)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 256)
    for mode in ("int4", "int8", "auto"):
        run(m, x, mode, 2)
        run(m, x.bfloat16(), mode, 2)
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert m._kernel_cache is not None and "_kernel_cache" not in dict(m.named_buffers())
    clone = copy.deepcopy(m)  # the cache (it may hold sparse CSR tensors) is dropped, then rebuilt
    assert clone._kernel_cache is None and m._kernel_cache is not None
    assert torch.equal(run(clone, x.bfloat16(), "int4", 2), run(m, x.bfloat16(), "int4", 2))


@needs_int4
def test_kernel_functions_without_a_module():
    lin, e, _ = make(group_size=128, frac=0.02, terms=2)
    x = torch.randn(6, 256)
    w = backends.prepare("int4", e, 2, torch.float32)
    assert snr_db(backends.kernel_linear(x, w), x @ reconstruct(e).t()) >= 60
    assert snr_db(backends.kernel_linear(x, w), lin(x) - lin.bias) >= 30


@needs_int4
@needs_int8
@pytest.mark.parametrize("mode", ["int4", "int8", "terms"])
def test_non_contiguous_3d_inputs(mode):
    _, _, m = make(group_size=None, frac=0.02)
    x = torch.randn(2, 256, 3).transpose(1, 2)  # [2, 3, 256], not contiguous
    out = run(m, x.bfloat16(), mode, 2)
    assert out.shape == (2, 3, 81)
    assert snr_db(out, run(m, x.contiguous(), "reference", 2)) >= 40


@needs_int4
@pytest.mark.parametrize("mode", ["int4", "int8", "dense"])
def test_every_kernel_mode_backpropagates_to_the_input(mode):
    """The packed kernels run inside an autograd.Function whose backward uses the dequantized weight."""
    _, _, m = make(group_size=None)
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    out = run(m, x, mode, 2)
    out.float().square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    run(m, x_ref, "reference", 2).float().square().sum().backward()
    assert snr_db(x.grad, x_ref.grad) > 30


@needs_int4
def test_every_backend_object_supports_prepares_and_runs():
    """The backends are objects with one contract (``supports`` / ``prepare`` / ``forward``), checked here directly."""
    _, e, _ = make(group_size=None, terms=2)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    ref = x.float() @ reconstruct(e, 2).t()
    layer = backends.LayerQuery((4, 4), 2, 256, 256, e.series, "cpu", torch.bfloat16)
    assert set(backends.BACKENDS) == {"int4", "int8", "dense"}
    for name, b in backends.BACKENDS.items():
        ok, why = b.can_implement(layer)
        assert b.name == name and ok and why == "", name
        out = b.forward(x, b.prepare(e, 2, torch.bfloat16, "cpu"))
        assert snr_db(out, ref) > 35, name
    with pytest.raises(ValueError, match="kernel mode='fast'"):
        backends.backend("fast")
