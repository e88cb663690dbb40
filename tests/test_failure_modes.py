"""What goes wrong around an FP=xINT model, and how it fails: interrupted saves, a missing plugin, models that
cannot be quantized, group-size fallbacks, and the reproducibility of checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils as modeling_utils
import transformers.utils.hub as hub
from transformers import AutoModelForCausalLM, GPT2Config

import fpxint_hf

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(bits=4, terms=2, group_size=32)


def _peft_at_least(version: str) -> bool:
    import importlib.metadata

    from packaging.version import Version

    try:
        return Version(importlib.metadata.version("peft")) >= Version(version)
    except importlib.metadata.PackageNotFoundError:
        return False


def quantize(path, **config):
    cfg = fpxint_hf.FPxINTConfig(**(config or CONFIG))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg).eval()


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".fpxint-" in p.name)


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


class Boom(OSError):
    pass


@pytest.fixture
def fail_on_shard(monkeypatch):
    """``fail_on_shard(n)``: the n-th safetensors file of the next saves is half written, then the write fails."""

    def arm(n: int = 1, exc: type[BaseException] = Boom):
        real, calls = modeling_utils.safe_save_file, []

        def save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == n:
                real(tensors, filename, metadata=metadata)
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                raise exc("disk full")
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
        return calls

    return arm


# --------------------------------------------------------------------------- interrupted saves


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failed_save_leaves_no_directory(make_fp_dir, tmp_path, fail_on_shard, exc):
    model = quantize(make_fp_dir("qwen2"))
    fail_on_shard(1, exc)
    with pytest.raises(exc):
        model.save_pretrained(tmp_path / "out" / "q")
    assert not (tmp_path / "out" / "q").exists()
    assert leftovers(tmp_path / "out") == []  # the temporary directory is removed too


def test_failed_overwrite_keeps_the_old_checkpoint(make_fp_dir, tmp_path, fail_on_shard, logits_of):
    """Overwriting a sharded checkpoint fails at its second shard: without the crash-safe save the directory would
    mix a new config and first shard with stale shards and index (silently a different model)."""
    out = tmp_path / "q"
    old = quantize(make_fp_dir("qwen2", seed=0))
    old.save_pretrained(out, max_shard_size="40KB")
    (out / "tokenizer.json").write_text("{}")
    before, old_logits = digest(out), logits_of(old)
    assert sum(n.startswith("model-") for n in before) >= 3

    new = quantize(make_fp_dir("qwen2", seed=1), bits=4, terms=3, group_size=32)
    fail_on_shard(2)
    with pytest.raises(Boom):
        new.save_pretrained(out, max_shard_size="40KB")
    assert digest(out) == before
    assert leftovers(tmp_path) == []
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)), old_logits)


def test_overwrite_replaces_weights_and_keeps_other_files(make_fp_dir, tmp_path, logits_of):
    out = tmp_path / "q"
    quantize(make_fp_dir("qwen2", seed=0)).save_pretrained(out, max_shard_size="40KB")
    (out / "tokenizer.json").write_text('{"kept": true}')
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("kept")
    os.chmod(out, 0o750)
    stale = {n for n in os.listdir(out) if n.startswith("model")}

    new = quantize(make_fp_dir("qwen2", seed=1))
    new.save_pretrained(out)  # unsharded: transformers alone would leave the stale shards and their index
    names = set(os.listdir(out))
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "extra"}
    assert stale.isdisjoint(names - {"model.safetensors"})
    assert json.loads((out / "tokenizer.json").read_text()) == {"kept": True}
    assert (out / "extra" / "notes.txt").read_text() == "kept"
    assert os.stat(out).st_mode & 0o777 == 0o750
    assert leftovers(tmp_path) == []
    assert torch.equal(
        logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)), logits_of(new)
    )


@pytest.mark.skipif(
    not _peft_at_least("0.22"),
    reason="transformers' add_adapter needs peft >= 0.22, newer than the newest peft the package registry serves here",
)
def test_overwrite_keeps_weights_it_does_not_supersede(make_fp_dir, tmp_path):
    """Another variant's weights stay; an adapters-only save (transformers' ``add_adapter``) keeps the base
    model's weights and config (it writes no model weights, so it supersedes none)."""
    from fpxint_hf.hf.lora import lora_config

    out = tmp_path / "q"
    model = quantize(make_fp_dir("qwen2"))
    model.save_pretrained(out)
    model.save_pretrained(out, variant="v2")
    base = digest(out)
    assert set(base) == {"config.json", "generation_config.json", "model.safetensors", "model.v2.safetensors"}
    model.add_adapter(lora_config(r=4, target_modules=["q_proj"]))
    model.save_pretrained(out)
    after = digest(out)
    assert set(after) == set(base) | {"adapter_config.json", "adapter_model.safetensors"}
    assert {k: after[k] for k in base} == base


