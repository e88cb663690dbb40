"""What ``fpxint`` checks before any work (one-line errors), and the quiet-output helpers of the CLI.

- ``check_folder``: a MODEL / DIR argument that names no existing folder says so (instead of a hub message);
- ``check_eval_args``: every ``fpxint eval`` argument, before the model loads;
- ``remove_stale_temp_dirs``: temporary folders of ``fpxint quantize`` runs whose process is gone (``kill -9``);
- ``each_warning_once``: repeated warnings and log lines (lm-eval's, the group-size fallback's) shown once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def group_size_arg(text: str) -> int | None:
    """argparse type of ``--group-size``: an int, or ``none``/``channel`` for per channel."""
    if text.lower() in ("none", "channel"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or 'none'") from None


def bits_arg(text: str) -> int | list[int]:
    """argparse type of ``--bits``: ``4`` or one width per term, ``4,2``."""
    try:
        widths = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an int or a comma-separated list of ints"
        ) from None
    return widths[0] if len(widths) == 1 else widths


def looks_local(text: str) -> bool:
    """A path rather than a hub id ``org/name`` (a hub id has exactly one ``/`` and no leading ``.``/``/``/``~``)."""
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or os.path.exists(text)


def check_folder(text: str, what: str, hub_ok: bool = True) -> None:
    """``text`` must be an existing folder (or, with ``hub_ok``, something shaped like a hub id ``org/name``)."""
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"{what} {text} is a file, not a folder")
    if not hub_ok or looks_local(text):
        hub = " (nor a hub id org/name)" if hub_ok else ""
        raise UsageError(f"{what}: the folder {text} does not exist{hub}")


def temp_prefix(out: Path) -> str:
    """Prefix of the temporary folder of a quantize run into ``out``: carries this process's id."""
    return f".{out.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Delete the temporary folders beside ``out`` left by killed quantize runs (their process is gone), and the
    save folders inside them; return what was removed.  Folders of live runs are left alone."""
    pattern = re.compile(rf"^\.{{1,2}}{re.escape(out.name)}\.tmp-(\d+)-")
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _alive(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_eval_args(args: argparse.Namespace, row_kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Validate every ``fpxint eval`` argument (the rows it returns) before anything loads."""
    from .hf import FPxINTConfig

    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit {args.limit} is invalid: questions per subject, >= 1, or 0 to skip MMLU")
    if args.context < 2:
        raise UsageError(f"--context {args.context} is invalid: a window of at least 2 tokens")
    if args.tokens < args.context:
        raise UsageError(f"--tokens {args.tokens} is invalid: at least one window (--context {args.context})")
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = sorted(set(rows) - set(row_kinds))
    if bad or not rows:
        raise UsageError(f"--rows {args.rows!r}: rows={bad} unknown; allowed: {','.join(row_kinds)}")
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    if repeated:
        raise UsageError(f"--rows {args.rows!r}: rows={repeated} repeated; name each row once")
    for kind in rows:
        if kind in ("t1", "t2", "t3"):  # raises ValueError naming the field, e.g. FPxINTConfig.bits=9
            FPxINTConfig(bits=args.bits, terms=int(kind[1:]), group_size=args.group_size)
        elif kind in ("rtn", "rtn2x"):
            FPxINTConfig(bits=args.bits, terms=1, group_size=args.group_size)
    if args.model is not None:
        check_folder(args.model, "--model")
    return rows


class _OnceFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def each_warning_once() -> Iterator[None]:
    """Show each distinct warning (``warnings`` or a WARNING log record) once while the block runs."""
    once = _OnceFilter()
    shown: set[tuple[str, type]] = set()
    original = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        key = (str(message), category)
        if key not in shown:
            shown.add(key)
            original(message, category, filename, lineno, file, line)

    handle = logging.Logger.handle  # called once per record, on the logger that made it (lm-eval's own too)

    def handle_once(self: logging.Logger, record: logging.LogRecord) -> None:
        if once.filter(record):
            handle(self, record)

    with warnings.catch_warnings():
        warnings.showwarning = showwarning
        logging.Logger.handle = handle_once  # type: ignore[method-assign]
        try:
            yield
        finally:
            logging.Logger.handle = handle  # type: ignore[method-assign]
