"""A newcomer's second hour (issue 18): the reload dtype, and bad input answered early in one named line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fpxint_hf
from fpxint_hf.cli import main
from fpxint_hf.cli_checks import each_warning_once
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fp")
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(d)  # float32
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q"
    assert main(["quantize", str(tiny_dir), str(out), "--group-size", "32"]) == 0
    return out


def one_error_line(capsys, argv, match, status=2) -> str:
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("fpxint: ")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- reload dtype


def test_reload_defaults_to_the_recorded_compute_dtype(quantized):
    """A float32 model quantized without a compute dtype reloads in bfloat16 (the fast path); ``dtype=`` wins."""
    saved = json.loads((quantized / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["quantization_config"]["compute_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(quantized).dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32).dtype == torch.float32


def test_an_explicit_compute_dtype_is_kept(tiny_dir, tmp_path):
    cfg = fpxint_hf.FPxINTConfig(group_size=32, terms=1, compute_dtype="float32")
    AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg).save_pretrained(tmp_path / "q")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "q").dtype == torch.float32
    with pytest.raises(ValueError, match=r"FPxINTConfig\.compute_dtype='int8' is invalid"):
        fpxint_hf.FPxINTConfig(compute_dtype="int8")


def test_a_checkpoint_without_compute_dtype_loads_as_before(quantized, tmp_path):
    """Checkpoints written before ``compute_dtype`` keep their recorded dtype (nothing is guessed for them)."""
    old = tmp_path / "old"
    old.mkdir()
    for f in quantized.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]["compute_dtype"]
    config["dtype"] = "float32"
    (old / "config.json").write_text(json.dumps(config))
    assert AutoModelForCausalLM.from_pretrained(old).dtype == torch.float32


# --------------------------------------------------------------------------- checkpoints


def truncated_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    weights = dst / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return dst


class RefusingApi:
    def create_repo(self, *args, **kwargs):
        raise AssertionError("no upload may start for an invalid checkpoint")

    upload_folder = create_repo


def test_push_refuses_a_truncated_checkpoint_before_uploading(quantized, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RefusingApi)
    bad = truncated_copy(quantized, tmp_path / "bad")
    line = one_error_line(capsys, ["push", str(bad), "me/tiny"], "the checkpoint is incomplete")
    assert str(bad / "model.safetensors") in line and "truncated" in line


def test_push_refuses_a_checkpoint_missing_a_tensor(quantized, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RefusingApi)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in quantized.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.scale"], tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    line = one_error_line(capsys, ["push", str(bad), "me/tiny"], "is incomplete: missing")
    assert "model.layers.1.mlp.down_proj.scale" in line and "model.norm.weight" in line


def test_random_codes_load_silently_as_the_docs_say(quantized, tmp_path):
    """Every byte of a 4-bit nested series is a valid pair of codes: random bytes cannot be detected cheaply."""
    bad = tmp_path / "noise"
    bad.mkdir()
    for f in quantized.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.codes"
    tensors[key] = torch.randint(
        0, 256, tensors[key].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    AutoModelForCausalLM.from_pretrained(bad)  # loads: nothing to check a nested code against
    doc = (ROOT / "docs" / "safety.md").read_text()
    assert "random bytes in a `.codes` tensor of a nested series load silently" in doc


# --------------------------------------------------------------------------- CLI arguments


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "--limit", "-1"], "--limit -1 is invalid"),
        (["eval", "--bits", "9"], "FPxINTConfig.bits=9 is invalid"),
        (["eval", "--rows", "t1,t9"], "rows=['t9'] unknown"),
        (["eval", "--rows", "t1,t1"], "rows=['t1'] repeated"),
        (["eval", "--tokens", "100"], "--tokens 100 is invalid"),
        (["eval", "--context", "1"], "--context 1 is invalid"),
        (["eval", "--model", "./no/such/model"], "--model: the folder ./no/such/model does not exist"),
    ],
)
def test_eval_arguments_are_checked_before_any_work(argv, match, capsys, monkeypatch):
    import fpxint_hf.evaluation.table as table

    monkeypatch.setattr(table, "run_table", lambda **kw: pytest.fail("run_table started"))
    one_error_line(capsys, argv, match)


def test_missing_folders_are_named(tmp_path, capsys):
    gone = str(tmp_path / "gone")
    one_error_line(capsys, ["inspect", gone], f"DIR: the folder {gone} does not exist")
    one_error_line(capsys, ["push", gone, "me/tiny"], f"DIR: the folder {gone} does not exist")
    one_error_line(capsys, ["push", "me/tiny", "me/tiny"], "DIR: the folder me/tiny does not exist")


@pytest.mark.parametrize(
    "argv",
    [["quantize", "does-not-exist", "OUT"], ["quantize", "org/model", "OUT"], ["inspect", "org/model"]],
)
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_name_that_is_no_local_path_fails_at_once_offline(argv, offline, tmp_path, capsys, monkeypatch):
    """``fpxint quantize does-not-exist OUT`` with no hub: one line saying there is no such local path, before
    anything loads (not minutes of hub retries)."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        reason = "the hub is off (HF_HUB_OFFLINE=1)"
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
        reason = "the hub (http://127.0.0.1:9) is unreachable"
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loading started")
    )
    one_error_line(capsys, argv, f"{argv[1]}: there is no local folder or file of that name, and {reason}")


