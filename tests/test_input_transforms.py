"""The input transforms before the series (``rotation="hadamard"``, ``dual_scale``): exact inverses, error that
never rises with more terms, every forward path, gradients, save/reload, old configs, settings errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fpxint_hf
from fpxint_hf.dual_scale import sinkhorn_column_scales
from fpxint_hf.expansion import expand, original_weight, reconstruct
from fpxint_hf.fit import relative_error, snr_db
from fpxint_hf.layout import check_tensors
from fpxint_hf.linear import FPxINTLinear
from fpxint_hf.rotation import (
    block_mean,
    fwht,
    hadamard_block,
    random_signs,
    rotate_input,
    rotate_weight,
    unrotate_weight,
)
from fpxint_hf.settings import ExpansionSettings, read_quantization_config
from fpxint_hf.transform import fit_input_transform, fold_weight, transform_input

OPTIONS = {
    "dual_scale": {"dual_scale": True},
    "rotation": {"rotation": "hadamard"},
    "both": {"dual_scale": True, "rotation": "hadamard"},
}


def heavy_weight(out: int = 96, n_in: int = 192, seed: int = 0) -> torch.Tensor:  # fixed by seed
    """Student-t entries with a few loud input columns and rows: what the transforms are for."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, out, n_in, generator=g).pow(2).mean(0)
    w = torch.randn(out, n_in, generator=g) / chi2.sqrt() * 0.02  # Student-t, 3 degrees of freedom
    w[:, torch.randperm(n_in, generator=g)[:4]] *= 12
    w[torch.randperm(out, generator=g)[:3]] *= 4
    return w


@pytest.mark.parametrize(
    ("n", "block"), [(64, 64), (192, 64), (384, 128), (576, 64), (1536, 256), (4096, 256)]
)
def test_block_is_the_largest_power_of_two_up_to_256_dividing_in_features(n, block):
    assert hadamard_block(n) == block


@pytest.mark.parametrize("n", [64, 192, 1536])
def test_rotation_is_bit_exact_on_dyadic_inputs(n):
    g = torch.Generator().manual_seed(n)
    w = torch.randint(-512, 512, (24, n), generator=g).float() / 64  # dyadic: every sum is exact in fp32
    x = torch.randint(-512, 512, (5, n), generator=g).float() / 64
    s = random_signs(n)
    assert torch.equal(fwht(fwht(w, hadamard_block(n)), hadamard_block(n)), hadamard_block(n) * w)
    assert torch.equal(unrotate_weight(rotate_weight(w, s), s), w)
    assert torch.equal(
        rotate_weight(w, s).double() @ rotate_input(x, s).double().T, w.double() @ x.double().T
    )


def test_rotation_is_orthogonal_to_fp32_precision_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 1536, generator=g), torch.randn(7, 1536, generator=g)
    s = random_signs(1536)
    assert snr_db(unrotate_weight(rotate_weight(w, s), s), w) >= 120
    assert snr_db(rotate_weight(w, s) @ rotate_input(x, s).T, w @ x.T) >= 120
    # the signs are a fixed function of the seed, ±1
    assert torch.equal(s, random_signs(1536)) and set(s.tolist()) == {-1, 1}


def test_sinkhorn_scales_balance_each_group_and_ignore_the_magnitude():
    w = heavy_weight()
    t = sinkhorn_column_scales(w, 64)
    assert t.shape == (192,) and bool((t > 0).all())
    assert torch.allclose(t.log().reshape(-1, 64).mean(-1), torch.zeros(3), atol=1e-5)  # geometric mean 1
    assert torch.allclose(sinkhorn_column_scales(w * 1000, 64), t, rtol=1e-4)

    def imbalance(m):  # max/min std over rows and columns, worst group
        tiles = m.reshape(m.shape[0], -1, 64).permute(1, 0, 2)
        s = torch.cat([tiles.std(2), tiles.std(1)], dim=1)
        return (s.amax(1) / s.amin(1)).max().item()

    rows = w.reshape(96, 3, 64).std(-1, keepdim=True)  # the implicit row scales: per (row, group)
    balanced = (w.reshape(96, 3, 64) / rows).reshape(96, 192) / t
    assert imbalance(balanced) < 0.5 * imbalance(w)


