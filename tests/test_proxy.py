"""The data-free activation proxy: what it reads from a checkpoint, and that the fit uses it."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import fpxint_modules
from conftest import build_tiny_model

from fpxint_hf.expansion import snr_db
from fpxint_hf.hf.proxy import GAIN_FLOOR, ActivationProxy


@pytest.fixture
def skewed_dir(tmp_path):
    """A tiny LLaMA whose norm weights are far from uniform (as in trained models)."""
    model = build_tiny_model("llama_untied")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(64, generator=g).pow(3) * 4 + 0.05)
    model.save_pretrained(tmp_path / "skewed")
    return tmp_path / "skewed", model


def floored(g: torch.Tensor) -> torch.Tensor:
    """``|γ|`` raised to at least ``sqrt(GAIN_FLOOR)`` times its RMS (the proxy's reading of a norm gain)."""
    return g.abs().clamp(min=(GAIN_FLOOR * g.pow(2).mean()).sqrt().item())


def test_proxy_reads_norms_values_and_mlp_rows(skewed_dir):
    path, model = skewed_dir
    proxy = ActivationProxy([str(p) for p in path.glob("*.safetensors")], num_key_value_heads=2)
    layer = model.model.layers[1]
    g_in, g_post = floored(layer.input_layernorm.weight), floored(layer.post_attention_layernorm.weight)
    assert (g_in > layer.input_layernorm.weight).any()  # the skewed gains do reach below the floor
    for leaf in ("q_proj", "k_proj", "v_proj"):
        assert torch.allclose(proxy.importance(f"model.layers.1.self_attn.{leaf}"), g_in.pow(2))
    assert torch.allclose(proxy.importance("model.layers.1.mlp.up_proj"), g_post.pow(2))
    o = proxy.importance("model.layers.1.self_attn.o_proj")
    v = (
        (layer.self_attn.v_proj.weight * g_in).pow(2).sum(1)
    )  # 2 kv heads x 16 dims, each serving 2 query heads
    assert o.shape == (64,) and torch.allclose(o, v.view(2, 16).repeat_interleave(2, 0).reshape(-1))
    up, gate = layer.mlp.up_proj.weight * g_post, layer.mlp.gate_proj.weight * g_post
    down = proxy.importance("model.layers.1.mlp.down_proj")
    assert torch.allclose(down, (up.norm(dim=1) * gate.norm(dim=1)).pow(2))
    assert proxy.importance("lm_head") is None and proxy.importance("model.layers.9.mlp.up_proj") is None


def test_quantize_on_load_fits_the_weighted_error(skewed_dir, load_quantized):
    """With the proxy, the first term trades error on quiet columns for error on loud ones: the output-weighted
    error falls although the plain weight error may rise."""
    path, model = skewed_dir
    fp = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with_proxy = fpxint_modules(load_quantized(path, bits=4, terms=1, group_size=32, act_proxy="norm"))
    without = fpxint_modules(load_quantized(path, bits=4, terms=1, group_size=32, act_proxy=None))
    name = "model.layers.0.self_attn.q_proj"
    a = floored(model.model.layers[0].input_layernorm.weight).pow(2)

    def weighted(m):
        return ((m.dequantize() - fp[name]).pow(2) * a).sum().item()

    assert not torch.equal(with_proxy[name].codes, without[name].codes)
    assert weighted(with_proxy[name]) < 0.95 * weighted(without[name])


def test_damped_loud_channel_is_not_sacrificed(tmp_path, load_quantized):
    """Qwen2-style massive activation: the norm damps channel c with a small gain because ``h_c/rms`` is huge, so
    ``x_c = γ_c·h_c/rms`` is loud although ``γ_c²`` is tiny, and its weight column is an outlier in its group.
    Trusting ``γ_c²`` made the fit clip that column; the proxied fit must not lose to the unweighted one on the
    layer's true output (eval/results/qwen_diagnosis.md: KL 0.11 vs RTN 0.06 on Qwen2.5-Coder-1.5B before)."""
    model, c, name = build_tiny_model("qwen2"), 5, "model.layers.0.self_attn.k_proj"
    gain = torch.ones(64)
    gain[c] = 0.05
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.copy_(gain)
        lin = model.get_submodule(name)
        lin.weight.normal_(0, 0.05, generator=g)
        lin.weight[:, c] *= 4  # an outlier column, as on real massive-activation channels
    model.save_pretrained(tmp_path / "massive")
    h = torch.randn(4096, 64, generator=g)
    h[:, c] *= 40  # E[(h_c/rms)²] ~ 1600x the others (rms taken before the outlier, as over many tokens)
    x = h * gain  # E[x_c²] = 4: the loudest column, with the smallest gain
    fp_out = x @ lin.weight.T

    def out_snr(**config) -> float:
        q = fpxint_modules(load_quantized(tmp_path / "massive", bits=4, terms=1, group_size=32, **config))[
            name
        ]
        return snr_db(x @ q.dequantize().T, fp_out)

    assert out_snr(act_proxy="norm") >= out_snr(act_proxy=None) - 0.5
