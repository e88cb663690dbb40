"""``eval/bench_speed.py``: the committed speed report re-renders from its JSON, its verdicts are recomputed from
the measured numbers, and the bytes it counts per decoded token are the bytes the int4 backend holds."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from fpxint_hf import kernels
from fpxint_hf.linear import FPxINTLinear

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"


@pytest.fixture(scope="module")
def speed_modules(eval_module):
    return eval_module("_speed_report"), eval_module("bench_speed")


@pytest.fixture(scope="module")
def speed_json() -> dict:
    return json.loads((RESULTS / "speed.json").read_text())


def test_committed_speed_markdown_is_rendered_from_its_json(speed_modules, speed_json):
    report, _ = speed_modules
    assert report.to_markdown(speed_json) == (RESULTS / "speed.md").read_text()


def test_committed_speed_verdicts_follow_from_the_measured_numbers(speed_modules, speed_json):
    report, _ = speed_modules
    assert report.targets(speed_json) == speed_json["targets"]
    by = {r["name"]: r for r in speed_json["rows"]}
    for name, row in by.items():  # limit = bandwidth / bytes, recomputed from the raw samples
        limit = report.bandwidth(speed_json) / row["decode_bytes"]["total"]
        assert report.derived(speed_json)[name]["limit_tok_s"] == pytest.approx(limit)
        steps = speed_json["settings"]["decode_steps"]
        assert row["decode_tok_s"] == pytest.approx(steps / statistics.median(row["decode_s"]))


def test_committed_rows_are_the_declared_rows(speed_modules, speed_json):
    _, bench = speed_modules
    declared = [(r.name, r.config, r.forward_mode) for r in bench.ROWS]
    assert [(r["name"], r["config"], r["forward_mode"]) for r in speed_json["rows"]] == declared


@pytest.mark.skipif(bool(kernels._ops_missing(kernels._INT4_OPS)), reason="no CPU int4 ops")
@pytest.mark.parametrize("terms", [1, 2])
def test_decode_bytes_count_the_prepared_int4_weights(speed_modules, terms):
    _, bench = speed_modules
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192, bias=False)
    m = FPxINTLinear.from_linear(lin, terms=terms, group_size=64).bfloat16()
    m.forward_mode = "int4"
    m(torch.randn(1, 576, dtype=torch.bfloat16))
    codes = terms * 192 * 576 // 2  # 4 bits per weight per term
    table = terms * (576 // 64) * 192 * 2 * 2  # bf16 (scale, zero) per term, group and row
    assert bench.tensor_bytes(m._kernel_cache[2]) == codes + table


def test_committed_compile_markdown_is_rendered_from_its_json(eval_module):
    """eval/results/compile.md (eager against torch.compile decode) is what bench_compile makes of its JSON, and
    docs/benchmarks.md quotes its ratios."""
    bench = eval_module("bench_compile")
    res = json.loads((RESULTS / "compile.json").read_text())
    assert bench.to_markdown(res) == (RESULTS / "compile.md").read_text()
    doc = (RESULTS.parents[1] / "docs" / "benchmarks.md").read_text()
    for r in res["rows"]:
        assert f"{r['compiled_tok_s'] / r['eager_tok_s']:.2f}x" in doc, r["row"]
