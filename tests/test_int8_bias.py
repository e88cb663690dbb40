"""``zero_bits=8``: each group's bias stored as an int8 code (``fpxint_hf/bias.py``, Eq. Z).

The code and its float16 value invert each other exactly, the series error never rises with more terms and
stays within a hair of the float16 bias, every forward path agrees, save/reload is bit-identical, the bits
per weight drop by 8 per group, and bad settings are refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fpxint_hf
from fpxint_hf.bias import CODE_MAX, MIN_UNIT, bias_code, bias_value, int8_bias, unit_ratio
from fpxint_hf.expansion import expand, reconstruct
from fpxint_hf.fit import relative_error, snr_db
from fpxint_hf.linear import FPxINTLinear
from fpxint_hf.settings import ExpansionSettings, read_quantization_config


def weight(out: int = 64, n_in: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g) * 0.02


@pytest.mark.parametrize("bits1", [2, 3, 4, 8])
def test_code_and_value_invert_each_other_exactly(bits1):
    g = torch.Generator().manual_seed(bits1)
    # scales from 1e-8 (below the floor) to 10; biases up to +-300 steps (beyond +-127 units: scale raised)
    scale = (10 ** (torch.rand(40, 6, generator=g) * 9 - 8)).half().clamp(min=2**-24)
    zero = (scale.float() * (torch.rand(40, 6, generator=g) - 0.5) * 600).half()
    s8, z8 = int8_bias(scale, zero, bits1)
    code = bias_code(z8, s8, bits1)
    assert code.dtype == torch.int8 and torch.equal(bias_value(code, s8, bits1), z8)
    u = s8.float() * unit_ratio(bits1)
    assert bool((u >= MIN_UNIT).all()) and bool((s8 >= scale).all())
    kept = s8 == scale  # where the scale was not raised, the bias moved by at most half a unit
    moved = (z8.float() - zero.float()).abs()
    assert bool((moved[kept] <= 0.5 * u[kept] * (1 + 1e-3) + zero.float().abs()[kept] * 2**-11).all())
    assert bool((code.float().abs() <= CODE_MAX).all())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, (3, 2, 2), (4, 2, 2)])
def test_series_error_never_rises_as_terms_are_added(bits, symmetric):
    w = weight()
    terms = 3 if isinstance(bits, tuple) else 4
    e = expand(w, bits=bits, terms=terms, group_size=64, symmetric=symmetric, zero_bits=8)
    assert e.zero_bits == (16 if symmetric else 8)
    assert all(b <= a for a, b in zip(e.errors, e.errors[1:], strict=False)), e.errors
    errs = [relative_error(reconstruct(e, k), w) for k in range(1, terms + 1)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:], strict=False)), errs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_one_term_costs_at_most_a_percent_of_error_against_a_float16_bias(bits):
    w = weight(256, 512, seed=bits)
    e16, e8 = (
        expand(w, bits=bits, terms=1, group_size=64),
        expand(w, bits=bits, terms=1, group_size=64, zero_bits=8),
    )
    assert e8.errors[0] <= 1.01 * e16.errors[0], (e8.errors, e16.errors)
    assert torch.equal(bias_value(bias_code(e8.zero, e8.scale, bits), e8.scale, bits), e8.zero)


def test_a_group_far_from_zero_is_still_represented():
    """All weights of a group near 1.0: the bias needs more than 127 units, so scale_1 grows until it fits; the
    series still converges on the group."""
    w = weight(8, 128)
    w[:, :64] += 1.0
    e = expand(w, bits=4, terms=3, group_size=64, zero_bits=8)
    assert relative_error(reconstruct(e), w) < 1e-3
    assert bool((bias_code(e.zero, e.scale, 4).abs() <= CODE_MAX).all())


def test_layer_stores_an_int8_code_and_saves_eight_bits_per_group():
    lin = nn.Linear(256, 48)
    m16 = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64)
    m8 = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64, zero_bits=8)
    assert m8.zero.dtype == torch.int8 and m8.zero.shape == m16.zero.shape
    assert m16.bits_per_weight() - m8.bits_per_weight() == pytest.approx(8 / 64)
    assert "zero_bits=8" in repr(m8) and "zero_bits" not in repr(m16)
    assert torch.equal(m8.expansion().zero, bias_value(m8.zero, m8.scale, 4))
    m8.half()  # dtype casts keep the int8 codes (and the float16 scales) as they are
    assert m8.zero.dtype == torch.int8
    sym = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64, symmetric=True, zero_bits=8)
    assert "zero" not in dict(sym.named_buffers()) and sym.zero_bits == 16
    with pytest.raises(ValueError, match="zero_bits=8"):
        m16.expansion_state(m8.expansion())  # an int8-bias series cannot load into a float16-bias layer


def test_every_forward_path_computes_the_same_layer():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    m = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64, zero_bits=8)
    x = torch.randn(2, 5, 256)
    expected = x @ m.dequantize().T + m.bias
    assert snr_db(m.dequantize(), lin.weight) >= 40
    for mode in ("reference", "terms", "dense", "int4"):
        m.forward_mode = mode
        assert snr_db(m(x), expected) >= 100, mode
    m.forward_mode = "int4"
    assert snr_db(m(x.bfloat16()).float(), expected) >= 30
    a8 = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64, zero_bits=8, act_bits=8, act_terms=3)
    assert snr_db(a8(x), expected) >= 60  # three 8-bit activation terms on the same weights


def test_save_reload_is_bit_identical_and_old_configs_mean_float16(
    make_fp_dir, load_quantized, load_fp, logits_of, tmp_path
):
    fp_dir = make_fp_dir("qwen2")
    q = load_quantized(
        fp_dir, dtype=torch.float32, bits=3, terms=1, group_size=32, zero_bits=8, dual_scale=True
    )
    assert snr_db(logits_of(q), logits_of(load_fp(fp_dir))) >= 10
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["zero_bits"] == 8
    again = load_fp(tmp_path / "q")
    assert torch.equal(logits_of(again), logits_of(q))
    layer = again.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.zero.dtype == torch.int8 and layer.zero_bits == 8
    for version in (1, 2):  # a config.json without the key: the float16 bias of every older checkpoint
        assert read_quantization_config({"version": version})["zero_bits"] == 16


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"zero_bits": 5}, r"one of \(16, 8, 4, 3, 2\)"),
        ({"zero_bits": 8.0}, r"one of \(16, 8, 4, 3, 2\)"),
        ({"zero_bits": 3}, r"16, 8 or the first term's width 4"),
        (
            {"zero_bits": 8, "series": "legacy", "fit": "minmax"},
            r"16 with series='legacy' \(an int8 bias needs series='nested'\)",
        ),
    ],
)
def test_settings_errors_name_the_field(kwargs, allowed):
    with pytest.raises(ValueError, match=rf"ExpansionSettings\.zero_bits=.* is invalid; allowed: {allowed}"):
        ExpansionSettings(**kwargs)
    with pytest.raises(ValueError, match=rf"FPxINTConfig\.zero_bits=.* is invalid; allowed: {allowed}"):
        fpxint_hf.FPxINTConfig(**kwargs)
    with pytest.raises(ValueError, match="zero_bits"):
        expand(weight(), bits=4, terms=1, group_size=64, **{k: v for k, v in kwargs.items() if k != "fit"})


def test_cli_flag_sets_the_option():
    from fpxint_hf.cli import _config_from_args, build_parser

    cfg = _config_from_args(build_parser().parse_args(["quantize", "m", "out", "--zero-bits", "8"]))
    assert cfg.zero_bits == 8
    assert (
        _config_from_args(build_parser().parse_args(["quantize", "m", "out"])).zero_bits == 8
    )  # the recipe's
    assert (
        _config_from_args(build_parser().parse_args(["quantize", "m", "out", "--terms", "2"])).zero_bits == 16
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "out", "--zero-bits", "5"])