def test_a_hub_id_is_announced_before_the_hub_is_asked(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    import fpxint_hf.cli_checks as checks

    def from_pretrained(*args, **kwargs):
        assert "no local folder or file named org/model; looking it up on the hub" in capsys.readouterr().err
        raise OSError("org/model is not a model on the hub")

    monkeypatch.setattr(checks, "hub_unreachable", lambda: None)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    one_error_line(capsys, ["quantize", "org/model", "OUT"], "org/model is not a model on the hub")


def test_a_group_size_that_fits_no_layer_is_one_line(tiny_dir, tmp_path, capsys):
    """``--group-size 24`` divides neither 32 nor 64 inputs: refused before anything is written."""
    argv = ["quantize", str(tiny_dir), str(tmp_path / "o"), "--group-size", "24"]
    line = one_error_line(
        capsys, argv, "FPxINTConfig.group_size=24 divides the inputs of none of the 14 layers"
    )
    assert "(in_features 32, 64)" in line and "e.g. 16" in line
    assert not (tmp_path / "o").exists()
    argv = ["eval", "--model", str(tiny_dir), "--group-size", "24", "--limit", "0", "--rows", "rtn,t1"]
    line = one_error_line(
        capsys, argv + ["--tokens", "64", "--context", "32"], "group_size=24 divides the inputs"
    )


def test_skip_of_an_unknown_module_names_the_closest(tiny_dir, tmp_path, capsys):
    argv = ["quantize", str(tiny_dir), str(tmp_path / "o"), "--group-size", "32", "--skip", "q_prj"]
    line = one_error_line(capsys, argv, "'q_prj' matches no module")
    assert "closest module names: q_proj" in line
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_ctrl_c_during_quantize_is_one_line_and_status_130(tiny_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", interrupted)
    one_error_line(capsys, ["quantize", str(tiny_dir), str(tmp_path / "o")], "fpxint: interrupted", 130)
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone too


def test_quantize_removes_temp_folders_of_killed_runs(tiny_dir, tmp_path, capsys):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)  # that process has exited
    stale = [tmp_path / f".o.tmp-{dead}-0123abcd", tmp_path / f"..o.tmp-{dead}-0123abcd.fpxint-tmp-9"]
    live = tmp_path / f".o.tmp-{os.getpid()}-4567cdef"  # a run still going: left alone
    for d in (*stale, live):
        d.mkdir()
    assert main(["quantize", str(tiny_dir), str(tmp_path / "o"), "--group-size", "32", "--terms", "1"]) == 0
    assert "left by an interrupted run" in capsys.readouterr().err
    assert not any(d.exists() for d in stale) and live.is_dir()


def test_debug_lets_the_exception_propagate_with_status_1(tmp_path):
    """What docs/cli.md says of ``--debug``: the traceback, exit status 1 (a plain run: one line, status 2)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fpxint_hf.cli", "--debug", "push", str(tmp_path / "gone"), "me/x"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr and "does not exist" in done.stderr
    assert (
        "fpxint --debug ...                          # tracebacks instead of one-line errors (exit status 1)"
        in (ROOT / "docs" / "cli.md").read_text()
    )


def test_terms_help_shows_the_real_default(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "(default one per --bits width; one width: 2 under --bits-budget bits+0.5, the default recipe)"
        in help_text
    )
    assert "default None" not in help_text


# --------------------------------------------------------------------------- output noise


def test_each_warning_and_log_line_is_shown_once(capsys):
    logger = logging.getLogger("lm_eval.some.module")
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as shown:
            # every occurrence reaches the display: only the dedupe can drop it
            warnings.simplefilter("always")
            with each_warning_once():
                for _ in range(3):
                    warnings.warn("group_size=128 does not divide in_features=576", UserWarning, stacklevel=1)
                    logger.warning("Overwriting default num_fewshot of mmlu_x from None to 0")
                logger.warning("another message")
    finally:
        logging.getLogger().removeHandler(handler)
    assert [str(w.message) for w in shown] == ["group_size=128 does not divide in_features=576"]
    err = capsys.readouterr().err
    assert err.count("Overwriting default num_fewshot") == 1 and err.count("another message") == 1


def test_python_api_errors_are_one_line_value_errors(quantized, tmp_path):
    with pytest.raises(ValueError) as info:
        fpxint_hf.FPxINTConfig(bitz=4)
    assert "\n" not in str(info.value) and "bitz" in str(info.value)
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in quantized.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.scale"][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(bad)
    assert "\n" not in str(info.value) and "up_proj.scale (holds NaN or Inf)" in str(info.value)
