"""Committed benchmark results: one ``.json`` (the numbers) and one ``.md`` (rendered from that JSON) per run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(
    out: str | Path, result: dict[str, Any], render: Callable[[dict[str, Any]], str], indent: int = 1
) -> str:
    """Write ``out``.json (``result``) and ``out``.md (``render(result)``), creating the folder; return the
    markdown.  The tests re-render each committed ``.md`` from its ``.json`` with the same ``render``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=indent) + "\n")
    md = render(result)
    out.with_suffix(".md").write_text(md)
    return md
