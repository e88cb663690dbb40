"""Format 2 of the saved config: the converted layers by name (``quantized_modules``) and their group sizes
(``layer_group_size``), so that a reader (transformers, vLLM) never re-derives them from patterns."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import fpxint_modules
from transformers import AutoModelForCausalLM

FORMAT_2_KEYS = ("quantized_modules", "layer_group_size", "version")


@pytest.fixture
def prefix_skipped(make_fp_dir, load_quantized, tmp_path, caplog):
    """A LLaMA (intermediate 96: down_proj's group 64 falls back to 32) with block 0 kept by a prefix pattern."""
    with caplog.at_level("WARNING"):
        model = load_quantized(
            make_fp_dir("llama_untied", intermediate_size=96),
            bits=4,
            terms=2,
            group_size=64,
            modules_to_not_convert=["model.layers.0"],
        )
    assert "96 inputs: groups of 32" in caplog.text
    out = tmp_path / "q"
    model.save_pretrained(out)
    return model, out


def rewrite_config(path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_saved_config_names_the_converted_layers_and_their_group_sizes(prefix_skipped):
    model, out = prefix_skipped
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    layers = fpxint_modules(model)
    assert saved["version"] == 4  # format 4: format 2's tensors and names, today's defaults
    assert sorted(saved["quantized_modules"]) == sorted(layers)
    assert not any(n.startswith("model.layers.0.") for n in layers) and len(layers) == 7
    assert saved["layer_group_size"] == {"model.layers.1.mlp.down_proj": 32}
    assert layers["model.layers.1.mlp.down_proj"].group_size == 32


@pytest.mark.parametrize("fmt", ["names", "format_1", "names_win_over_patterns"])
def test_reload_converts_the_same_layers(fmt, prefix_skipped, logits_of):
    model, out = prefix_skipped
    if fmt == "format_1":  # a checkpoint of the format before names were saved: patterns are matched again
        rewrite_config(out, lambda q: [q.pop(k) for k in FORMAT_2_KEYS])
    if fmt == "names_win_over_patterns":
        rewrite_config(out, lambda q: q.update(modules_to_not_convert=None, group_size=128))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    layers = fpxint_modules(reloaded)
    assert sorted(layers) == sorted(fpxint_modules(model))
    assert {n: m.group_size for n, m in layers.items()} == {
        n: m.group_size for n, m in fpxint_modules(model).items()
    }
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=0)
    q = reloaded.config.quantization_config
    assert q.version == 4 and sorted(q.quantized_modules) == sorted(layers)  # a re-save writes format 4
