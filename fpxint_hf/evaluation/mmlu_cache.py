"""Resumable MMLU scoring: a fixed question set, each question's four choice log-likelihoods scored by lm-eval and
appended to a per-row JSONL cache as soon as they are known, so a killed run resumes where it stopped.

Question set (:func:`select_questions`): stratified by subject, each subject's share proportional to its size in
the full test split (largest-remainder rounding), the questions inside a subject taken in a seeded hash order of
their index. Nothing but the subject sizes and the seed enters the choice: never a score, never a prompt. Run
order (:func:`run_order`) is round-robin over the subjects, so a run cut short covers every subject about evenly.

Cache (one JSONL file per row): the first line is the header (``key``: a hash of the row name, the FP model's
hash, the row's settings and the scoring settings; ``info``: what was hashed plus bits per weight and versions);
every further line is one question, ``{"q": "<subject>/<index>", "ll": [4 floats], "s": seconds}``, or a
``{"resumed": ...}`` record of a later session. A header whose key differs from the current one makes the file
stale: it is started afresh. A line cut short by a kill is dropped on the next read.

Scoring (:class:`LMEvalScorer`): lm-eval's own request building (``Task.build_all_requests``, 0-shot, the stock
prompts) and its ``HFLM.loglikelihood``, one question (its four requests, one shared context) per call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mmlu_data import MMLUTaskSetup, stock_mmlu_dir

logger = logging.getLogger(__name__)

DECIMALS = 6
"""Log-likelihoods are stored rounded to this many decimals (answer KL and argmax are unaffected at 1e-6)."""


@dataclass(frozen=True)
class Question:
    """One MMLU test question: ``qid`` is ``"<subject>/<index in the subject's test split>"``; ``answer`` the
    correct choice (0-3)."""

    subject: str
    index: int
    question: str
    answer: int

    @property
    def qid(self) -> str:
        return f"{self.subject}/{self.index}"


def subject_categories() -> dict[str, str]:
    """lm-eval's stock subject -> category map (``humanities``, ``stem``, ``social_sciences``, ``other``), read
    from the ``tag: mmlu_<category>_tasks`` of each ``tasks/mmlu/default/mmlu_<subject>.yaml``."""
    import yaml

    out = {}
    for path in sorted(stock_mmlu_dir().glob("mmlu_*.yaml")):
        tag = yaml.safe_load(path.read_text())["tag"]
        out[path.stem.removeprefix("mmlu_")] = tag.removeprefix("mmlu_").removesuffix("_tasks")
    return out


def quotas(counts: dict[str, int], target: int) -> dict[str, int]:
    """``target`` questions split over subjects in proportion to ``counts`` (largest remainder, ties by name)."""
    total = sum(counts.values())
    exact = {s: target * n / total for s, n in counts.items()}
    out = {s: int(v) for s, v in exact.items()}
    by_remainder = sorted(counts, key=lambda s: (-(exact[s] - out[s]), s))
    for s in by_remainder[: target - sum(out.values())]:
        out[s] += 1
    return out


def _rank(seed: str, subject: str, index: int) -> str:
    return hashlib.sha256(f"{seed}/{subject}/{index}".encode()).hexdigest()


def select_questions(rows: list[dict[str, Any]], target: int, seed: str) -> list[Question]:
    """The question set: per subject its proportional quota (:func:`quotas`) of the questions that come first
    in the seeded hash order of their index; returned in :func:`run_order`."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    quota = quotas({s: len(v) for s, v in by_subject.items()}, target)
    chosen: dict[str, list[Question]] = {}
    for subject, items in sorted(by_subject.items()):
        order = sorted(range(len(items)), key=lambda i: _rank(seed, subject, i))
        chosen[subject] = [
            Question(subject, i, items[i]["question"], items[i]["answer"]) for i in order[: quota[subject]]
        ]
    return run_order(chosen)


def run_order(chosen: dict[str, list[Question]]) -> list[Question]:
    """Round-robin over the subjects (sorted): every subject's first question, then every second one, ..."""
    out = []
    for k in range(max(map(len, chosen.values()), default=0)):
        out += [qs[k] for _, qs in sorted(chosen.items()) if k < len(qs)]
    return out


