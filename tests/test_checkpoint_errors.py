"""A saved FP=xINT checkpoint that is tampered with must fail loudly, never load silently wrong.

Each test quantizes a tiny seeded model, saves it, edits the saved files (safetensors rewritten with
``safetensors.torch.save_file`` and metadata ``{"format": "pt"}``, or config.json), and reloads.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fpxint_hf

# Qwen2 (q/k/v biases), asymmetric, grouped, with outliers: every buffer kind is in the checkpoint.
FULL = dict(bits=4, terms=2, group_size=32, outlier_fraction=0.02)
# transformers' error on a shape mismatch (its load report, logged, names the tensors)
MISMATCH = r"ignore_mismatched_sizes"


@pytest.fixture
def saved_quantized(make_fp_dir, tmp_path) -> Callable[..., Path]:
    """Factory: quantize a tiny model on load, save it, return the checkpoint directory."""

    def make(arch: str = "qwen2", **config) -> Path:
        config = config or FULL
        model = AutoModelForCausalLM.from_pretrained(
            make_fp_dir(arch), quantization_config=fpxint_hf.FPxINTConfig(**config)
        )
        out = tmp_path / "quantized"
        model.save_pretrained(out)
        return out

    return make


def edit_tensors(ckpt: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_quant_config(ckpt: Path, **changes) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def reload(ckpt: Path):
    return AutoModelForCausalLM.from_pretrained(ckpt)


def test_untampered_checkpoint_loads(saved_quantized):
    """Baseline for every case below: the same checkpoint, untouched, reloads cleanly."""
    ckpt = saved_quantized()
    model = reload(ckpt)
    assert len([m for m in model.modules() if isinstance(m, fpxint_hf.FPxINTLinear)]) == 14


# --------------------------------------------------------------------------- (a) a tensor removed


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_proj.codes",
        "model.layers.1.mlp.down_proj.scale",
        "model.layers.0.mlp.up_proj.zero",
        "model.layers.1.self_attn.k_proj.terms_used",
        "model.layers.0.self_attn.o_proj.outlier_idx",
        "model.layers.1.mlp.gate_proj.outlier_val",
    ],
)
def test_missing_tensor_is_named(saved_quantized, key):
    ckpt = saved_quantized()
    edit_tensors(ckpt, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing from the checkpoint") as info:
        reload(ckpt)
    assert key in str(info.value)


def test_missing_layer_names_every_tensor(saved_quantized):
    ckpt = saved_quantized()
    layer = "model.layers.1.self_attn.v_proj"
    edit_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith(layer + ".")])
    with pytest.raises(ValueError, match="missing from the checkpoint") as info:
        reload(ckpt)
    for buf in ("codes", "scale", "zero", "outlier_idx", "outlier_val", "terms_used"):
        assert f"{layer}.{buf}" in str(info.value)


def test_missing_bias_is_named(saved_quantized):
    ckpt = saved_quantized("qwen2")
    key = "model.layers.0.self_attn.q_proj.bias"
    edit_tensors(ckpt, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing") as info:
        reload(ckpt)
    assert key in str(info.value)


# --------------------------------------------------------------------------- (b) a tensor of the wrong shape


@pytest.mark.parametrize(
    ("key", "reshape"),
    [
        ("model.layers.0.self_attn.q_proj.codes", lambda t: t[:, :-1]),  # one output row short
        ("model.layers.0.self_attn.q_proj.codes", lambda t: t[:1]),  # one term instead of two
        ("model.layers.1.mlp.down_proj.scale", lambda t: t.t()),  # same numel, transposed
        ("model.layers.0.mlp.gate_proj.zero", lambda t: t[:, :1]),  # fewer groups
        ("model.layers.0.self_attn.o_proj.outlier_idx", lambda t: torch.cat([t, t], dim=1)),  # bigger budget
        ("model.layers.1.self_attn.k_proj.terms_used", lambda t: t.repeat(2)),
    ],
    ids=["codes_rows", "codes_terms", "scale_transposed", "zero_groups", "outlier_budget", "terms_used"],
)
def test_wrong_shape_fails(saved_quantized, key, reshape):
    ckpt = saved_quantized()
    edit_tensors(ckpt, lambda t: t.__setitem__(key, reshape(t[key]).contiguous()))
    with pytest.raises(ValueError, match=rf"{key} has shape .* in the checkpoint, but the config declares"):
        reload(ckpt)


@pytest.mark.parametrize("terms_used", [0, 3, -1])
def test_terms_used_out_of_range_fails(saved_quantized, terms_used):
    ckpt = saved_quantized()
    key = "model.layers.0.mlp.down_proj.terms_used"
    edit_tensors(ckpt, lambda t: t[key].fill_(terms_used))
    with pytest.raises(ValueError, match=rf"{key}={terms_used} \(config allows 1..2\)"):
        reload(ckpt)


# --------------------------------------------------------------------------- (c) config.json disagrees


@pytest.mark.parametrize(
    ("changes", "tensor"),
    [
        (dict(bits=8), "codes"),
        (dict(bits=2), "codes"),
        (dict(bits=3), "codes"),
        (dict(terms=3), "codes"),
        (dict(terms=1), "codes"),
        (dict(group_size=None), "scale"),
        (dict(group_size=64), "scale"),
        (dict(group_size=16), "scale"),
    ],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_config_disagreeing_with_tensors_fails(saved_quantized, changes, tensor):
    ckpt = saved_quantized()
    edit_quant_config(ckpt, **changes)
    field = next(iter(changes))
    with pytest.raises(
        ValueError, match=rf"q_proj\.{tensor} has shape .* config declares .*{field}="
    ) as info:
        reload(ckpt)
    assert "FP=xINT checkpoint does not match its quantization_config" in str(info.value)


def test_a_config_edited_to_other_bits_gives_a_short_error(saved_quantized):
    """Every layer mismatches: the first layers are named, then the count (not one line of every layer)."""
    ckpt = saved_quantized(bits=4, terms=2, group_size=32)
    edit_quant_config(ckpt, bits=3)
    with pytest.raises(ValueError) as info:
        reload(ckpt)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert message.count("has shape") == 2 and "model.layers.0.self_attn.q_proj.codes" in message
    n_layers = 2 * 7
    assert message.endswith(f"; and {n_layers - 2} more problems in {n_layers - 2} more layers"), message


def test_config_gains_outliers_fails(saved_quantized):
    ckpt = saved_quantized(bits=4, terms=2, group_size=32)  # saved without outliers
    edit_quant_config(ckpt, outlier_fraction=0.02)
    with pytest.raises(ValueError, match=r"q_proj\.outlier_idx \(missing from the checkpoint\)"):
        reload(ckpt)


def test_config_turns_asymmetric_fails(saved_quantized):
    ckpt = saved_quantized(bits=4, terms=2, group_size=32, symmetric=True)  # saved without zero points
    edit_quant_config(ckpt, symmetric=False)
    with pytest.raises(ValueError, match=r"q_proj\.zero \(missing from the checkpoint\)"):
        reload(ckpt)


def test_config_turns_symmetric_fails(saved_quantized):
    ckpt = saved_quantized()
    edit_quant_config(ckpt, symmetric=True)
    with pytest.raises(ValueError, match="zero"):
        reload(ckpt)


def test_config_loses_outliers_fails(saved_quantized):
    ckpt = saved_quantized()
    edit_quant_config(ckpt, outlier_fraction=0.0)
    with pytest.raises(ValueError, match="outlier"):
        reload(ckpt)


@pytest.mark.parametrize(
    ("changes", "field"),
    [(dict(bits=5), "bits=5"), (dict(group_size=8), "group_size=8"), (dict(group_sizes=64), "group_sizes")],
)
def test_invalid_quantization_config_fails(saved_quantized, changes, field):
    ckpt = saved_quantized()
    edit_quant_config(ckpt, **changes)
    with pytest.raises(ValueError, match=field):
        reload(ckpt)


# --------------------------------------------------------------------------- (d) a truncated file


@pytest.mark.parametrize(
    "keep",
    [lambda n: n // 2, lambda n: n - 16, lambda n: 4, lambda n: 0],
    ids=["half", "last_bytes", "in_header", "empty"],
)
def test_truncated_safetensors_fails(saved_quantized, keep):
    ckpt = saved_quantized()
    path = ckpt / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(keep(size))
    with pytest.raises(ValueError, match=r"the checkpoint is incomplete: .*model\.safetensors") as info:
        reload(ckpt)
    assert "\n" not in str(info.value)  # one line naming the file, not safetensors' bare message


# --------------------------------------------------------------------------- (e) non-finite FP weights


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_fails_quantize_on_load(make_fp_dir, transformers_log, bad):
    fp_dir = make_fp_dir("qwen2")
    ckpt = fp_dir.parent / "fp-nonfinite"
    shutil.copytree(fp_dir, ckpt)
    layer = "model.layers.1.mlp.up_proj"
    edit_tensors(ckpt, lambda t: t[f"{layer}.weight"].__setitem__((3, 5), bad))
    with pytest.raises((RuntimeError, ValueError)) as info:
        AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=fpxint_hf.FPxINTConfig(bits=4, terms=2, group_size=32)
        )
    report = str(info.value) + "\n" + transformers_log.text
    assert f"FP=xINT cannot quantize {layer}.weight" in report  # raised in the probe's pass (the default)
    assert "NaN or Inf" in report


# --------------------------------------------------------------------------- beyond the brief


def test_non_finite_stored_scale_fails(saved_quantized):
    ckpt = saved_quantized()
    key = "model.layers.0.self_attn.q_proj.scale"
    edit_tensors(ckpt, lambda t: t[key].__setitem__((0, 0), math.nan))
    with pytest.raises(ValueError, match="q_proj"):
        reload(ckpt)


def test_codes_and_scales_outside_their_range_fail(saved_quantized):
    """Values no FP=xINT writer produces: a non-positive step, or a legacy residual code 0 (legacy later terms use
    codes 1 .. 2^X - 1)."""
    ckpt = saved_quantized(bits=4, terms=2, group_size=32, series="legacy", fit="minmax")
    key = "model.layers.0.self_attn.q_proj.scale"
    edit_tensors(ckpt, lambda t: t[key].__setitem__((0, 0), 0.0))
    with pytest.raises(ValueError, match=r"q_proj\.scale holds values <= 0"):
        reload(ckpt)
    ckpt = saved_quantized(bits=4, terms=2, group_size=32, series="legacy", fit="minmax")
    key = "model.layers.0.mlp.up_proj.codes"
    edit_tensors(ckpt, lambda t: t[key][1].__setitem__((0, 0), 0))  # term 2, first two codes -> 0
    with pytest.raises(ValueError, match=r"up_proj\.codes holds residual code 0"):
        reload(ckpt)
