"""accelerate offload of FP=xINT models: ``device_map`` with ``"disk"`` (dict or ``"auto"`` + ``max_memory``).

On a machine without an accelerator every ``"cpu"`` entry of a device map is the execution device itself;
``"disk"`` entries are really offloaded (accelerate hooks load them for each forward).  Offloading next to an
accelerator (``"cpu"`` entries beside ``0``) uses the same hooks with an in-memory weights map, exercised here
with ``accelerate.cpu_offload``.  Every case must give the logits of the model loaded without offload.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fpxint_hf
from fpxint_hf import FPxINTLinear

CONFIG = dict(bits=4, terms=2, group_size=32, outlier_fraction=0.02)
LAYER1_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def load(path, **kwargs):
    kwargs.setdefault(
        "dtype", torch.float32
    )  # as these tests were written (a checkpoint's default is bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def quantize_kwargs(**extra):
    return {"quantization_config": fpxint_hf.FPxINTConfig(**{**CONFIG, **extra})}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def qwen2_dirs(make_fp_dir, tmp_path):
    """(FP checkpoint, the same quantized and saved); Qwen2 has q/k/v biases, so parameters are offloaded too."""
    fp_dir = make_fp_dir("qwen2")
    q_dir = tmp_path / "q"
    load(fp_dir, **quantize_kwargs()).save_pretrained(q_dir)
    return fp_dir, q_dir


@pytest.mark.parametrize("offload_buffers", [False, True], ids=["params_only", "with_buffers"])
@pytest.mark.parametrize("source", ["quantize_on_load", "pre_quantized"])
def test_disk_offloaded_layer_gives_same_logits(qwen2_dirs, logits_of, tmp_path, source, offload_buffers):
    fp_dir, q_dir = qwen2_dirs
    path, kwargs = (fp_dir, quantize_kwargs()) if source == "quantize_on_load" else (q_dir, {})
    expected = logits_of(load(path, **kwargs))
    folder = tmp_path / "offload"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(
            path, device_map=LAYER1_ON_DISK, offload_folder=folder, offload_buffers=offload_buffers, **kwargs
        )
    resident = [str(w.message) for w in caught if "offload_buffers=True" in str(w.message)]
    if offload_buffers:
        assert resident == []
    else:  # accelerate offloads parameters only: the layer's codes and scales stay in memory, and we say so
        assert len(resident) == 1 and resident[0].startswith("7 FP=xINT layers are offloaded"), resident
    assert model.hf_device_map["model.layers.1"] == "disk"
    on_disk = model.model.layers[1].self_attn.q_proj
    assert isinstance(on_disk, FPxINTLinear) and not hasattr(on_disk, "weight")
    assert on_disk.bias.device.type == "meta"  # offloaded, loaded by accelerate's hook for each forward
    assert (on_disk.codes.device.type == "meta") is offload_buffers
    assert on_disk.scale.dtype == torch.float16
    assert all(t.device.type == "cpu" for t in model.model.layers[0].state_dict().values())

    assert torch.equal(logits_of(model), expected)
    assert torch.equal(logits_of(model), expected)  # hooks put the layer back on meta in between

    written = sorted(p.name for p in folder.glob("*.safetensors"))
    if source == "quantize_on_load" and offload_buffers:
        # the quantize op's outputs were written to the offload folder; no full-precision weight was
        layer = "model.layers.1.self_attn.q_proj"
        assert {f"{layer}.{b}.safetensors" for b in ("codes", "scale", "zero", "outlier_idx")} <= set(written)
        assert not any(n.endswith("proj.weight.safetensors") for n in written), written
    else:  # read in place from the checkpoint (pre-quantized, or parameters of the FP checkpoint)
        assert not any("proj.codes" in n for n in written), written


@pytest.mark.parametrize("mode", ["reference", "terms", "int4"])
def test_disk_offload_bf16_forward_modes(qwen2_dirs, logits_of, tmp_path, mode):
    """bfloat16 model: the offloaded scales stay float16, every forward path matches the in-memory model, and the
    packed-kernel cache is not kept on offloaded layers (it would hold their weights in memory)."""
    _, q_dir = qwen2_dirs
    plain = fpxint_hf.set_forward_mode(load(q_dir, dtype=torch.bfloat16), mode)
    model = load(
        q_dir,
        dtype=torch.bfloat16,
        device_map=LAYER1_ON_DISK,
        offload_folder=tmp_path / "o",
        offload_buffers=True,
    )
    fpxint_hf.set_forward_mode(model, mode)
    assert torch.equal(logits_of(model), logits_of(plain))
    assert model.model.layers[1].mlp.down_proj.scale.dtype == torch.float16
    kept = [
        m._kernel_cache is not None for m in model.model.layers[1].modules() if isinstance(m, FPxINTLinear)
    ]
    assert kept == [False] * 7
    if mode == "int4":
        resident = model.model.layers[0].self_attn.q_proj
        assert resident._kernel_cache is not None and resident._kernel_cache[2] is not None


def test_auto_device_map_counts_quantized_size(qwen2_dirs, logits_of, tmp_path):
    """``device_map="auto"`` sizes layers quantized on load by their FP=xINT buffers, not their FP weights:
    the map is the one of the pre-quantized checkpoint.  Quantized sizes here: embeddings 32768 B, each decoder
    layer 46876 B, 160 kB in all; counted at FP size (190 kB a layer) every layer would go to disk."""
    fp_dir, q_dir = qwen2_dirs
    expected = logits_of(load(q_dir))
    maps = {}
    for name, path, kwargs in [("on_load", fp_dir, quantize_kwargs()), ("pre", q_dir, {})]:
        model = load(
            path,
            device_map="auto",
            max_memory={"cpu": 140_000},
            offload_folder=tmp_path / name,
            offload_buffers=True,
            **kwargs,
        )
        maps[name] = model.hf_device_map
        assert torch.equal(logits_of(model), expected), name
    assert maps["on_load"] == maps["pre"]
    assert maps["pre"]["model.layers.0"] == "cpu" and maps["pre"]["model.layers.1"] == "disk"


def test_cpu_offload_hooks(qwen2_dirs, logits_of):
    """accelerate's CPU offload (weights in a CPU dict, layers on meta, loaded for each forward)."""
    from accelerate import cpu_offload

    _, q_dir = qwen2_dirs
    model = load(q_dir)
    expected = logits_of(model)
    for layer in model.model.layers:
        cpu_offload(layer, execution_device=torch.device("cpu"), offload_buffers=True)
    assert model.model.layers[0].self_attn.q_proj.codes.device.type == "meta"
    assert torch.equal(logits_of(model), expected)


