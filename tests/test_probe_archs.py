"""The default's probe on decoders other than LLaMA/Qwen (tiny models built from a config): a block list nested
in the base model (OPT's ``decoder.layers``, learned positions) is found and measured; a checkpoint whose weights
transformers converts on load (fused MoE experts) falls back to ``act_proxy="norm"`` with a warning."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import fpxint_modules
from transformers import AutoConfig, AutoModelForCausalLM

from fpxint_hf import FPxINTConfig
from fpxint_hf.hf.probe import PROBE_SEED, probe_second_moments, probe_tokens

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, pad_token_id=0)


def _save(tmp_path, arch: str, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY, **extra)).eval()
    model.save_pretrained(tmp_path / arch)
    return tmp_path / arch, model


def test_probe_finds_opts_nested_blocks_and_measures_the_fp_models_energies(tmp_path, caplog):
    fp_dir, fp = _save(tmp_path, "opt", ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64)
    files = [str(p) for p in fp_dir.glob("*.safetensors")]
    m2 = probe_second_moments(fp.config, files)
    seen: dict[str, torch.Tensor] = {}
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(  # OPT flattens the tokens before fc1
                lambda _m, a, name=name: seen.__setitem__(
                    name, a[0].reshape(-1, a[0].shape[-1]).pow(2).mean(0)
                )
            )
    tokens = probe_tokens(fp.config)
    assert tokens == 64  # OPT's learned position table has 64 rows here (+2 offset rows): no id beyond them
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad():
        fp(input_ids=ids)
    assert m2.keys() == seen.keys() and all(n.startswith("model.decoder.layers.") for n in m2)
    assert len(m2) == 6 * fp.config.num_hidden_layers  # q, k, v, out_proj, fc1, fc2
    for name, want in seen.items():
        assert torch.allclose(m2[name], want, rtol=1e-5, atol=1e-7), name
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=FPxINTConfig(), dtype=torch.float32)
    assert len(fpxint_modules(q)) == len(m2)
    assert "using act_proxy='norm' instead" not in caplog.text  # the probe ran


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_default_falls_back_to_the_norm_proxy_where_transformers_converts_the_weights(arch, tmp_path, caplog):
    """transformers v5 fuses the experts of MoE checkpoints on load (``experts.gate_up_proj``): the files do not
    hold the model's own names, so the probe cannot read its blocks; the default still quantizes the model."""
    fp_dir, fp = _save(
        tmp_path, arch, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64
    )
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=FPxINTConfig(), dtype=torch.float32)
    assert "experts" in caplog.text and "using act_proxy='norm' instead" in caplog.text
    layers = fpxint_modules(q)
    assert any(".self_attn." in n for n in layers)
    assert not any(".experts." in n for n in layers)  # fused experts are 3-D parameters, not nn.Linear
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fp(input_ids=ids).logits, q(input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99, float(cos)


@pytest.mark.parametrize("arch", ["mistral", "gemma", "phi3", "gpt_neox", "qwen3"])
def test_default_probes_other_decoders_and_reloads_bit_identical(arch, tmp_path, caplog):
    """The architectures the README names: the probe runs (no fallback), every block's linears are quantized
    and the saved model reloads to the same logits."""
    extra = {"num_key_value_heads": 2} if arch != "gpt_neox" else {}
    fp_dir, fp = _save(tmp_path, arch, intermediate_size=128, max_position_embeddings=64, **extra)
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=FPxINTConfig(), dtype=torch.float32)
    assert "using act_proxy='norm' instead" not in caplog.text
    blocks = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(fpxint_modules(q)) == sorted(blocks)
    q.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, back(input_ids=ids).logits)