def questions_digest(questions: Iterable[Question]) -> str:
    """A short hash of the question ids and texts (what the cache's scores refer to)."""
    text = json.dumps([(q.qid, q.question) for q in questions], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_digest(fp_dir: str | os.PathLike[str]) -> str:
    """The FP model's identity: the hash of its provenance record when it has one (it names the source file's
    SHA-256), else of its ``config.json`` and weight files."""
    from .assets import PROVENANCE

    folder = Path(fp_dir)
    files = [folder / PROVENANCE] if (folder / PROVENANCE).is_file() else []
    files = files or [
        folder / "config.json",
        *sorted(folder.glob("*.safetensors")),
        *sorted(folder.glob("*.bin")),
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(identity: dict[str, Any]) -> str:
    """Hash of the canonical JSON of what a row's scores depend on."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CacheContent:
    """What a row's cache file holds: its header (``None``: no file, or stale), scores and seconds by qid."""

    header: dict[str, Any] | None
    scores: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sessions: list[dict[str, Any]] = field(default_factory=list)


def _complete_lines(path: Path) -> list[str]:
    """The file's complete lines; a trailing fragment (a write cut short) is cut off the file itself."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping an incomplete last line (%d bytes)", path, len(data) - end)
        with path.open("r+b") as fh:
            fh.truncate(end)
    return data[:end].decode().splitlines()


def read_cache(path: str | os.PathLike[str], key: str | None = None) -> CacheContent:
    """The cache at ``path``; with ``key``, a file written under another key reads as empty (stale)."""
    path = Path(path)
    if not path.is_file():
        return CacheContent(None)
    lines = _complete_lines(path)
    header = json.loads(lines[0]) if lines else None
    if header is None or (key is not None and header.get("key") != key):
        return CacheContent(None)
    out = CacheContent(header)
    for line in lines[1:]:
        rec = json.loads(line)
        if "q" in rec:
            out.scores[rec["q"]], out.seconds[rec["q"]] = rec["ll"], rec["s"]
        else:
            out.sessions.append(rec)
    return out


class CacheWriter:
    """Appends scored questions to a row's cache, flushed and synced per question. Opening it on a missing or
    stale file writes a fresh header; on a current one it appends a ``resumed`` record."""

    def __init__(self, path: str | os.PathLike[str], key: str, info: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        current = read_cache(self.path, key).header is not None
        if self.path.is_file() and not current:
            logger.warning("%s: written under other settings; starting it afresh", self.path)
        self._fh = self.path.open("a" if current else "w", encoding="utf-8")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write({"resumed": stamp, **info} if current else {"key": key, "started": stamp, **info})

    def _write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def add(self, qid: str, logliks: list[float], seconds: float) -> None:
        self._write({"q": qid, "ll": [round(v, DECIMALS) for v in logliks], "s": round(seconds, 2)})

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LMEvalScorer:
    """lm-eval's requests for a fixed question set, built once; :meth:`score` runs one question's four."""

    def __init__(self, setup: MMLUTaskSetup, questions: list[Question]) -> None:
        tasks = setup.task_manager.load(setup.tasks)["tasks"]
        self._requests: dict[str, list[Any]] = {}
        by_subject: dict[str, list[Question]] = {}
        for q in questions:
            by_subject.setdefault(q.subject, []).append(q)
        for subject, qs in sorted(by_subject.items()):
            task = tasks[f"mmlu_{subject}"]
            wanted = sorted(qs, key=lambda q: q.index)
            for q in wanted:
                doc = task.eval_docs[q.index]
                if (doc["question"], doc["answer"]) != (q.question, q.answer):
                    raise ValueError(f"{q.qid}: lm-eval's document is another question than the selected one")
            # with ``samples`` lm-eval numbers the chosen documents 0..k-1 in their split order
            task.build_all_requests(samples=[q.index for q in wanted])
            for inst in task.instances:
                self._requests.setdefault(wanted[inst.doc_id].qid, []).append(inst)
        counts = Counter(len(v) for v in self._requests.values())
        if set(counts) != {4}:
            raise ValueError(f"expected 4 requests per question, got {dict(counts)}")

    def score(self, lm: Any, qid: str) -> list[float]:
        """The four choice log-likelihoods (A..D) lm-eval's ``lm.loglikelihood`` gives question ``qid``."""
        reqs = sorted(self._requests[qid], key=lambda inst: inst.idx)
        return [float(ll) for ll, _greedy in lm.loglikelihood(reqs, disable_tqdm=True)]


def score_into_cache(
    lm: Any,
    scorer: LMEvalScorer,
    questions: list[Question],
    writer: CacheWriter,
    done: Iterable[str],
    stop_after: int | None = None,
    deadline: float | None = None,
) -> int:
    """Score every question of ``questions`` not in ``done``, each appended to ``writer`` as it finishes; stop
    after ``stop_after`` new questions or once ``time.perf_counter()`` passes ``deadline`` (``None``: no limit).
    Returns how many were scored."""
    skip, n = set(done), 0
    for q in questions:
        if q.qid in skip:
            continue
        if (stop_after is not None and n >= stop_after) or (
            deadline is not None and time.perf_counter() > deadline
        ):
            break
        start = time.perf_counter()
        logliks = scorer.score(lm, q.qid)
        writer.add(q.qid, logliks, time.perf_counter() - start)
        n += 1
    return n
