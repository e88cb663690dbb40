"""LoRA adapters (PEFT) trained on top of a frozen FP=xINT model, saved and reloaded (``fpxint_hf.hf.lora``)."""

from __future__ import annotations

import peft  # a dev dependency: never skipped
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import fpxint_hf
from fpxint_hf import FPxINTLinear
from fpxint_hf.expansion import expand, snr_db
from fpxint_hf.hf.lora import FPxINTLoraLinear, load_lora_adapter, lora_config, register_lora

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
QCONFIG = dict(bits=4, terms=2, group_size=32)


def quantized(path, dtype=torch.float32, **config):
    cfg = fpxint_hf.FPxINTConfig(**{**QCONFIG, **config})
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype)


def train(model, input_ids, steps=20, lr=1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["reference", "terms"])
def test_gradient_wrt_input(mode):
    """The differentiable paths give d(out)/dx = W_q^T (the dequantized weight), and no gradient to buffers."""
    torch.manual_seed(0)
    layer = FPxINTLinear(96, 48, bias=True, bits=4, terms=2, group_size=32)
    layer.load_expansion(expand(torch.randn(48, 96), bits=4, terms=2, group_size=32))
    layer.forward_mode = mode
    x = torch.randn(5, 96, requires_grad=True)
    grad_out = torch.randn(5, 48)
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer.dequantize(), rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


def test_auto_mode_falls_back_to_dense_for_gradients():
    """bfloat16 'auto' uses a packed kernel for inference and the dense weight when x needs a gradient (the same
    gradient as 'reference'); an explicit 'int4' is differentiated through the dequantized weight
    (``backends.KernelLinearFunction``)."""
    torch.manual_seed(0)
    layer = FPxINTLinear(128, 64, bias=False, bits=4, terms=2, group_size=32)
    layer.load_expansion(expand(torch.randn(64, 128), bits=4, terms=2, group_size=32))
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    layer.forward_mode = "reference"
    layer(x).float().sum().backward()
    expected, x.grad = x.grad, None
    layer.forward_mode = "auto"
    layer(x).float().sum().backward()
    assert torch.equal(x.grad, expected)  # the reference path's gradient, bit for bit
    with torch.no_grad():
        layer(x)
    assert layer._kernel_cache is not None and layer._kernel_cache[2] is not None  # the kernel, without grad
    layer.forward_mode, x.grad = "int4", None
    layer(x).float().sum().backward()
    assert (
        snr_db(x.grad, expected) > 30
    )  # the kernel's forward rounds differently; its backward is the dense one


def test_lora_wraps_fpxint_layers_and_keeps_keys(make_fp_dir):
    model = quantized(make_fp_dir("llama"))  # bias-free layers: PEFT needs `qweight` to place the adapter
    keys = set(model.state_dict())
    assert not any(k.endswith(".qweight") for k in keys)
    peft_model = peft.get_peft_model(model, lora_config(r=4, target_modules=TARGETS))
    wrapped = {n: m for n, m in peft_model.named_modules() if isinstance(m, FPxINTLoraLinear)}
    assert len(wrapped) == 2 * len(TARGETS)
    for module in wrapped.values():
        assert isinstance(module.base_layer, FPxINTLinear)
        assert (module.in_features, module.out_features) == (
            module.base_layer.in_features,
            module.base_layer.out_features,
        )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the base model's own keys are unchanged once the adapters are taken off again
    assert set(peft_model.unload().state_dict()) == keys


@pytest.mark.parametrize(
    ("arch", "dtype", "mode"),
    [("qwen2", torch.float32, "reference"), ("llama", torch.bfloat16, "auto")],
    ids=["qwen2-fp32-reference", "llama-bf16-auto"],
)
def test_lora_trains_saves_and_reloads(arch, dtype, mode, make_fp_dir, input_ids, tmp_path):
    fp_dir = make_fp_dir(arch)
    base = quantized(fp_dir, dtype=dtype, forward_mode=mode)
    base.save_pretrained(tmp_path / "q")
    frozen = {k: v.clone() for k, v in base.state_dict().items()}

    model = peft.get_peft_model(base, lora_config(r=8, lora_alpha=16, target_modules=TARGETS))
    first = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(first)  # gradients reach the adapters only
    model.zero_grad()

    losses = train(model, input_ids)
    print(f"\n[lora] {arch} {dtype} {mode}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 20 steps")
    assert losses[-1] < 0.9 * losses[0], losses
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[n], v) for n, v in first.items())  # every lora_A and lora_B moved
    base_now = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }
    assert base_now.keys() == frozen.keys()
    assert all(torch.equal(base_now[k], v) for k, v in frozen.items())  # buffers and base params frozen

    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=dtype)
    reloaded = load_lora_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected)
        with reloaded.disable_adapter():
            assert not torch.equal(reloaded(input_ids).logits, expected)  # the adapter matters


def test_unregistered_config_and_unsupported_features_fail_loudly(make_fp_dir, tmp_path):
    model = quantized(make_fp_dir("qwen2"))
    with pytest.raises(ValueError, match="Target module FPxINTLinear.* is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS))  # not registered
    with pytest.raises(ValueError, match="unsupported variant"):
        peft.get_peft_model(
            quantized(make_fp_dir("qwen2")), lora_config(r=4, target_modules=TARGETS, use_dora=True)
        )
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        peft.get_peft_model(
            quantized(make_fp_dir("qwen2")),
            lora_config(r=4, target_modules=TARGETS, init_lora_weights="pissa"),
        )
    peft_model = peft.get_peft_model(
        quantized(make_fp_dir("qwen2")), lora_config(r=4, target_modules=TARGETS)
    )
    with pytest.raises(NotImplementedError, match="re-quantization"):
        peft_model.merge_and_unload()
    peft_model.save_pretrained(tmp_path / "adapter")
    # the registration is not in adapter_config.json: plain PeftModel.from_pretrained refuses (loudly)
    with pytest.raises(ValueError, match="is not supported"):
        peft.PeftModel.from_pretrained(quantized(make_fp_dir("qwen2")), tmp_path / "adapter")
    config = register_lora(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    assert peft.PeftModel.from_pretrained(
        quantized(make_fp_dir("qwen2")), tmp_path / "adapter", config=config
    )
    with pytest.raises(TypeError, match="LoraConfig"):
        register_lora(object())


def test_lora_output_is_base_plus_scaled_low_rank(make_fp_dir):
    """The adapted layer computes base(x) + (alpha/r)·B(A(x)), as PEFT does for nn.Linear."""
    model = quantized(make_fp_dir("qwen2"))
    peft_model = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + 2.0 * F.linear(F.linear(x, a), b)
    torch.testing.assert_close(layer(x), expected)
