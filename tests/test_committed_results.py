"""The committed results are what this repository's own code makes of its own JSON, and docs/benchmarks.md quotes
them: the markdown files re-render byte for byte, the benchmark's met / missed verdicts are recomputed from its
measured rows, every row of the quoted results tables carries the committed numbers, and the series errors are
recomputed."""

import json
from pathlib import Path

import pytest

from fpxint_hf.evaluation.table import TableResult
from fpxint_hf.expansion import expand, reconstruct, relative_error, rtn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


@pytest.fixture(scope="module")
def eval_scripts(eval_module):
    """The eval scripts' report modules."""
    return eval_module("_bench_report"), eval_module("series_report")


@pytest.fixture(scope="module")
def bench_report(eval_scripts):
    return eval_scripts[0]


@pytest.fixture(scope="module")
def table_json() -> dict:
    return json.loads((RESULTS / "table.json").read_text())


def quoted_row(row: dict) -> str:
    """One row of docs/benchmarks.md's "Results on the embedded model" table."""
    bpw = "32" if row["bits_per_weight"] is None else f"{row['bits_per_weight']:.3f}"
    mmlu = "-" if row["mmlu"] is None else f"{100 * row['mmlu']['overall']:.1f}"
    q = row["quality"]
    return (
        f"| {row['name']} | {bpw} | {mmlu} | {q['perplexity']:.3f} | {q['kl_vs_fp']:.4f} | "
        f"{100 * q['top1_agreement']:.1f}% |"
    )


def test_committed_table_markdown_is_rendered_from_its_json(table_json):
    result = TableResult.from_json(table_json)
    assert result.document() == (RESULTS / "table.md").read_text()
    assert json.dumps(result.to_json(), indent=1) + "\n" == (RESULTS / "table.json").read_text()


def test_docs_quote_the_committed_table(table_json):
    doc = BENCHMARKS.read_text()
    section = doc.split("## Results on the embedded model", 1)[1].split("\n## ", 1)[0]
    assert f"`{table_json['settings']['command']}`" in section
    for row in table_json["rows"]:
        assert quoted_row(row) in section, quoted_row(row)


def quoted_bench_row(row: dict) -> str:
    """One row of docs/benchmarks.md's table of the calibration-free peers."""
    q, dec = row["quality"], row.get("decode_vs_bf16")
    return (
        f"| {row['name']} | {row['bits_per_weight']:.3f} | {q['perplexity']:.3f} | {q['kl_vs_fp']:.4f} | "
        f"{100 * q['top1_agreement']:.1f}% | {'-' if dec is None else format(dec, '.2f')} |"
    )


def test_docs_quote_the_committed_bench():
    result = json.loads((RESULTS / "bench.json").read_text())
    doc = BENCHMARKS.read_text()
    section = doc.split("### Against the calibration-free peers", 1)[1].split("\n## ", 1)[0]
    quoted = [r for r in result["rows"] if "quality" in r and quoted_bench_row(r) in section]
    table_lines = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(quoted) == len(table_lines) >= 8, "every quoted peers row must be a committed bench row"


def test_committed_bench_markdown_is_rendered_from_its_json(bench_report):
    result = json.loads((RESULTS / "bench.json").read_text())
    assert bench_report.to_markdown(result) == (RESULTS / "bench.md").read_text()


def test_committed_bench_targets_follow_from_the_measured_rows(bench_report):
    result = json.loads((RESULTS / "bench.json").read_text())
    assert bench_report.targets({r["name"]: r for r in result["rows"]}) == result["targets"]


def test_committed_series_is_reproduced(eval_scripts):
    """series.md re-renders from series.json, and its 4-bit errors are recomputed on the same seeded matrix."""
    series_report = eval_scripts[1]
    result = json.loads((RESULTS / "series.json").read_text())
    assert series_report.to_markdown(result) == (RESULTS / "series.md").read_text()
    w = series_report.weight_matrix()
    e = expand(w, bits=4, terms=4, group_size=128, series="legacy", fit="minmax")
    errors = [relative_error(reconstruct(e, k), w) for k in range(1, 5)]
    assert errors == pytest.approx(result["errors"]["4-bit"], rel=1e-4)
    assert relative_error(rtn(w, 4, 128), w) == pytest.approx(result["errors"]["rtn"]["4-bit"], rel=1e-4)


def test_pareto_results_re_render_and_the_docs_quote_them(eval_module):
    """pareto.md is what _pareto_report makes of pareto.json (verdicts included), and every row of docs/benchmarks.md's
    quality-per-bit table carries the committed bits, PPL and KL."""
    _pareto_report = eval_module("_pareto_report")
    res = json.loads((RESULTS / "pareto.json").read_text())
    assert (RESULTS / "pareto.md").read_text() == _pareto_report.to_markdown(res)
    verdicts = {t["target"]: t["met"] for t in _pareto_report.targets(res)}
    assert len(verdicts) == 8
    by = {r["label"]: r for r in res["rows"]}
    doc = BENCHMARKS.read_text()
    section = doc[doc.index("## Quality per bit") : doc.index("Targets (recomputed")]
    quoted = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")
    ]
    assert len(quoted) >= 15
    for line in quoted:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = by[cells[0]]
        assert (
            cells[1] == f"{row['bits']:.3f}"
            and cells[2] == f"{row['ppl']:.3f}"
            and cells[4] == f"{row['kl']:.4f}"
        )
    met = sum(verdicts.values())
    assert doc.count("| **met** |") == met and doc.count("| **missed**") == len(verdicts) - met
