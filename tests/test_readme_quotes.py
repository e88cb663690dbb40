"""Numbers the documentation quotes equal the committed results they name (issue 18): the kernel speed sentence, the
Pareto targets, the command / time of the committed table, and the peers bench's tokens, time and torchao reason
(docs/benchmarks.md, docs/cli.md); and the README's table of recommended settings (issue 26)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
SMALL = ("576x576", "1536x576", "576x1536")


DOCS = ROOT / "docs"


def benchmarks() -> str:
    return " ".join((DOCS / "benchmarks.md").read_text().split())  # line breaks do not matter


def section(start: str, end: str = "\n## ", doc: str = "benchmarks.md") -> str:
    text = (DOCS / doc).read_text()
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
    assert sentence in benchmarks()
    assert f"on the 576x576 layers every kernel is slower ({smallest:.2f}× or more)" in benchmarks()
    assert smallest > 1


def test_pareto_targets_are_quoted_as_pareto_md_states_them(eval_module):
    _pareto_report = eval_module("_pareto_report")
    res = json.loads((RESULTS / "pareto.json").read_text())
    pareto_md = (RESULTS / "pareto.md").read_text()
    for t in _pareto_report.targets(res):
        assert f"| {t['measured']} |" in pareto_md  # the committed file cites the same row
        line = f"| {t['target']} | **{'met' if t['met'] else 'missed'}** | {t['measured']} |"
        assert line in (DOCS / "benchmarks.md").read_text(), line


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
    main_job = " ".join(section("## The main job: `fpxint eval`", doc="cli.md").split())
    assert f"{minutes(result['wall_time_s'])} for the six rows" in main_job
    prose = "\n".join(ln for ln in raw.splitlines() if "|" not in ln)
    table_md = (RESULTS / "table.md").read_text()
    rendered = table_md + json.dumps(result)
    missing = {d for d in decimals(prose) if d not in rendered}
    assert not missing, f"docs/benchmarks.md numbers not in table.md/json: {sorted(missing)}"


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
    assert not missing, f"docs/benchmarks.md numbers not in bench.md: {sorted(missing)}"


# The README's settings column -> the pareto.json row that measured it (change both together).
SETTINGS_ROWS = {
    'bits=[3, 2], terms=2, bits_budget=3.5, dual_scale=True, zero_bits=8, act_proxy="probe"': (
        "FP=xINT budget 3.5 (3+2), dual_scale, int8 bias, probe"
    ),
    'bits=[4, 2, 2], terms=3, bits_budget=5.0, dual_scale=True, act_proxy="probe"': (
        "FP=xINT budget 5.0 (4+2+2), dual_scale, probe"
    ),
    'bits=[4, 2, 2], terms=3, bits_budget=6.5, dual_scale=True, act_proxy="norm"': (
        "FP=xINT budget 6.5 (4+2+2), dual_scale"
    ),
}
RECIPES = {  # the README's three recipes: their row of eval/bench_default.py and the peers they are held against
    "FPxINTConfig()": (
        "FP=xINT default: FPxINTConfig()",
        ("SINQ 4-bit", "HQQ 4-bit", "bnb NF4", "RTN W4", "GPTQ 4-bit, calibrated"),
    ),
    "FPxINTConfig(bits=3)": (
        "FP=xINT 3-bit: FPxINTConfig(bits=3)",
        ("SINQ 3-bit", "HQQ 3-bit", "RTN W3", "GPTQ 3-bit, calibrated"),
    ),
    "FPxINTConfig(terms=2)": ("FP=xINT T=2: FPxINTConfig(terms=2)", ("RTN W8",)),
}


def _recipe_cells(res: dict, label: str, peers: tuple[str, ...]) -> list[str]:
    rows = {r["label"]: r for r in res["rows"] if "skipped" not in r}
    if label not in rows:
        return ["not measured", ""]
    ours = rows[label]
    measured = [rows[p] for p in peers if p in rows and rows[p]["bits"] <= ours["bits"] + 0.005]  # equal bits
    if not measured:
        return [f"{ours['kl']:.5f}", "none measured"]
    best = min(measured, key=lambda r: r["kl"])
    return [f"{ours['kl']:.5f}", f"{best['label']} {best['kl']:.5f} ({best['bits']:.3f})"]


def test_readme_recipes_table_quotes_both_models_and_their_best_peer():
    """The three recipes' row: bits per weight, and per model the KL of eval/bench_default.py's row and the
    lowest-KL peer measured at equal or fewer bits (eval/results/default_<model>.json)."""
    smol, qwen = (json.loads((RESULTS / f"default_{m}.json").read_text()) for m in ("smollm2", "qwen"))
    text = (
        readme_section("## Recommended settings").split("### The three recipes", 1)[1].split("\n### ", 1)[0]
    )
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| use ")]
    assert len(rows) == len(RECIPES)
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        config = cells[1].strip("`")
        label, peers = RECIPES[config]
        bits = next(r["bits"] for r in smol["rows"] if r["label"] == label)
        assert cells[2:] == [
            f"{bits:.3f}",
            *_recipe_cells(smol, label, peers),
            *_recipe_cells(qwen, label, peers),
        ]


def readme_section(start: str) -> str:
    return (ROOT / "README.md").read_text().split(start, 1)[1].split("\n## ", 1)[0]


def test_readme_settings_table_quotes_the_pareto_rows_and_their_best_peer():
    """Every row of the README's recommended settings: bits, KL and PPL of the committed Pareto row measured with
    those settings, and the lowest-KL peer (not FP=xINT) at the same or fewer bits."""
    res = json.loads((RESULTS / "pareto.json").read_text())
    by = {r["label"]: r for r in res["rows"]}
    fp_ppl = by["FP"]["ppl"]
    peers = [r for r in res["rows"] if not r["family"].startswith("FP")]
    more = readme_section("## Recommended settings").split("### More settings", 1)[1]
    lines = [ln for ln in more.splitlines() if ln.startswith("| ")]
    rows = [ln for ln in lines if not ln.startswith("| use ")]
    assert len(rows) >= 3 and res["group_size"] == 64
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        settings = re.findall(r"`([^`]*)`", cells[1])[0]
        row = by[SETTINGS_ROWS[settings]]
        assert cells[2:5] == [
            f"{row['bits']:.3f}",
            f"{row['kl']:.4f}",
            f"{100 * (row['ppl'] / fp_ppl - 1):+.2f}%",
        ]
        best = min((p for p in peers if round(p["bits"], 3) <= round(row["bits"], 3)), key=lambda p: p["kl"])
        assert cells[5] == f"{best['label']}: {best['kl']:.4f} ({best['bits']:.3f})", line


def test_readme_default_paragraph_describes_the_default():
    """The paragraph on ``FPxINTConfig()`` names its bits, group size, terms, budget, bias width and proxy, and the
    bits per weight of one term that eval/bench_default.py measured on both models (``FPxINTConfig(terms=1)``)."""
    from fpxint_hf import FPxINTConfig

    cfg = FPxINTConfig()
    text = " ".join(readme_section("## Recommended settings").split("**The default.**", 1)[1].split())
    assert f"stores a {cfg.bits}-bit term in every layer, with group size {cfg.group_size}" in text
    assert (
        f"`terms={cfg.terms}, bits_budget={cfg.bits_budget}`" in text and f"{cfg.zero_bits}-bit bias" in text
    )
    assert f"{cfg.bits_budget}-bit budget" in text and f'act_proxy="{cfg.act_proxy}"' in text
    for model in ("smollm2", "qwen"):
        rows = json.loads((RESULTS / f"default_{model}.json").read_text())["rows"]
        one = next(r for r in rows if r["label"] == "FP=xINT one term everywhere: FPxINTConfig(terms=1)")
        assert f"({one['bits']:.3f} bits per weight)" in text
        default = next(r for r in rows if r["label"] == "FP=xINT default: FPxINTConfig()")
        assert default["bits"] <= cfg.bits_budget + 0.001  # + the per-layer 32-bit term counter


def test_readme_speed_limits_quote_speed_json():
    rows = {r["name"]: r for r in json.loads((RESULTS / "speed.json").read_text())["rows"]}
    bf16 = rows["bf16"]
    t1, t2 = rows["FP=xINT W4A16 T=1 int4"], rows["FP=xINT W4A16 T=2 int4"]
    text = " ".join(readme_section("## Limits").split())
    decode = [r["decode_tok_s"] / bf16["decode_tok_s"] for r in (t1, t2)]
    prefill = [r["prefill_tok_s"] / bf16["prefill_tok_s"] for r in (t1, t2)]
    assert f"decode runs at {decode[0]:.2f}x bf16 for 4 bits (T=1) and {decode[1]:.2f}x for T=2" in text
    assert f"prefill is slower than bf16 ({prefill[0]:.2f}x and {prefill[1]:.2f}x)" in text
    assert max(prefill) < 1 < min(decode)


LOG_PHRASES = ("this round", "rounds ago", "previous round", "last round", "this workplace", "this session")


def test_readme_is_short_and_the_docs_read_as_documentation():
    """The README is for users (at most ~250 lines); README and docs/ carry no development-log phrases."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = " ".join(path.read_text().lower().split())
        found = [p for p in LOG_PHRASES if p in text]
        assert not found, f"{path.name}: {found}"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", readme))
    assert linked == {f"docs/{p.name}" for p in DOCS.glob("*.md")}  # every doc is linked, every link exists


def test_readme_default_targets_paragraph_quotes_the_targets_of_both_models():
    """The paragraph under the three recipes (GPTQ ratio, time, memory): every number in it is in the rendered
    targets of eval/results/default_<model>.md."""
    text = (
        readme_section("## Recommended settings").split("### The three recipes", 1)[1].split("\n### ", 1)[0]
    )
    para = next(p for p in text.split("\n\n") if p.startswith("The default against calibrated GPTQ"))
    rendered = "".join((RESULTS / f"default_{m}.md").read_text() for m in ("smollm2", "qwen"))
    numbers = decimals(para)
    assert len(numbers) >= 8
    assert not {d for d in numbers if d not in rendered}, para
