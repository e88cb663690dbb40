"""FPxINTLinear: both forward paths compute the expansion; buffers keep their dtypes."""

import pytest
import torch

from fpxint_hf.expansion import expand, outlier_budget, reconstruct, snr_db
from fpxint_hf.linear import FPxINTLinear
from fpxint_hf.model_ops import set_active_terms, set_forward_mode


def make(
    in_features=192, out_features=80, terms=3, group_size=64, frac=0.01, symmetric=False, bits=4, bias=True
):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    kw = dict(bits=bits, terms=terms, group_size=group_size, symmetric=symmetric, outlier_fraction=frac)
    kw |= dict(series="legacy", fit="minmax")  # the rule these layer tests were written for
    return lin, expand(lin.weight, **kw), FPxINTLinear.from_linear(lin, **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "symmetric,frac,group_size", [(False, 0.01, 64), (True, 0.0, None), (False, 0.0, 32)]
)
def test_reference_and_term_parallel_agree(bits, symmetric, frac, group_size):
    _, e, m = make(bits=bits, symmetric=symmetric, frac=frac, group_size=group_size)
    x = torch.randn(3, 5, 192)
    for k in (1, 2, 3):
        m.active_terms = k
        m.forward_mode = "reference"
        ref = m(x)
        m.forward_mode = "terms"
        par = m(x)
        assert snr_db(par, ref) > 100, k


def test_forward_equals_dense_matmul_of_reconstruction():
    lin, e, m = make()
    x = torch.randn(7, 192)
    expected = x @ reconstruct(e).t() + lin.bias
    assert torch.allclose(m(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(m.dequantize(), reconstruct(e))


def test_expansion_round_trip_through_buffers():
    _, e, m = make()
    back = m.expansion()
    assert (
        torch.equal(back.codes, e.codes)
        and torch.equal(back.scale, e.scale)
        and torch.equal(back.zero, e.zero)
    )
    assert torch.equal(back.outlier_idx.long(), e.outlier_idx.long()) and torch.equal(
        back.outlier_val, e.outlier_val
    )


def test_truncation_knob():
    lin, e, m = make()
    x = torch.randn(4, 192)
    errs = []
    for k in (1, 2, 3):
        set_active_terms(m, k)
        assert m.num_terms() == k
        errs.append(snr_db(m(x), lin(x)))
    assert errs[0] < errs[1] < errs[2]
    set_active_terms(m, None)
    assert m.num_terms() == 3
    with pytest.raises(ValueError, match="k=0"):
        set_active_terms(m, 0)
    with pytest.raises(ValueError, match="mode='fast'"):
        set_forward_mode(m, "fast")


def test_bf16_activations_term_path_is_not_worse():
    lin, _, m = make(frac=0.0)
    x = torch.randn(16, 192)
    ref = lin(x)
    m.bfloat16()
    xb = x.bfloat16()
    m.forward_mode = "reference"
    a = m(xb)
    m.forward_mode = "terms"
    b = m(xb)
    assert a.dtype == b.dtype == torch.bfloat16
    assert snr_db(b, ref) >= snr_db(a, ref) - 1.0


def test_dtype_casts_keep_float16_buffers():
    _, _, m = make()
    before = {k: v.clone() for k, v in m.state_dict().items() if k != "bias"}
    m.bfloat16().float().half()
    after = m.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert after["bias"].dtype == torch.float16


def test_bits_per_weight_and_repr():
    _, _, m = make(in_features=192, out_features=80, terms=3, group_size=64, frac=0.01, bits=4)
    k = outlier_budget(192, 0.01)
    expected = (3 * 80 * 96 + 2 * 80 * 3 * 2 + k * 80 * (2 + 2) + 4) * 8 / (192 * 80)
    assert m.bits_per_weight() == pytest.approx(expected)
    r = repr(m)
    for word in ("bits=4", "terms=3", "group_size=64", "bits_per_weight="):
        assert word in r


def test_mismatched_expansion_rejected():
    _, e, _ = make(terms=3)
    other = FPxINTLinear(192, 80, bits=4, terms=2, group_size=64, outlier_budget=2, series="legacy")
    with pytest.raises(ValueError, match="does not match"):
        other.load_expansion(e)