def test_killed_save_leaves_no_directory(make_fp_dir, tmp_path):
    """A process killed in the middle of a save (os._exit, no clean-up runs) leaves the target absent, or the old
    checkpoint untouched; only a hidden ``.<name>.fpxint-tmp-*`` directory remains."""
    fp_dir = make_fp_dir("qwen2")
    quantize(fp_dir).save_pretrained(tmp_path / "old")
    before = digest(tmp_path / "old")
    code = f"""
        import os, fpxint_hf, transformers.modeling_utils as mu
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(
            {str(fp_dir)!r}, quantization_config=fpxint_hf.FPxINTConfig(bits=4, terms=3, group_size=32))
        real = mu.safe_save_file
        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            os._exit(3)  # killed after writing one shard
        mu.safe_save_file = save_file
        model.save_pretrained({str(tmp_path / "new")!r}, max_shard_size="40KB")
        model.save_pretrained({str(tmp_path / "old")!r}, max_shard_size="40KB")
    """
    assert run_python(code, tmp_path).returncode == 3
    assert not (tmp_path / "new").exists()
    assert digest(tmp_path / "old") == before
    assert [n.split(".fpxint-")[1][:4] for n in leftovers(tmp_path)] == ["tmp-"]


def test_push_to_hub_uploads_a_complete_checkpoint(make_fp_dir, tmp_path, monkeypatch, logits_of):
    """``push_to_hub`` saves into a temporary directory and uploads it: the upload sees the whole checkpoint (which
    loads and carries config.json's dtype), and ``save_pretrained(dir, push_to_hub=True)`` still names the repository after ``dir``."""
    model = quantize(make_fp_dir("qwen2"))
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": repo_id})()

    class FakeCard:
        def save(self, path):
            Path(path).write_text("card")

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        loaded = AutoModelForCausalLM.from_pretrained(working_dir, dtype=torch.float32)
        dtype = json.loads((Path(working_dir) / "config.json").read_text())["dtype"]
        uploads.append(
            (repo_id, sorted(os.listdir(working_dir)), torch.equal(logits_of(loaded), logits_of(self)), dtype)
        )

    monkeypatch.setattr(hub, "hf_api", FakeApi)
    monkeypatch.setattr(modeling_utils, "hf_api", FakeApi)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    monkeypatch.setattr(modeling_utils, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)

    model.push_to_hub("me/tiny-fpxint")
    model.save_pretrained(tmp_path / "tiny-local", push_to_hub=True)
    files = ["config.json", "generation_config.json", "model.safetensors"]
    files = ["README.md", *files]  # the model card, written by transformers in both cases
    # the hub copy reloads in the compute dtype, as the local one does (config.json's dtype is written before upload)
    assert model.config.quantization_config.compute_dtype == "bfloat16"
    assert uploads == [("me/tiny-fpxint", files, True, "bfloat16"), ("tiny-local", files, True, "bfloat16")]
    assert sorted(os.listdir(tmp_path / "tiny-local")) == files
    assert leftovers(tmp_path) == []


def test_plain_models_keep_transformers_save(make_fp_dir, tmp_path, fail_on_shard):
    """Only FP=xINT instances get the atomic save (their class is swapped for a subclass of the same name): the
    model class itself is not patched, and a plain model of that class saves as transformers does."""
    q = quantize(make_fp_dir("qwen2"))
    plain = AutoModelForCausalLM.from_pretrained(make_fp_dir("qwen2"))
    assert type(q)._fpxint_atomic_save and type(q).__name__ == type(plain).__name__
    assert isinstance(q, type(plain)) and not hasattr(type(plain), "_fpxint_atomic_save")
    fail_on_shard(1)
    with pytest.raises(Boom):
        plain.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").exists()  # transformers' own, non-atomic behaviour


# --------------------------------------------------------------------------- the plugin is not registered


def test_checkpoint_loaded_without_plugin(make_fp_dir, tmp_path):
    """transformers 5.23 without "fpxint" registered: from_pretrained only warns and returns plain nn.Linear layers
    with random weights.  Nothing of fpxint_hf runs then, so it cannot stop that load; what it does detect: its
    helpers refuse such a model, and importing it before loading fixes the load."""
    q_dir = tmp_path / "q"
    model = quantize(make_fp_dir("qwen2"))
    model.save_pretrained(q_dir)
    ids = [[1, 2, 3, 4]]
    torch.save(model(torch.tensor(ids)).logits, tmp_path / "expected.pt")
    code = f"""
        import sys, torch, transformers
        from transformers import AutoModelForCausalLM
        import transformers.quantizers.auto as auto
        print("REGISTERED", "fpxint" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "fpxint_hf" in sys.modules)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(q_dir)!r}, output_loading_info=True, dtype=torch.float32)
        model, info = m
        print("LAYER", type(model.model.layers[0].self_attn.q_proj).__name__)
        print("MISSING", len(info["missing_keys"]), "UNEXPECTED", len(info["unexpected_keys"]))
        print("SAME", torch.allclose(model(torch.tensor({ids})).logits, expected))
        import fpxint_hf
        try:
            fpxint_hf.set_forward_mode(model, "terms")
        except ValueError as e:
            print("REFUSED", e)
        model = AutoModelForCausalLM.from_pretrained({str(q_dir)!r}, dtype=torch.float32)
        print("AFTER_IMPORT", type(model.model.layers[0].self_attn.q_proj).__name__,
              torch.equal(model(torch.tensor({ids})).logits, expected))
    """
    r = run_python(code, tmp_path, FPXINT_NO_AUTOREGISTER="1", TRANSFORMERS_VERBOSITY="warning")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "REGISTERED False False" in out
    assert "Unknown quantization type, got fpxint" in r.stderr
    assert "LAYER Linear" in out
    assert "MISSING 14 UNEXPECTED 56" in out  # 14 linear weights; codes/scale/zero/terms_used of each
    assert "SAME False" in out
    assert "REFUSED Qwen2ForCausalLM comes from an FP=xINT checkpoint" in out
    assert "AFTER_IMPORT FPxINTLinear True" in out


