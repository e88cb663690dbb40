"""``act_proxy="probe"``: input energies measured on the FP model itself fed random token ids (no data)."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import fpxint_modules
from conftest import build_tiny_model

from fpxint_hf import FPxINTConfig
from fpxint_hf.hf.probe import PROBE_SEED, PROBE_TOKENS, probe_second_moments, probe_tokens


def _files(path):
    return sorted(str(p) for p in path.glob("*.safetensors"))


def test_probe_measures_the_fp_models_own_input_energy(fp_model_dir, load_fp):
    """The probe rebuilds the FP model from its safetensors (tied lm_head, Qwen2 biases included) and returns
    ``E[x_j²]`` of every linear input on the seeded random ids: the same numbers as hooks on the loaded model."""
    fp = load_fp(fp_model_dir)
    m2 = probe_second_moments(fp.config, _files(fp_model_dir))
    seen: dict[str, torch.Tensor] = {}
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(
                lambda _m, a, name=name: seen.__setitem__(name, a[0][0].pow(2).mean(0))
            )
    tokens = probe_tokens(fp.config)  # the tiny models have 64 positions
    assert tokens == min(PROBE_TOKENS, fp.config.max_position_embeddings)
    ids = torch.randint(
        0, fp.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(PROBE_SEED)
    )
    with torch.no_grad():
        fp(input_ids=ids)
    assert m2.keys() == seen.keys() and len(m2) == 7 * fp.config.num_hidden_layers
    for name, want in seen.items():
        assert torch.allclose(m2[name], want, rtol=1e-5, atol=1e-7), name
    assert len({float(v.std() / v.mean()) for v in m2.values()}) > 1  # not flat: the channels differ


@pytest.fixture(params=["llama", "qwen2"])
def skewed_dir(request, tmp_path):
    """A tiny model whose norm gains are far from uniform, as in trained models, so input energies differ."""
    model = build_tiny_model(request.param)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g).pow(3) * 4 + 0.05)
    model.save_pretrained(tmp_path / "skewed")
    return tmp_path / "skewed"


def test_quantize_on_load_fits_the_probed_energy(skewed_dir, load_fp, load_quantized):
    """With the probe the first term trades error on quiet inputs for error on loud ones: the error weighted
    by the probed energies falls, in every layer taken together, against the unweighted fit."""
    fp = load_fp(skewed_dir)
    m2 = probe_second_moments(fp.config, _files(skewed_dir))
    weights = {n: m.weight for n, m in fp.named_modules() if n in m2}
    probe = fpxint_modules(load_quantized(skewed_dir, bits=4, terms=1, group_size=32, act_proxy="probe"))
    plain = fpxint_modules(load_quantized(skewed_dir, bits=4, terms=1, group_size=32, act_proxy=None))

    def weighted(mods):
        return sum(((mods[n].dequantize() - w).pow(2) * m2[n]).sum().item() for n, w in weights.items())

    assert any(not torch.equal(probe[n].codes, plain[n].codes) for n in weights)
    assert weighted(probe) < 0.95 * weighted(plain)


def test_probe_checkpoint_saves_and_reloads_bit_identical(fp_model_dir, load_quantized, logits_of, tmp_path):
    model = load_quantized(fp_model_dir, bits=4, terms=2, group_size=32, act_proxy="probe")
    model.save_pretrained(tmp_path / "q")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert back.config.quantization_config.act_proxy == "probe"
    assert torch.equal(logits_of(model), logits_of(back))


def test_probe_refuses_what_it_cannot_rebuild(fp_model_dir, load_fp, tmp_path):
    config = load_fp(fp_model_dir).config
    with pytest.raises(ValueError, match="act_proxy='probe' needs the FP checkpoint as safetensors"):
        probe_second_moments(config, [])
    from safetensors.torch import load_file, save_file

    (path,) = _files(fp_model_dir)
    state = load_file(path)
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, tmp_path / "partial.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \['model.layers.1.mlp.down_proj.weight'\]"):
        probe_second_moments(config, [str(tmp_path / "partial.safetensors")])


def test_act_proxy_values_are_checked_naming_the_field():
    assert FPxINTConfig(act_proxy="probe").act_proxy == "probe"
    with pytest.raises(
        ValueError, match=r"act_proxy='data' is invalid; allowed: one of \('norm', 'probe', None\)"
    ):
        FPxINTConfig(act_proxy="data")


@pytest.mark.parametrize(("flag", "want"), [("probe", "probe"), ("norm", "norm"), ("none", None)])
def test_cli_act_proxy_flag_reaches_the_config(flag, want):
    from fpxint_hf.cli import _config_from_args
    from fpxint_hf.cli_parser import build_parser

    args = build_parser().parse_args(["quantize", "m", "out", "--act-proxy", flag])
    assert _config_from_args(args).act_proxy == want
