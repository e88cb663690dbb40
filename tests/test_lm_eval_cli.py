"""The real ``lm_eval`` CLI (and plain transformers) load an fpxint checkpoint with no ``import fpxint_hf``.

This relies on the start-up hook ``fpxint_hf_autoregister.pth`` that ``pip install`` (regular or editable) puts
into site-packages (``fpxint_hf/_autoregister.py``). Everything runs offline on a tiny LLaMA with a tiny
word-level tokenizer and a fabricated MMLU-format multiple-choice task.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import fpxint_hf
from fpxint_hf import _autoregister
from fpxint_hf.evaluation.testing import tiny_llama
from fpxint_hf.hf.config import QUANT_METHOD

REPO = Path(__file__).resolve().parents[1]
TASK = "fpxint_tiny_mc"
LETTERS = ["A", "B", "C", "D"]
QUESTIONS = [
    ("What colour is the sky on a clear day ?", ["red", "blue", "green", "black"], 1),
    ("How many legs does a cat have ?", ["two", "three", "four", "six"], 2),
    ("Which animal says moo ?", ["cow", "dog", "cat", "bird"], 0),
    ("What is two plus two ?", ["three", "five", "six", "four"], 3),
    ("Which one is a fruit ?", ["stone", "apple", "chair", "shoe"], 1),
]
PROBE_IDS = [[1, 5, 9, 14, 20, 27, 33, 41, 50, 2]]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (_autoregister.ENV_DISABLE, "PYTHONPATH")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    # cwd outside the repository: fpxint_hf must come from the installed distribution, not from sys.path[0].
    return subprocess.run(
        args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )


def _site_packages() -> list[Path]:
    dirs = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return [Path(d) for d in dirs]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm_eval_cli")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path):
    """(dir of the saved fpxint checkpoint + tokenizer, in-process quantized model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "Answer", ":", ".", "?", *LETTERS]
    for question, choices, _ in QUESTIONS:
        words += question.split() + choices
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )

    fp = tiny_llama(128, max_positions=256, hidden_size=64, intermediate_size=128, tie_word_embeddings=False,
                    init_std=None, bos_token_id=1, eos_token_id=2, pad_token_id=3)  # fmt: skip
    assert len(vocab) <= fp.config.vocab_size
    fp_dir, q_dir = workdir / "fp", workdir / "fpxint"
    fp.save_pretrained(fp_dir)
    # this round's options ride along (W4A8 activation series, both input transforms): lm_eval must reload them
    qcfg = fpxint_hf.FPxINTConfig(
        bits=4, terms=2, group_size=32, act_bits=8, act_terms=1, dual_scale=True, rotation="hadamard"
    )
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=qcfg, dtype=torch.float32).eval()
    assert sum(isinstance(m, fpxint_hf.FPxINTLinear) for m in model.modules()) == 14
    model.save_pretrained(q_dir)
    tokenizer.save_pretrained(q_dir)
    assert (
        json.loads((q_dir / "config.json").read_text())["quantization_config"]["quant_method"] == QUANT_METHOD
    )
    return q_dir, model, tokenizer


