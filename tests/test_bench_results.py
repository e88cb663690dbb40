"""The committed benchmark results are what the benchmark's own report code makes of its own JSON: the markdown
re-renders byte for byte and every target's met / missed verdict is recomputed from the measured rows."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        import _bench_report

        yield _bench_report
    finally:
        sys.path.remove(str(ROOT / "eval"))


def test_committed_bench_markdown_is_rendered_from_its_json(report):
    result = json.loads((RESULTS / "bench.json").read_text())
    assert report.to_markdown(result) == (RESULTS / "bench.md").read_text()


def test_committed_bench_targets_follow_from_the_measured_rows(report):
    result = json.loads((RESULTS / "bench.json").read_text())
    assert report.targets({r["name"]: r for r in result["rows"]}) == result["targets"]
