"""Numbers the README quotes equal the committed results they name (issue 18): the kernel speed sentence, the
Pareto targets, the command / time of the committed table, and the peers bench's tokens, time and torchao reason."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
SMALL = ("576x576", "1536x576", "576x1536")


def readme() -> str:
    return " ".join((ROOT / "README.md").read_text().split())  # line breaks do not matter


def section(start: str, end: str = "\n## ") -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(start, 1)[1].split(end, 1)[0]


def minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"


def test_kernel_sentence_matches_bench_kernels():
    rows = json.loads((RESULTS / "bench_kernels.json").read_text())["rows"]
    cells = [
        r
        for r in rows
        if r["shape"] in SMALL
        and r["tokens"] == 1
        and r["dtype"] == "bf16"
        and r["path"].split()[0] in ("int4", "int8-collapsed")
        and "M_sa" not in r["path"]
    ]
    faster = sorted(r["ratio_to_bf16_dense"] for r in cells if r["ratio_to_bf16_dense"] < 1)
    smallest = min(r["ratio_to_bf16_dense"] for r in cells if r["shape"] == "576x576")
    sentence = (
        f"on the small SmolLM2 shapes at one token, {len(faster)} of the {len(cells)} bf16 kernel cells are faster "
        f"than a dense bf16 matmul ({faster[0]:.2f}–{faster[-1]:.2f}×"
    )
    assert sentence in readme()
    assert f"on the 576x576 layers every kernel is slower ({smallest:.2f}× or more)" in readme()
    assert smallest > 1


def test_pareto_targets_are_quoted_as_pareto_md_states_them(eval_module):
    _pareto_report = eval_module("_pareto_report")
    res = json.loads((RESULTS / "pareto.json").read_text())
    pareto_md = (RESULTS / "pareto.md").read_text()
    for t in _pareto_report.targets(res):
        assert f"| {t['measured']} |" in pareto_md  # the committed file cites the same row
        line = f"| {t['target']} | **{'met' if t['met'] else 'missed'}** | {t['measured']} |"
        assert line in (ROOT / "README.md").read_text(), line


def decimals(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])\d+\.\d+", text))


def test_committed_table_command_time_and_prose_numbers():
    result = json.loads((RESULTS / "table.json").read_text())
    s = result["settings"]
    raw = section("## Results on the embedded model", "### Against the calibration-free peers")
    text = " ".join(raw.split())
    assert s["command"] == "fpxint eval --out eval/results/table" and s["mmlu_limit"] == 2  # the default job
    assert f"`{s['command']}` ({minutes(result['wall_time_s'])} on 2 cores" in text
    assert f"{s['mmlu_questions']:,} questions per row" in text and f"{s['tokens']:,} pydoc tokens" in text
    main_job = " ".join(section("## The main job: `fpxint eval`").split())
    assert f"{minutes(result['wall_time_s'])} for the six rows" in main_job
    prose = "\n".join(ln for ln in raw.splitlines() if "|" not in ln)
    table_md = (RESULTS / "table.md").read_text()
    rendered = table_md + json.dumps(result)
    missing = {d for d in decimals(prose) if d not in rendered}
    assert not missing, f"README numbers not in table.md/json: {sorted(missing)}"


def test_peers_bench_tokens_time_torchao_and_prose_numbers():
    result = json.loads((RESULTS / "bench.json").read_text())
    text = " ".join(section("### Against the calibration-free peers").split())
    tokens = result["settings"]["ppl_tokens"]
    assert f"{tokens:,} pydoc tokens" in text and f"{minutes(result['wall_time_s'])};" in text
    skipped = [r for r in result["rows"] if r["name"].startswith("torchao")]
    assert skipped and all(f"torchao skipped: `{r['skipped']}`" in text for r in skipped if "skipped" in r)
    bench_md = (RESULTS / "bench.md").read_text()
    prose = "\n".join(
        ln for ln in section("### Against the calibration-free peers").splitlines() if "|" not in ln
    )
    missing = {d for d in decimals(prose) if d not in bench_md}
    assert not missing, f"README numbers not in bench.md: {sorted(missing)}"
