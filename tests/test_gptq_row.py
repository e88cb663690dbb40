"""The GPTQ baseline row of eval/ (eval/_gptq_calib.py, eval/_gptq_row.py): its cache key, bits per weight and
calibration text. The build itself runs in .venv-gptq (scripts/install-gptq.sh); its test is skipped without."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GPTQ_PYTHON = REPO / ".venv-gptq" / "bin" / "python"


@pytest.fixture(scope="module")
def calib(eval_module):
    return eval_module("_gptq_calib")


def test_bits_per_weight_counts_code_scale_and_zero(calib):
    assert calib.gptq_bits_per_weight(4, 64) == 4 + (16 + 4) / 64
    assert calib.gptq_bits_per_weight(3, 128) == 3 + (16 + 3) / 128


def test_cache_key_follows_every_setting(calib):
    cal = calib.Calibration()
    config = {"hidden_size": 576, "num_hidden_layers": 30}
    key = calib.cache_key(config, 4, 64, cal)
    assert key == calib.cache_key(dict(reversed(config.items())), 4, 64, cal)
    others = [
        calib.cache_key({**config, "hidden_size": 512}, 4, 64, cal),
        calib.cache_key(config, 3, 64, cal),
        calib.cache_key(config, 4, 128, cal),
        calib.cache_key(config, 4, 64, replace(cal, samples=cal.samples + 1)),
        calib.cache_key(config, 4, 64, replace(cal, seq_len=256)),
        calib.cache_key(config, 4, 64, replace(cal, seed=1)),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_cache_dir_is_under_the_cache_root(eval_module, tmp_path, monkeypatch, make_fp_dir):
    monkeypatch.setenv("FPXINT_CACHE", str(tmp_path / "cache"))
    row = eval_module("_gptq_row")
    fp = make_fp_dir("llama")
    four, three = row.gptq_cache_dir(fp, 4, 64), row.gptq_cache_dir(fp, 3, 64)
    assert four.parent == (tmp_path / "cache" / "gptq").resolve()
    assert four != three and four.name.startswith(f"{fp.name}-w4g64-")


def test_missing_venv_says_how_to_install(eval_module, tmp_path, monkeypatch):
    monkeypatch.setenv("FPXINT_GPTQ_PYTHON", str(tmp_path / "no-venv" / "python"))
    with pytest.raises(FileNotFoundError, match="scripts/install-gptq.sh"):
        eval_module("_gptq_row").gptq_python()


def test_shared_chunk_finds_a_copied_window(calib):
    other = "".join(chr(65 + (i * 7) % 26) for i in range(5000))
    text = "x" * 333 + other[1234:1434] + "y" * 300
    assert calib.shared_chunk(text, other) is not None
    assert calib.shared_chunk(text.replace(other[1300:1301], "#"), other, width=400) is None


def test_calibration_text_never_overlaps_the_evaluation_text(calib):
    """No 200-character window of the calibration text used appears in the pydoc topics (the KL text)."""
    from fpxint_hf.evaluation.assets import pydoc_text

    cal = calib.Calibration()
    text = calib.calibration_text(cal)
    assert len(text) == cal.chars
    assert not any("pydoc_data" in p.parts for p in calib.stdlib_sources())
    assert calib.shared_chunk(text, pydoc_text()) is None


@pytest.mark.slow
@pytest.mark.skipif(
    not GPTQ_PYTHON.is_file(), reason="needs .venv-gptq (llmcompressor): scripts/install-gptq.sh"
)
def test_gptq_row_is_on_the_stored_grid(eval_module, tmp_path, monkeypatch):
    """A shrunk SmolLM2 (real tokenizer) through the .venv-gptq build: every quantized row holds at most 2^bits
    values per group of 64, lm_head/embeddings keep their FP values, bits per weight as stored."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fpxint_hf.evaluation.assets import fp_model_dir

    monkeypatch.setenv("FPXINT_CACHE", str(tmp_path / "cache"))
    src, fp = fp_model_dir(), tmp_path / "fp"
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4))
    cfg.update(dict(num_key_value_heads=2, head_dim=32))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(fp)
    AutoTokenizer.from_pretrained(src).save_pretrained(fp)
    row_mod, cal = eval_module("_gptq_row"), eval_module("_gptq_calib").Calibration(samples=2, seq_len=64)
    row = row_mod.gptq_row(fp, 3, 64, cal)
    assert row["bits"] == 3 + 19 / 64 and row["quant_s"] > 0
    ref = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32)
    got = dict(row["model"].named_parameters())
    for name, p in ref.named_parameters():
        w = got[name].detach()
        if name.endswith("proj.weight"):
            groups = w.reshape(w.shape[0], -1, 64)
            assert max(len(torch.unique(g)) for g in groups.flatten(0, 1)) <= 8, name
            assert not torch.equal(w, p), name
        else:
            assert torch.equal(w, p), name
    meta = json.loads((row_mod.gptq_dir(fp, 3, 64, cal) / "gptq.json").read_text())
    assert meta["regrid_relative_change"] == 0.0 and meta["quantized_layers"] == 7