# --------------------------------------------------------------------------- models that cannot be quantized


def test_conv1d_model_is_refused(tmp_path):
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: nothing to quantize, and the error says why."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"found no nn\.Linear to quantize in GPT2LMHeadModel.*'Conv1D'"):
        quantize(tmp_path / "gpt2")


def test_model_with_nothing_left_to_quantize_is_refused(make_fp_dir):
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match=r"found no nn\.Linear.*modules_to_not_convert=.*down_proj"):
        quantize(make_fp_dir("llama"), **CONFIG, modules_to_not_convert=every)


def test_non_finite_weight_named_through_from_pretrained(make_fp_dir, tmp_path, transformers_log):
    from safetensors.torch import load_file, save_file

    fp_dir = make_fp_dir("llama_untied")
    tensors = load_file(str(fp_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((fp_dir / "config.json").read_text())
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((RuntimeError, ValueError), match="FP=xINT cannot quantize") as info:
        quantize(bad)
    report = f"{info.value}\n{transformers_log.text}"  # transformers' load report carries the cause
    assert (
        "FP=xINT cannot quantize model.layers.0.self_attn.k_proj.weight: weight contains NaN or Inf" in report
    )


def test_per_channel_fallback_end_to_end(make_fp_dir, tmp_path, logits_of, caplog):
    """72 inputs, group_size=64: no power of two >= 16 divides 72, so down_proj falls back to one group per
    channel (with a warning) and the checkpoint reloads bit-exactly."""
    fp_dir = make_fp_dir("llama_untied", intermediate_size=72)
    with caplog.at_level("WARNING"):
        model = quantize(fp_dir, bits=4, terms=2, group_size=64)
    assert "72 inputs: one group per output channel" in caplog.text
    down = model.model.layers[0].mlp.down_proj
    assert (down.group_size, tuple(down.scale.shape)) == (72, (64, 1))
    assert model.model.layers[0].mlp.up_proj.group_size == 64
    model.save_pretrained(tmp_path / "q")
    with warnings.catch_warnings(record=True) as caught:  # the group size is read back, not derived again
        warnings.simplefilter("always")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert not [w for w in caught if "does not divide" in str(w.message)]
    assert reloaded.model.layers[0].mlp.down_proj.group_size == 72
    assert torch.equal(logits_of(reloaded), logits_of(model))


# --------------------------------------------------------------------------- determinism

DETERMINISM_CONFIGS = {
    "plain": dict(bits=4, terms=2, group_size=32),
    "outliers_search": dict(bits=4, terms=3, group_size=32, outlier_fraction=0.03, clip="search"),
    "outliers_laplace_sym": dict(bits=3, terms=2, group_size=None, symmetric=True, outlier_fraction=0.05),
}


def test_checkpoints_are_bit_identical_across_runs(make_fp_dir, tmp_path):
    """The same FP checkpoint and config give byte-identical checkpoint files: twice in fresh processes (torch's
    default thread count) and once here (one thread)."""
    fp_dir = make_fp_dir("qwen2")
    code = f"""
        import sys, fpxint_hf
        from transformers import AutoModelForCausalLM
        for name, cfg in {DETERMINISM_CONFIGS!r}.items():
            AutoModelForCausalLM.from_pretrained(
                {str(fp_dir)!r}, quantization_config=fpxint_hf.FPxINTConfig(**cfg)
            ).save_pretrained(f"{{sys.argv[-1]}}/{{name}}")
    """
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), str(out)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(digest(out))
    for name, cfg in DETERMINISM_CONFIGS.items():
        quantize(fp_dir, **cfg).save_pretrained(tmp_path / "here" / name)
    runs.append(digest(tmp_path / "here"))
    assert len(runs[0]) == 3 * len(
        DETERMINISM_CONFIGS
    )  # config.json, generation_config.json, model.safetensors
    assert runs[0] == runs[1] == runs[2]
    # and the configs do differ from each other (the comparison is not vacuous)
    weights = {runs[0][f"{n}/model.safetensors"] for n in DETERMINISM_CONFIGS}
    assert len(weights) == len(DETERMINISM_CONFIGS)
