"""save_pretrained -> from_pretrained on tiny seeded LLaMA / Qwen2 models: the checkpoint holds exactly the
expected buffers in their stable dtypes, and the reloaded model is bit-identical (also reloaded in bf16)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import BUFFER_DTYPES, expected_buffers, fpxint_modules, saved_tensors

import fpxint_hf
from fpxint_hf.expansion import snr_db


@pytest.mark.parametrize("outlier_fraction", [0.0, 0.02], ids=["no_outliers", "outliers"])
@pytest.mark.parametrize("group_size", [32, None], ids=["g32", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_reload_bit_exact(
    arch, dtype, group_size, outlier_fraction, make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    symmetric = group_size is None  # symmetric with and without outliers, for both archs and dtypes
    fp_dir = make_fp_dir(arch)
    q = load_quantized(
        fp_dir,
        dtype=dtype,
        bits=4,
        terms=2,
        group_size=group_size,
        symmetric=symmetric,
        outlier_fraction=outlier_fraction,
        clip="laplace",
    )
    assert q.get_input_embeddings().weight.dtype == dtype
    before = logits_of(q)
    assert before.dtype == dtype and torch.isfinite(before).all()
    out = tmp_path / "q"
    q.save_pretrained(out)

    # config.json carries the quantization config
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "fpxint"
    assert (qcfg["bits"], qcfg["terms"], qcfg["group_size"]) == (4, 2, group_size)
    assert (qcfg["symmetric"], qcfg["outlier_fraction"], qcfg["clip"]) == (
        symmetric,
        outlier_fraction,
        "laplace",
    )

    # the safetensors holds exactly the expected buffers of every quantized layer, and no `.weight`
    saved = saved_tensors(out)
    modules = fpxint_modules(q)
    for name, module in modules.items():
        keys = {k[len(name) + 1 :] for k in saved if k.startswith(name + ".")}
        expected = expected_buffers(module) | ({"bias"} if module.bias is not None else set())
        assert keys == expected, name
        assert f"{name}.weight" not in saved
        for buf in expected - {"bias"}:
            assert saved[f"{name}.{buf}"].dtype == BUFFER_DTYPES[buf], f"{name}.{buf}"
            assert torch.equal(saved[f"{name}.{buf}"], getattr(module, buf)), f"{name}.{buf}"
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in modules for k in saved)
    quantized_keys = {k for k in saved if k.rsplit(".", 1)[0] in modules}
    other = {k for k in saved if k not in quantized_keys}
    assert all(k.endswith(("norm.weight", "embed_tokens.weight", "lm_head.weight")) for k in other), other

    assert qcfg["compute_dtype"] == "bfloat16"  # what a reload without dtype= runs in (config.json's dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_fp(out, dtype=dtype)
    assert isinstance(reloaded.config.quantization_config, fpxint_hf.FPxINTConfig)
    assert reloaded.get_input_embeddings().weight.dtype == dtype
    for name, module in fpxint_modules(reloaded).items():
        assert (module.group_size, module.symmetric) == (modules[name].group_size, symmetric)
        for buf in expected_buffers(module):
            assert getattr(module, buf).dtype == BUFFER_DTYPES[buf]
    after = logits_of(reloaded)
    assert torch.equal(after, before)
    if arch == "llama":  # tied embeddings stay tied after reload
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
        assert torch.equal(reloaded.lm_head.weight, q.lm_head.weight)


def test_reload_fp32_checkpoint_as_bf16(fp_model_dir, load_fp, load_quantized, logits_of, tmp_path):
    fp_dir = fp_model_dir
    q = load_quantized(fp_dir, bits=4, terms=2, group_size=32, outlier_fraction=0.02)
    q.save_pretrained(tmp_path / "q")
    ref32 = logits_of(q)

    bf = load_fp(tmp_path / "q", dtype=torch.bfloat16)
    assert bf.get_input_embeddings().weight.dtype == torch.bfloat16
    for name, module in fpxint_modules(bf).items():
        for buf in expected_buffers(module):
            assert getattr(module, buf).dtype == BUFFER_DTYPES[buf], f"{name}.{buf}"
        if module.bias is not None:
            assert module.bias.dtype == torch.bfloat16
        # the stored series is untouched by the dtype: the same weights dequantize bit-exactly
        assert torch.equal(module.dequantize(), q.get_submodule(name).dequantize())
    out = logits_of(bf)
    assert out.dtype == torch.bfloat16
    snr = snr_db(out, ref32)
    arch = fp_model_dir.name.split("-")[1]
    print(f"\n[snr] {arch} fp32 checkpoint reloaded as bf16 vs fp32 reload: {snr:.1f} dB")
    assert snr >= 30.0


def test_a_config_passed_for_a_quantized_folder_applies_forward_mode_and_names_the_rest(
    make_fp_dir, load_fp, load_quantized, logits_of, tmp_path, caplog
):
    """from_pretrained(quantized_dir, quantization_config=...): ``forward_mode`` is applied, every other field that
    differs from the checkpoint's is named in one warning and ignored, and the passed object is left unchanged."""
    q = load_quantized(make_fp_dir("llama"), bits=4, terms=2, group_size=32)
    q.save_pretrained(tmp_path / "q")
    expected = logits_of(load_fp(tmp_path / "q"))

    passed = fpxint_hf.FPxINTConfig(bits=3, terms=2, group_size=32, forward_mode="reference")
    before = passed.to_dict()
    with caplog.at_level("WARNING"):
        model = load_fp(tmp_path / "q", quantization_config=passed)
    assert passed.to_dict() == before  # loading did not touch the user's object
    layers = fpxint_modules(model).values()
    assert {m.forward_mode for m in layers} == {"reference"}  # applied
    assert {m.bits for m in layers} == {4}  # the stored tensors' width
    assert model.config.quantization_config.forward_mode == "reference"
    assert model.config.quantization_config.bits == 4
    assert torch.allclose(logits_of(model), expected, atol=1e-4)
    ours = [r.getMessage() for r in caplog.records if "already quantized" in r.getMessage()]
    assert len(ours) == 1 and "bits=3 (checkpoint: 4)" in ours[0], ours
    assert "group_size" not in ours[0] and "forward_mode=" not in ours[0]  # equal, resp. applied
    assert not [
        r for r in caplog.records if "The `quantization_config` from the model will be used" in r.getMessage()
    ]

    caplog.clear()
    with caplog.at_level("WARNING"):  # only a run-time field differs: applied, nothing to warn about
        model = load_fp(
            tmp_path / "q",
            quantization_config=fpxint_hf.FPxINTConfig(terms=2, group_size=32, forward_mode="dense"),
        )
    assert {m.forward_mode for m in fpxint_modules(model).values()} == {"dense"}
    assert not [r for r in caplog.records if "already quantized" in r.getMessage()]
