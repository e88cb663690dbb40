"""What ``fpxint`` checks before any work (one-line errors), and the quiet-output helpers of the CLI.

- ``check_folder``: a MODEL / DIR argument that names no existing folder says so (instead of a hub message);
- ``check_hub_id``: a name that is no local path is tried as a hub id: said first, and refused at once offline;
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
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .settings import DEFAULTS, check_settings


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def looks_local(text: str) -> bool:
    """A path rather than a hub id ``org/name`` (a hub id has exactly one ``/`` and no leading ``.``/``/``/``~``)."""
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or os.path.exists(text)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be asked now (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``, or no TCP
    connection to its endpoint within ``timeout`` seconds), else ``None``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the hub is off (HF_HUB_OFFLINE=1)"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"the hub ({constants.ENDPOINT}) is unreachable: {err}"
    return None


def check_hub_id(text: str, what: str) -> str | None:
    """``text`` names no local path, so it can only be a hub id: unless the hub cache holds it, refuse at once when
    the hub cannot be reached (instead of minutes of retries); else return the note to show (``None``: cached)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(text, "config.json"), str):
            return None  # in the local hub cache: loads offline too
    except ValueError:  # not a valid repo id at all
        pass
    reason = hub_unreachable()
    if reason is not None:
        raise UsageError(f"{what} {text}: there is no local folder or file of that name, and {reason}")
    return f"note: there is no local folder or file named {text}; looking it up on the hub"


def check_folder(text: str, what: str, hub_ok: bool = True) -> str | None:
    """``text`` must be an existing folder (or, with ``hub_ok``, something shaped like a hub id ``org/name``, see
    ``check_hub_id``, whose note it returns)."""
    path = Path(text).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        raise UsageError(f"{what} {text} is a file, not a folder")
    if not hub_ok or looks_local(text):
        hub = " (nor a hub id org/name)" if hub_ok else ""
        raise UsageError(f"{what}: the folder {text} does not exist{hub}")
    return check_hub_id(text, what)


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
    for (
        kind
    ) in rows:  # raises ValueError naming the field, e.g. FPxINTConfig.bits=9 (without importing torch)
        if kind in ("t1", "t2", "t3", "rtn", "rtn2x"):
            terms = int(kind[1:]) if kind.startswith("t") else 1
            values = {**DEFAULTS.as_dict(), "bits": args.bits, "terms": terms, "group_size": args.group_size}
            check_settings("FPxINTConfig", values)
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
