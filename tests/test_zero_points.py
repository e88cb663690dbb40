"""``zero_bits=X_1``: an integer zero point in steps of the first term's scale (``fpxint_hf/bias.py``, Eq. Zi).

The zero point and its float16 bias invert each other exactly, the constrained fit is never worse than GPTQ's
round-to-nearest on the same grid (per group), a longer series still converges, the layer stores int8 zero points,
save/reload is bit-identical and the settings refuse a zero width that is not the first term's."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fpxint_hf
from fpxint_hf.bias import rtn_zero_point, zero_point, zero_point_value
from fpxint_hf.expansion import expand, reconstruct
from fpxint_hf.fit import Grid, grid_error, snr_db
from fpxint_hf.linear import FPxINTLinear
from fpxint_hf.settings import ExpansionSettings


def weight(out: int = 64, n_in: int = 256, seed: int = 0, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.02
    if heavy:  # a few large values per row, and a group far from 0
        w = w + (torch.rand(out, n_in, generator=g) < 0.01) * torch.randn(out, n_in, generator=g) * 0.2
        w[:3, :64] += 0.5
    return w


def first_term_errors(w: torch.Tensor, scale16: torch.Tensor, zero16: torch.Tensor, bits: int, gs: int):
    half = 2 ** (bits - 1)
    wg = w.reshape(w.shape[0], -1, gs)
    return grid_error(wg, Grid(scale16.float(), zero16.float(), -half, half - 1))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_point_and_bias_invert_each_other_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    scale = (10 ** (torch.rand(40, 6, generator=g) * 8 - 6)).half().clamp(min=2**-24)
    z = torch.randint(0, 2**bits, (40, 6), generator=g).to(torch.int8)
    bias = zero_point_value(z, scale, bits)
    assert torch.equal(zero_point(bias, scale, bits), z)
    assert torch.equal(zero_point_value(zero_point(bias, scale, bits), scale, bits), bias)


@pytest.mark.parametrize("heavy", [False, True], ids=["gauss", "heavy"])
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_one_term_is_never_worse_than_rtn_on_the_same_grid(bits, gs, heavy):
    w = weight(96, 512, seed=bits + gs, heavy=heavy)
    e = expand(w, bits=bits, terms=1, group_size=gs, zero_bits=bits)
    rtn_scale, rtn_bias = rtn_zero_point(w.reshape(96, -1, gs), bits)
    ours = first_term_errors(w, e.scale, e.zero, bits, gs)
    rtn = first_term_errors(w, rtn_scale, rtn_bias, bits, gs)
    assert bool((ours <= rtn).all())  # per group
    assert ours.sum() < 0.95 * rtn.sum()
    # the stored bias is a whole number of steps: (2^(X-1) - z)·scale with z in [0, 2^X - 1]
    z = zero_point(e.zero, e.scale, bits)
    assert int(z.min()) >= 0 and int(z.max()) <= 2**bits - 1
    assert torch.equal(zero_point_value(z, e.scale, bits), e.zero)
    # and the codes of the series are those of that grid: reconstruct = (q - z)·scale
    q = e.codes[0].reshape(96, -1, gs).float()
    exact = ((q - z.float().unsqueeze(-1)) * e.scale.float().unsqueeze(-1)).reshape(w.shape)
    assert snr_db(reconstruct(e), exact) > 60  # the float16 rounding of the bias only
    # fit="minmax" is GPTQ's RTN itself
    r = expand(w, bits=bits, terms=1, group_size=gs, zero_bits=bits, fit="minmax")
    assert torch.equal(r.scale, rtn_scale) and torch.equal(r.zero, rtn_bias)


@pytest.mark.parametrize("bits", [4, (4, 4), (4, 2), (3, 2, 2)])
def test_a_longer_series_still_converges_and_stays_close_to_float_zeros(bits):
    w = weight(64, 256, heavy=True)
    terms = len(bits) if isinstance(bits, tuple) else 1
    b1 = bits[0] if isinstance(bits, tuple) else bits
    ez, e16 = (
        expand(w, bits=bits, terms=terms, group_size=64, zero_bits=b1),
        expand(w, bits=bits, terms=terms, group_size=64),
    )
    assert all(b <= a for a, b in zip(ez.errors, ez.errors[1:], strict=False)), ez.errors
    assert ez.errors[-1] <= 1.25 * e16.errors[-1], (ez.errors, e16.errors)
    z = zero_point(ez.zero, ez.scale, b1)
    assert torch.equal(zero_point_value(z, ez.scale, b1), ez.zero)


def test_layer_stores_int8_zero_points_and_every_path_agrees():
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    m = FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64, zero_bits=4)
    m16 = FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64)
    assert m.zero.dtype == torch.int8 and int(m.zero.min()) >= 0 and int(m.zero.max()) <= 15
    assert m16.bits_per_weight() - m.bits_per_weight() == pytest.approx(8 / 64)
    assert "zero_bits=4" in repr(m)
    x = torch.randn(2, 5, 256)
    expected = x @ m.dequantize().T + m.bias
    for mode in ("reference", "terms", "dense", "int4"):
        m.forward_mode = mode
        assert snr_db(m(x), expected) >= 100, mode


def test_save_reload_is_bit_identical(make_fp_dir, load_quantized, load_fp, logits_of, tmp_path):
    fp_dir = make_fp_dir("llama")
    q = load_quantized(fp_dir, dtype=torch.float32, bits=4, terms=1, group_size=32, zero_bits=4)
    assert snr_db(logits_of(q), logits_of(load_fp(fp_dir))) >= 10
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["zero_bits"] == 4
    again = load_fp(tmp_path / "q")
    assert torch.equal(logits_of(again), logits_of(q))
    layer = again.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.zero.dtype == torch.int8 and layer.zero_bits == 4
    before = q.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.equal(layer.zero, before.zero) and torch.equal(layer.codes, before.codes)


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"bits": 3, "zero_bits": 4}, r"16, 8 or the first term's width 3"),
        ({"bits": [4, 2], "terms": 2, "zero_bits": 2}, r"16, 8 or the first term's width 4"),
        ({"zero_bits": 4, "series": "legacy", "fit": "minmax"}, r"16 with series='legacy'"),
    ],
)
def test_a_zero_width_other_than_the_first_terms_is_refused(kwargs, allowed):
    with pytest.raises(ValueError, match=rf"ExpansionSettings\.zero_bits=.* is invalid; allowed: {allowed}"):
        ExpansionSettings(**kwargs)
    with pytest.raises(ValueError, match=rf"FPxINTConfig\.zero_bits=.* is invalid; allowed: {allowed}"):
        fpxint_hf.FPxINTConfig(**kwargs)
    terms = kwargs.get("terms", 1)
    with pytest.raises(ValueError, match="zero_bits"):
        expand(
            weight(),
            bits=kwargs["bits"] if "bits" in kwargs else 4,
            terms=terms,
            group_size=64,
            zero_bits=kwargs["zero_bits"],
            series=kwargs.get("series", "nested"),
        )


def test_cli_flag_and_vllm_reader_take_it():
    from fpxint_hf.cli import _config_from_args, build_parser
    from fpxint_hf.settings import check_quantization_config, read_quantization_config

    args = ["quantize", "m", "out", "--bits", "4", "--terms", "1", "--zero-bits", "4"]
    assert _config_from_args(build_parser().parse_args(args)).zero_bits == 4
    fields = read_quantization_config({"version": 2, "bits": 4, "terms": 1, "zero_bits": 4})
    check_quantization_config("quantization_config", fields)  # the vLLM plugin's reader and check
    assert fields["zero_bits"] == 4
    with pytest.raises(ValueError, match="quantization_config.zero_bits=2"):
        check_quantization_config("quantization_config", {**fields, "zero_bits": 2})
