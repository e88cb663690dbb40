"""Calibration text and bookkeeping of the GPTQ baseline (eval only; standard library only, so both .venv and
.venv-gptq import it).

The calibration text is the standard library's own docstrings (modules, classes, functions), read with ``ast``
from the source files (nothing is imported, so no module runs). It differs from every evaluation text: the
evaluation uses ``pydoc_data.topics`` (the language reference) and MMLU; ``pydoc_data`` and the test packages
are skipped here, and ``tests/test_gptq_row.py`` checks that no 200-character window of the text used appears in
the pydoc topics.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

# Packages whose docstrings are left out: the evaluation text's own source, and test suites.
SKIPPED = ("pydoc_data", "test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3")


@dataclass(frozen=True)
class Calibration:
    """How the calibration windows are cut: ``samples`` windows of ``seq_len`` tokens, from the stdlib
    docstrings shuffled with ``seed`` and joined (the first ``chars`` characters are tokenized)."""

    samples: int = 16
    seq_len: int = 512
    seed: int = 0
    source: str = "python-stdlib-docstrings-ast"

    @property
    def chars(self) -> int:
        """Characters read: 8 per token is ample for a BPE tokenizer on English prose and code (~4 per token)."""
        return 8 * self.samples * self.seq_len


DEFAULT = Calibration()


def _skipped(rel: Path) -> bool:
    return any(part in SKIPPED for part in rel.parts)


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The pure-Python standard library files, sorted by path relative to the stdlib root."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted((p for p in base.rglob("*.py") if not _skipped(p.relative_to(base))), key=lambda p: str(p))


def docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order (empty ones dropped)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [d.strip() for d in docs if d and d.strip()]


def calibration_text(cal: Calibration = DEFAULT, root: Path | None = None) -> str:
    """The first ``cal.chars`` characters of all stdlib docstrings, de-duplicated, shuffled with ``cal.seed``."""
    seen: dict[str, None] = {}
    for path in stdlib_sources(root):
        for doc in docstrings(path):
            seen.setdefault(doc, None)
    docs = list(seen)
    random.Random(cal.seed).shuffle(docs)
    return "\n\n".join(docs)[: cal.chars]


def gptq_bits_per_weight(bits: int, group_size: int) -> float:
    """What GPTQ stores per weight: the code, plus a float16 scale and an integer zero point of ``bits`` bits
    per group of ``group_size`` (the act-order permutation is folded into the stored layout)."""
    return bits + (16 + bits) / group_size


def cache_key(fp_config: dict, bits: int, group_size: int, cal: Calibration) -> str:
    """Hash of what decides the GPTQ output: the FP model's config, the bits, the group and the calibration."""
    blob = json.dumps(
        {"config": fp_config, "bits": bits, "group_size": group_size, "calibration": asdict(cal)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shared_chunk(text: str, other: str, width: int = 200) -> str | None:
    """A piece of ``text`` found in ``other`` that a shared window of ``width`` characters would contain, or
    ``None``: every ``width``-window of ``text`` holds one of its aligned ``width // 2`` chunks, so when no
    aligned chunk occurs in ``other``, no ``width``-window does either."""
    half = width // 2
    for start in range(0, max(len(text) - half + 1, 0), half):
        if text[start : start + half] in other:
            return text[start : start + half]
    return None