def test_proxy_follows_the_transforms():
    """The fit weighs V's error by the rotated inputs' energy (block mean of E[x²]), not by t² as well (measured
    worse end to end: transform.py's docstring); without a proxy the fit is unweighted."""
    w, a = heavy_weight(), torch.rand(192) + 0.1
    v, a_v, t, s = fit_input_transform(w, True, "hadamard", 64, a)
    assert t is not None and s is not None and a_v is not None
    assert torch.allclose(a_v, block_mean(a, 64))
    assert snr_db(fold_weight(v, t, s), w) >= 120
    _, a_t, t2, _ = fit_input_transform(w, True, None, 64, None)
    assert a_t is None and t2 is not None


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_series_error_never_rises_as_terms_are_added(bits, symmetric, option):
    w = heavy_weight()
    e = expand(w, bits=bits, terms=4, group_size=64, symmetric=symmetric, **OPTIONS[option])
    assert len(e.errors) == 4 and all(b <= a for a, b in zip(e.errors, e.errors[1:], strict=False))
    errs = [relative_error(original_weight(e, k), w) for k in range(1, 5)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-3  # four terms of 3-4 bits: essentially exact


@pytest.mark.parametrize("bits", [3, 4])
def test_each_option_beats_none_on_a_heavy_tailed_weight(bits):
    """Loud columns and heavy tails are what both transforms address: one term's weight error drops by 10% or
    more with the rotation, and does not rise with dual_scale alone (whose fit minimizes the error of the balanced
    V, not of W: its gain shows end to end, eval/results/options.md)."""
    w = heavy_weight()
    none = relative_error(original_weight(expand(w, bits=bits, terms=1, group_size=64)), w)
    for option, kw in OPTIONS.items():
        err = relative_error(original_weight(expand(w, bits=bits, terms=1, group_size=64, **kw)), w)
        assert err < (1.0 if option == "dual_scale" else 0.9) * none, (option, err, none)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_forward_path_computes_the_same_layer(option):
    torch.manual_seed(0)
    lin = nn.Linear(192, 64)
    lin.weight.data = heavy_weight(64)
    m = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64, **OPTIONS[option])
    x = torch.randn(2, 5, 192)
    expected = x @ m.dequantize().T + m.bias  # dequantize(): the weight in the original input basis
    assert snr_db(m.dequantize(), lin.weight) >= 30
    for mode in ("reference", "terms", "dense", "int4"):
        m.forward_mode = mode
        assert snr_db(m(x), expected) >= 100, mode
    m.forward_mode = "int4"
    assert snr_db(m(x.bfloat16()).float(), expected) >= 30  # bf16 activations on the packed kernel


@pytest.mark.parametrize("mode", ["dense", "int4"])
def test_gradient_flows_through_the_input_transform(mode):
    lin = nn.Linear(192, 32)
    lin.weight.data = heavy_weight(32)
    m = FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=64, dual_scale=True, rotation="hadamard")
    m.forward_mode = mode
    x = torch.randn(3, 192, requires_grad=True)
    g = torch.randn(3, 32)
    m(x).backward(g)
    assert x.grad is not None and snr_db(x.grad, g @ m.dequantize()) >= 100


def test_transform_buffers_are_stored_and_counted():
    lin = nn.Linear(192, 64)
    plain = FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64)
    both = FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64, dual_scale=True, rotation="hadamard")
    state = both.state_dict()
    assert state["col_scale"].shape == (1, 192) and state["col_scale"].dtype == torch.float16
    assert state["rot_signs"].shape == (1, 192) and state["rot_signs"].dtype == torch.int8
    assert both.bits_per_weight() - plain.bits_per_weight() == pytest.approx((16 + 8) / 64)
    x = torch.ones(3, 192)
    assert transform_input(x, None, None) is x  # no transform: the input itself, no copy
    with pytest.raises(ValueError, match="col_scale=True"):
        plain.expansion_state(both.expansion())  # a transformed series cannot load into a plain layer


