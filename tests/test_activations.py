"""The activation series (issue 16): ``activations.expand_activations`` (Eq. 1 for a token's activations), the
integer × integer products of ``act_kernels`` inside ``FPxINTLinear``, the ``act_*`` settings, save/reload, and the
committed W4A8/W4A4 results (eval/results/act.md re-rendered from its JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fpxint_hf import FPxINTConfig, FPxINTLinear
from fpxint_hf.act_kernels import ActSpec, auto_method, float32_exact, prepare_act, weight_columns
from fpxint_hf.activations import dequantize_activations, expand_activations
from fpxint_hf.cli import _config_from_args, build_parser
from fpxint_hf.fit import snr_db
from fpxint_hf.settings import ExpansionSettings

ROOT = Path(__file__).resolve().parents[1]


def activations(n: int = 40, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed activations with a few outlier channels, like an LLM's (scale-free tests: any scale works)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    x[:, 7] *= 40
    x[:, 100] += 15
    return x * 3.7


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("outliers", [0, 4])
def test_error_never_rises_as_activation_terms_are_added(bits, outliers):
    x = activations()
    s = expand_activations(x, bits, 4, outliers=outliers)
    snr = [snr_db(x, dequantize_activations(s, k)) for k in range(1, s.terms + 1)]
    assert s.terms == 4 and all(b >= a for a, b in zip(snr, snr[1:], strict=False)), snr
    # each term shrinks the residual by ~2^X - 2 (23 dB for 4 bits, 48 dB for 8) until float32 runs out
    floor = 120.0
    for a, b in zip(snr, snr[1:], strict=False):
        if b < floor:
            assert b - a > (15 if bits == 4 else 40), snr
    # elementwise: no entry's error grows with a term (rounding to the nearest level of the residual)
    errs = [(x - dequantize_activations(s, k)).abs() for k in (1, 2)]
    assert bool((errs[1] <= errs[0] + 1e-6 * x.abs().max()).all())


def test_first_term_is_per_token_and_keeps_outliers_exactly():
    x = activations()
    x[3] *= 1000  # one loud token does not coarsen the others (dynamic per-token scales)
    s = expand_activations(x, 8, 1, outliers=2)
    quiet = [i for i in range(x.shape[0]) if i != 3]
    assert snr_db(x[quiet], dequantize_activations(s)[quiet]) > 35
    cols = x.abs().topk(2, dim=-1).indices
    assert torch.equal(s.outlier_idx.sort(-1).values, cols.sort(-1).values)
    assert torch.equal(s.outlier_val, x.gather(1, s.outlier_idx))
    assert s.codes.dtype == torch.int8 and int(s.codes.min()) >= -128 and int(s.codes.max()) <= 127
    assert snr_db(x, dequantize_activations(s)) > snr_db(
        x, dequantize_activations(expand_activations(x, 8, 1))
    )


def test_act_tol_stops_each_token_and_the_series():
    x = activations()
    x[:5] *= 1e-6  # quiet tokens: their residual falls below tol after one term
    full = expand_activations(x, 4, 3)
    s = expand_activations(x, 4, 3, tol=1e-4)
    assert s.terms == 3
    assert bool((s.scale[1:, :5] == 0).all()) and bool((s.codes[1:, :5] == 0).all())
    assert torch.equal(s.scale[:, 5:], full.scale[:, 5:])
    assert expand_activations(x, 4, 3, tol=1e9).terms == 1  # every token stopped: the series ends
    zero = expand_activations(torch.zeros(3, 64), 8, 3)
    assert zero.terms == 1 and torch.equal(dequantize_activations(zero), torch.zeros(3, 64))


def _layer(seed=0, **kw) -> FPxINTLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(256, 48)
    return FPxINTLinear.from_linear(lin, **{"terms": 2, "group_size": 128, **kw})  # a two-term series


@pytest.mark.parametrize(
    "weights",
    [
        {},
        {"terms": 1},
        {"terms": 3},
        {"bits": 8, "terms": 2},
        {"symmetric": True, "series": "legacy", "fit": "minmax"},
        {"outlier_fraction": 0.02},
        {"group_size": None},
        {"bits": [4, 2]},
    ],
    ids=str,
)
@pytest.mark.parametrize("act", [(8, 1, 0), (4, 2, 4), (4, 3, 0)], ids=str)
def test_integer_path_equals_the_reference_path_bit_for_bit(weights, act):
    """``reference`` (float64 on the codes), ``int8`` and ``auto`` (torch._int_mm) and ``dense`` (float32 on the
    codes, exact below 2^24) compute the same exact integer products, then the same float finishing: identical
    outputs.  All equal the float product of the dequantized series to float32 rounding."""
    m = _layer(**weights)
    m.act_bits, m.act_terms, m.act_outliers = act
    x = activations(n=10, seed=1).view(2, 5, 256)
    outs = {}
    for mode in ("reference", "int8", "dense", "auto"):  # float64, int (torch._int_mm), float32, auto (int)
        m.forward_mode = mode
        outs[mode] = m(x)
    assert all(torch.equal(outs["reference"], y) for y in outs.values())
    s = expand_activations(x.reshape(-1, 256), *act[:2], outliers=act[2])
    exact = dequantize_activations(s).double() @ m.dequantize().double().t() + m.bias.double()
    assert snr_db(exact.float(), outs["auto"].reshape(-1, 48)) > 110


@pytest.mark.parametrize(
    ("tokens", "spread"), [(10, False), (300, True)], ids=["few columns", "many columns"]
)
@pytest.mark.parametrize("weights", [{}, {"group_size": None}, {"outlier_fraction": 0.02}], ids=str)
def test_outlier_activations_multiply_the_right_weight_columns(tokens, spread, weights):
    """``W·A_sa`` is one weighted gather of each token's outlier columns of W (read from the codes once per
    distinct column, or from the dense ``W.T`` when W keeps saturated values), whether the columns are few or
    many (over half the inputs): each equals the exact product."""
    m = _layer(**weights)
    m.act_bits, m.act_terms, m.act_outliers = 8, 1, 4
    x = activations(n=tokens, seed=2)
    if spread:  # every token's loudest values in different columns
        x[torch.arange(tokens), torch.arange(tokens) % 256] += 500
    s = expand_activations(x, 8, 1, outliers=4)
    assert (torch.unique(s.outlier_idx).numel() > 128) == spread
    exact = dequantize_activations(s).double() @ m.dequantize().double().t() + m.bias.double()
    assert snr_db(exact.float(), m(x)) > 110


@pytest.mark.parametrize(
    "transform",
    [{"dual_scale": True}, {"rotation": "hadamard"}, {"dual_scale": True, "rotation": "hadamard"}],
    ids=str,
)
def test_activation_series_expands_the_transformed_input(transform):
    """With an input transform the activation series quantizes ``input_transform(x)``, the vector the stored
    series multiplies: every product path agrees bit for bit, equals that product to float32 rounding, and W4A8
    stays close to the same layer at A16."""
    torch.manual_seed(0)
    m = FPxINTLinear.from_linear(nn.Linear(256, 48), group_size=64, **transform)
    m.act_bits, m.act_terms, m.act_outliers = 8, 2, 4
    x = activations(n=10, seed=1)
    outs = {}
    for mode in ("reference", "int8", "dense", "auto"):  # float64, int (torch._int_mm), float32, auto (int)
        m.forward_mode = mode
        outs[mode] = m(x)
    assert all(torch.equal(outs["reference"], y) for y in outs.values())
    s = expand_activations(m.input_transform(x), 8, 2, outliers=4)
    exact = dequantize_activations(s).double() @ m.series_weight().double().t() + m.bias.double()
    assert snr_db(exact.float(), outs["auto"]) > 110
    m.act_bits, m.forward_mode = None, "reference"
    assert snr_db(m(x), outs["auto"]) > 60  # two 8-bit activation terms: ~90 dB on the activations


@pytest.mark.parametrize("weights", [{}, {"terms": 3}, {"bits": [4, 2]}, {"group_size": None}], ids=str)
def test_weight_columns_for_a_sa_come_from_the_codes_without_a_dense_copy(weights):
    """W·A_sa reads the K columns of W it needs from the integer codes: they equal the dequantized series'
    columns, and no dense W is kept unless W has saturated values of its own (M_sa)."""
    m = _layer(**weights)
    w = prepare_act(m.expansion(), m.num_terms(), ActSpec(8, 1, outliers=4, method="int"))
    assert w.dense_t is None
    cols = torch.tensor([0, 5, 63, 64, 200, 255, 5])
    want = m.series_weight()[:, cols].t()
    assert snr_db(want, weight_columns(w, cols)) > 120
    m_sa = _layer(outlier_fraction=0.02)
    assert prepare_act(m_sa.expansion(), 2, ActSpec(8, 1, outliers=4, method="int")).dense_t is not None


def test_float32_products_are_used_only_where_exact():
    assert float32_exact(128, 128, 8) and float32_exact(1024, 128, 8) and not float32_exact(2048, 128, 8)
    assert float32_exact(2048, 128, 4)  # 2048·128·8 = 2^21
    assert auto_method(2048, 8, torch.device("cpu")) == "int"  # torch._int_mm: exact for any group size
    assert auto_method(128, 8, torch.device("meta")) == "reference"
    big = FPxINTLinear.from_linear(nn.Linear(2048, 16), terms=2, group_size=None)  # one group of 2048 inputs
    with pytest.raises(ValueError, match="float32 products are not exact for group_size=2048"):
        prepare_act(big.expansion(), 2, ActSpec(8, 1, method="float32"), "cpu")
    assert prepare_act(big.expansion(), 2, ActSpec(4, 1, method="float32"), "cpu").max_code <= 128
    big.act_bits = 8
    x = torch.randn(3, 2048)
    big.forward_mode = "reference"
    ref = big(x)
    for mode in ("int8", "auto"):  # torch._int_mm
        big.forward_mode = mode
        assert torch.equal(ref, big(x))
    big.forward_mode = "dense"  # float32 on the codes: refused, it could round
    with pytest.raises(ValueError, match="float32 products are not exact for group_size=2048"):
        big(x)


def test_activation_quantization_changes_the_output_and_more_terms_recover_it():
    m = _layer()
    x = activations(n=12, seed=2)
    y16 = m(x)
    snr = {}
    for bits, terms in ((4, 1), (4, 2), (4, 3), (8, 1)):
        m.act_bits, m.act_terms, m.act_outliers = bits, terms, 0
        snr[bits, terms] = snr_db(y16, m(x))
    assert snr[4, 1] < snr[4, 2] < snr[4, 3] and snr[4, 3] > 45 and snr[8, 1] > 30, snr  # ~23 dB a 4-bit term
    assert "act_bits=8, act_terms=1" in repr(m)


def test_gradient_flows_through_a_w4a8_layer():
    m = _layer()
    m.act_bits = 8
    x = activations(n=4).requires_grad_()
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # straight-through: the weight's transpose, as for the A16 packed kernels
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "field, value",
    [
        ("act_bits", 6),
        ("act_bits", True),
        ("act_bits", 8.0),
        ("act_terms", 0),
        ("act_terms", 5),
        ("act_tol", -1.0),
        ("act_tol", math.nan),
        ("act_outliers", -1),
        ("act_outliers", 65),
    ],
)
def test_bad_activation_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"FPxINTConfig\.{field}={value!r} is invalid; allowed"):
        FPxINTConfig(**{"act_bits": 8, field: value})
    with pytest.raises(ValueError, match=rf"ExpansionSettings\.{field}="):
        ExpansionSettings(**{field: value})
    with pytest.raises(ValueError, match="act_bits=3"):
        expand_activations(torch.ones(2, 8), 3, 1)


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["quantize", "m", "out", "--act-bits", "4", "--act-terms", "2"])
    config = _config_from_args(args)
    assert (config.act_bits, config.act_terms, config.act_tol, config.act_outliers) == (4, 2, 0.0, 4)
    assert _config_from_args(build_parser().parse_args(["quantize", "m", "out"])).act_bits is None


def test_w4a8_quantize_on_load_saves_and_reloads_bit_identical(
    fp_model_dir, load_fp, load_quantized, logits_of, tmp_path
):
    a16 = logits_of(load_quantized(fp_model_dir))
    model = load_quantized(fp_model_dir, act_bits=8, act_terms=2)
    layers = [m for m in model.modules() if isinstance(m, FPxINTLinear)]
    assert layers and all((m.act_bits, m.act_terms) == (8, 2) for m in layers)
    before = logits_of(model)
    assert not torch.equal(before, a16) and snr_db(a16, before) > 40
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (saved["act_bits"], saved["act_terms"], saved["act_outliers"]) == (8, 2, 4)
    reloaded = load_fp(tmp_path / "q")
    assert all(m.act_bits == 8 for m in reloaded.modules() if isinstance(m, FPxINTLinear))
    assert torch.equal(logits_of(reloaded), before)


def test_configs_without_the_act_keys_load_as_a16(fp_model_dir, load_fp, load_quantized, logits_of, tmp_path):
    """A checkpoint written before issue 16 (no ``act_*`` keys) keeps its meaning: activations stay float."""
    load_quantized(fp_model_dir).save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    assert config["quantization_config"].pop("act_bits") is None
    for key in ("act_terms", "act_tol", "act_outliers"):
        config["quantization_config"].pop(key)
    path.write_text(json.dumps(config))
    old = load_fp(tmp_path / "q")
    assert all(m.act_bits is None for m in old.modules() if isinstance(m, FPxINTLinear))
    assert torch.equal(logits_of(old), logits_of(load_quantized(fp_model_dir)))
    assert FPxINTConfig.from_dict({"quant_method": "fpxint"}).act_bits is None


def test_committed_act_results_render_from_their_json(eval_module):
    _act_report = eval_module("_act_report")
    res = json.loads((ROOT / "eval" / "results" / "act.json").read_text())
    assert _act_report.to_markdown(res) == (ROOT / "eval" / "results" / "act.md").read_text()
    verdicts = {t["target"]: t["met"] for t in _act_report.targets(res)}
    assert len(verdicts) == 2 * len({r["weights"] for r in res["rows"]} - {"FP"})