@pytest.fixture(scope="module")
def task_dir(workdir: Path) -> Path:
    """A 4-choice task in the MMLU format (question / choices / answer index) over local jsonl files."""
    d = workdir / "tasks"
    d.mkdir()
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    for split in ("test", "dev"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{TASK}.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {d / "test.jsonl"}
                dev: {d / "dev.jsonl"}
            test_split: test
            fewshot_split: dev
            output_type: multiple_choice
            doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
            doc_to_choice: ["A", "B", "C", "D"]
            doc_to_target: answer
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            metadata:
              version: 1.0
            """
        )
    )
    return d


# --------------------------------------------------------------------------- the hook is installed and cheap


def test_pth_file_is_generated_and_installed():
    in_repo = (REPO / _autoregister.PTH_NAME).read_text()
    assert in_repo == _autoregister.pth_text(), "regenerate the .pth from fpxint_hf._autoregister.pth_text()"
    installed = [
        d / _autoregister.PTH_NAME for d in _site_packages() if (d / _autoregister.PTH_NAME).exists()
    ]
    assert installed, f"{_autoregister.PTH_NAME} is not in site-packages: run `pip install -e .`"
    assert installed[0].read_text() == in_repo, "the installed .pth is stale: run `pip install -e .` again"
    boot = installed[0].parent / f"{_autoregister.BOOT_MODULE}.py"
    assert boot.is_file() and boot.read_text() == (REPO / boot.name).read_text(), (
        "stale bootstrap: pip install -e ."
    )
    assert "exec(" not in in_repo and len([x for x in in_repo.splitlines() if not x.startswith("#")]) == 1


def test_startup_imports_nothing_heavy(tmp_path: Path):
    code = (
        "import sys; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'fpxint_hf')); "
        "print(heavy, [getattr(f, '_fpxint_hf_autoregister', False) for f in sys.meta_path].count(True))"
    )
    r = _run([sys.executable, "-c", code], tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "[] 1", "")
    r = _run([sys.executable, "-c", code], tmp_path, FPXINT_NO_AUTOREGISTER="1")
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "[] 0", "")


# --------------------------------------------------------------------------- the hook's mechanics, on fakes
# A fake ``transformers`` (no torch: each subprocess takes a fraction of a second) and a fake ``fpxint_hf`` with
# the real ``_autoregister.py``, both first on PYTHONPATH; the installed .pth bootstrap finds them there.

FAKE_HF_OK = (
    "import transformers.quantizers.auto as auto\n"
    "def register():\n    auto.AUTO_QUANTIZATION_CONFIG_MAPPING['fpxint'] = 'FAKE'\n"
    "register()\n"
)
PROBE = (
    "import importlib, sys\n"
    "import transformers.quantizers.auto as a\n"
    "print('IMPORTED', a.AUTO_QUANTIZATION_CONFIG_MAPPING.get('fpxint'), 'fpxint_hf.hf' in sys.modules)\n"
    "importlib.reload(a)\n"
    "print('RELOADED', a.AUTO_QUANTIZATION_CONFIG_MAPPING.get('fpxint'), type(a.__loader__).__name__)\n"
)


def _fakes(root: Path, hf_init: str | None, with_hook: bool = True) -> Path:
    (root / "transformers" / "quantizers").mkdir(parents=True)
    (root / "transformers" / "__init__.py").write_text("")
    (root / "transformers" / "quantizers" / "__init__.py").write_text("")
    (root / "transformers" / "quantizers" / "auto.py").write_text("AUTO_QUANTIZATION_CONFIG_MAPPING = {}\n")
    (root / "fpxint_hf").mkdir()
    (root / "fpxint_hf" / "__init__.py").write_text("")
    if with_hook:
        shutil.copy(Path(_autoregister.__file__), root / "fpxint_hf" / "_autoregister.py")
    if hf_init is not None:
        (root / "fpxint_hf" / "hf").mkdir()
        (root / "fpxint_hf" / "hf" / "__init__.py").write_text(hf_init)
    return root


def _probe(tmp_path: Path, code: str = PROBE, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-W", "always", "-c", code], tmp_path, timeout=60, **env)


def test_hook_registers_after_import_and_on_reload(tmp_path: Path):
    fake = _fakes(tmp_path / "ok", FAKE_HF_OK)
    r = _probe(tmp_path, PYTHONPATH=str(fake))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # registered on import (by the hook) and again after reload; the module keeps its real loader
    assert r.stdout.splitlines() == ["IMPORTED FAKE True", "RELOADED FAKE SourceFileLoader"]


def test_hook_disabled_by_env(tmp_path: Path):
    fake = _fakes(tmp_path / "off", FAKE_HF_OK)
    r = _probe(tmp_path, PYTHONPATH=str(fake), FPXINT_NO_AUTOREGISTER="1")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines() == ["IMPORTED None False", "RELOADED None SourceFileLoader"]


def test_broken_package_warns_but_transformers_imports(tmp_path: Path):
    fake = _fakes(tmp_path / "broken", "raise ImportError('boom from a broken fpxint_hf')\n")
    r = _probe(tmp_path, PYTHONPATH=str(fake))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "IMPORTED None False"
    assert "automatic registration of quant_method 'fpxint' with transformers failed" in r.stderr
    assert "boom from a broken fpxint_hf" in r.stderr


def test_missing_hook_file_is_silent(tmp_path: Path):
    """An fpxint_hf without a readable _autoregister.py: the bootstrap gives up without a sound."""
    fake = _fakes(tmp_path / "nohook", None, with_hook=False)
    assert _probe(tmp_path, "pass", PYTHONPATH=str(fake)).stderr == ""
    r = _probe(tmp_path, PYTHONPATH=str(fake))
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "IMPORTED None False", r.stderr
    assert r.stderr == ""


def test_leftover_pth_without_package_is_silent(tmp_path: Path):
    """fpxint_hf uninstalled but the .pth left behind: run its line by hand in a `python -S` (no site-packages,
    so no fpxint_hf anywhere), then import (fake) transformers."""
    fake = _fakes(tmp_path / "uninstalled", None, with_hook=False)
    shutil.rmtree(fake / "fpxint_hf")
    boot = f"{_autoregister.BOOT_MODULE}.py"
    code = (
        f"import site, sys; sys.path.insert(0, {str(fake)!r}); "
        f"site.addpackage({str(REPO)!r}, {_autoregister.PTH_NAME!r}, set()); "
        "print('HOOK', sum(getattr(f, '_fpxint_hf_autoregister', False) for f in sys.meta_path))\n" + PROBE
    )
    for with_boot, hooks in ((True, "HOOK 1"), (False, "HOOK 0")):  # the bootstrap module left behind, or not
        (fake / boot).unlink(missing_ok=True)
        if with_boot:
            shutil.copy(REPO / boot, fake / boot)
        r = _run([sys.executable, "-S", "-W", "always", "-c", code], tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[:2] == [hooks, "IMPORTED None False"]
        assert r.stderr == ""


# --------------------------------------------------------------------------- real lm_eval CLI and transformers
# The three expensive subprocesses (each imports torch + transformers) run concurrently.

LOAD_SCRIPT = f"""\
import sys, torch
from transformers import AutoModelForCausalLM
before = "fpxint_hf" in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
n = sum(type(m).__name__ == "FPxINTLinear" for m in model.modules())
with torch.no_grad():
    torch.save(model(torch.tensor({PROBE_IDS})).logits, sys.argv[2])
print("RESULT", before, "fpxint" in AUTO_QUANTIZATION_CONFIG_MAPPING, n)
"""


@pytest.fixture(scope="module")
def runs(checkpoint, task_dir: Path, workdir: Path):
    """Start the lm_eval CLI and two plain-transformers loads (hook on / off); return their results."""
    q_dir = checkpoint[0]
    commands = {
        "lm_eval": (
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "hf",
                "--model_args",
                f"pretrained={q_dir},dtype=float32",
                "--tasks",
                TASK,
                "--include_path",
                str(task_dir),
                "--device",
                "cpu",
                "--batch_size",
                "1",
                "--limit",
                "4",
                "--log_samples",
                "--output_path",
                str(workdir / "lm_eval_out"),
            ],
            {"HF_HOME": str(workdir / "hf_home")},
        ),
        "load": ([sys.executable, "-c", LOAD_SCRIPT, str(q_dir), str(workdir / "logits_on.pt")], {}),
        "load_disabled": (
            [sys.executable, "-c", LOAD_SCRIPT, str(q_dir), str(workdir / "logits_off.pt")],
            {"FPXINT_NO_AUTOREGISTER": "1"},
        ),
    }
    procs = {}
    for name, (args, env) in commands.items():
        log = open(workdir / f"{name}.log", "w")  # closed below
        # cwd outside the repository: fpxint_hf must come from the installed distribution.
        procs[name] = (
            subprocess.Popen(args, cwd=workdir, env=_env(**env), stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    results = {}
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        results[name] = (rc, (workdir / f"{name}.log").read_text())
    return results


def test_lm_eval_cli_loads_fpxint_checkpoint(checkpoint, runs, workdir: Path):
    _, model, tokenizer = checkpoint
    rc, log = runs["lm_eval"]
    assert rc == 0, log[-4000:]
    for bad in ("Unknown quantization type", "newly initialized", "not initialized", "MISSING", "UNEXPECTED"):
        assert bad not in log, f"{bad!r} in the lm_eval log:\n{log[-4000:]}"

    out = workdir / "lm_eval_out"
    (results_file,) = out.rglob("results_*.json")
    acc = json.loads(results_file.read_text())["results"][TASK]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0

    # The log-likelihoods lm_eval computed are those of the in-process fpxint model (random weights would
    # differ): recompute every (context, continuation) request the way HFLM does.
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 4
    checked = 0
    for s in samples:
        for args, resp in zip(s["arguments"].values(), s["resps"], strict=True):
            context, continuation = args["arg_0"], args["arg_1"]
            ctx = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            cont = whole[len(ctx) :]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0, -len(cont) :].log_softmax(-1)
            ll = logits.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert math.isclose(ll, float(resp[0][0]), rel_tol=1e-4, abs_tol=1e-4), (ll, resp)
            checked += 1
    assert checked == 16


def test_fresh_process_without_import_loads_fpxint(checkpoint, runs, workdir: Path):
    model = checkpoint[1]
    rc, log = runs["load"]
    assert rc == 0, log[-4000:]
    # fpxint_hf not imported by `from transformers import ...`, registered by the load, 14 FPxINTLinear
    assert "RESULT False True 14" in log, log[-4000:]
    with torch.no_grad():
        expected = model(torch.tensor(PROBE_IDS)).logits
    torch.testing.assert_close(torch.load(workdir / "logits_on.pt"), expected, rtol=0, atol=1e-5)


def test_disabled_hook_does_not_register(runs):
    """Control: with FPXINT_NO_AUTOREGISTER=1 the same load does not get fpxint (so the tests above can fail)."""
    rc, log = runs["load_disabled"]
    assert "RESULT False False 0" in log or rc != 0, log[-4000:]
    assert "RESULT False True" not in log