def test_check_tensors_names_impossible_transform_values():
    values = {
        "col_scale": torch.tensor([[1.0, 0.0]]).half(),
        "rot_signs": torch.tensor([[1, 0]], dtype=torch.int8),
    }
    problems = check_tensors("m", values, terms=1, term_bits=(4,), in_features=2, series="nested")
    assert any("m.col_scale" in p for p in problems) and any("m.rot_signs" in p for p in problems)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_save_reload_gives_bit_identical_outputs(
    option, make_fp_dir, load_quantized, load_fp, logits_of, tmp_path
):
    fp_dir = make_fp_dir("qwen2")
    q = load_quantized(fp_dir, dtype=torch.float32, bits=3, terms=1, group_size=32, **OPTIONS[option])
    fp = load_fp(fp_dir)
    assert snr_db(logits_of(q), logits_of(fp)) >= 10
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {k: saved[k] for k in OPTIONS[option]} == OPTIONS[option]
    again = load_fp(tmp_path / "q")
    assert torch.equal(logits_of(again), logits_of(q))
    layer = again.get_submodule("model.layers.0.mlp.down_proj")
    assert (layer.dual_scale, layer.rotation) == (
        OPTIONS[option].get("dual_scale", False),
        OPTIONS[option].get("rotation"),
    )


def test_a_config_without_the_keys_loads_unchanged(make_fp_dir, load_quantized, load_fp, logits_of, tmp_path):
    q = load_quantized(make_fp_dir("llama"), dtype=torch.float32, bits=4, terms=1, group_size=32)
    q.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("dual_scale", "rotation"):
        del cfg["quantization_config"][key]  # as written before these options existed
    path.write_text(json.dumps(cfg))
    again = load_fp(tmp_path / "q")
    assert torch.equal(logits_of(again), logits_of(q))
    assert (
        not again.config.quantization_config.dual_scale and again.config.quantization_config.rotation is None
    )
    for version in (1, 2):
        fields = read_quantization_config({"version": version})
        assert (fields["dual_scale"], fields["rotation"]) == (False, None)


@pytest.mark.parametrize(
    ("field", "value"), [("dual_scale", 1), ("dual_scale", "yes"), ("rotation", "walsh"), ("rotation", True)]
)
def test_settings_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ExpansionSettings\.{field}=.* is invalid; allowed"):
        ExpansionSettings(**{field: value})
    with pytest.raises(ValueError, match=rf"FPxINTConfig\.{field}=.* is invalid; allowed"):
        fpxint_hf.FPxINTConfig(**{field: value})


def test_cli_flags_set_the_options():
    from fpxint_hf.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "out", "--dual-scale", "--rotation", "hadamard"])
    cfg = _config_from_args(args)
    assert cfg.dual_scale is True and cfg.rotation == "hadamard"
    plain = _config_from_args(build_parser().parse_args(["quantize", "m", "out"]))
    assert plain.dual_scale is False and plain.rotation is None


def test_reconstruct_is_the_transformed_series():
    w = heavy_weight()
    e = expand(w, bits=4, terms=2, group_size=64, rotation="hadamard")
    assert e.rot_signs is not None
    assert snr_db(reconstruct(e), rotate_weight(w, e.rot_signs)) >= 40


def test_committed_options_table_is_rendered_from_its_json_and_quoted_in_the_docs(eval_module):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    to_markdown = eval_module("bench_options").to_markdown
    res = json.loads((root / "eval" / "results" / "options.json").read_text())
    table = to_markdown(res)
    assert (root / "eval" / "results" / "options.md").read_text() == table
    doc = (root / "docs" / "benchmarks.md").read_text()
    quoted = [line for line in table.splitlines() if line.startswith("| 3 ") or line.startswith("| 4 ")]
    assert quoted and all(line in doc for line in quoted)