def test_save_offloaded_model_is_byte_identical(qwen2_dirs, tmp_path):
    """Saving a disk-offloaded model reads the offloaded tensors back; also over its own source directory,
    which its offload index points into (the crash-safe save writes a new directory before replacing it)."""
    _, q_dir = qwen2_dirs
    original = sha256(q_dir / "model.safetensors")
    model = load(q_dir, device_map=LAYER1_ON_DISK, offload_folder=tmp_path / "o", offload_buffers=True)
    with pytest.warns(UserWarning, match="offloaded modules"):
        model.save_pretrained(tmp_path / "resaved")
    assert sha256(tmp_path / "resaved" / "model.safetensors") == original
    with pytest.warns(UserWarning, match="offloaded modules"):
        model.save_pretrained(q_dir)
    assert sha256(q_dir / "model.safetensors") == original


@pytest.mark.parametrize("offload_buffers", [False, True], ids=["params_only", "with_buffers"])
@pytest.mark.parametrize(("key", "value"), [("scale", math.nan), ("bias", math.inf)])
def test_non_finite_offloaded_tensor_fails(qwen2_dirs, tmp_path, key, value, offload_buffers):
    """check_loaded reads offloaded tensors back from accelerate's weights map: a NaN in a disk layer is caught."""
    _, q_dir = qwen2_dirs
    name = f"model.layers.1.self_attn.q_proj.{key}"
    tensors = load_file(str(q_dir / "model.safetensors"))
    tensors[name][0] = value
    save_file(tensors, str(q_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} \(holds NaN or Inf\)"):
        load(q_dir, device_map=LAYER1_ON_DISK, offload_folder=tmp_path / "o", offload_buffers=offload_buffers)
