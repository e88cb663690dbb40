"""The table of ``eval/mmlu_power.py``: numbers computed from the per-row caches (:func:`build_report`, a JSON-able
dict) and the markdown rendered from that dict alone (:func:`to_markdown`), so the committed JSON re-renders the
committed markdown.

Accuracy is lm-eval's: a question is right when the argmax of its four choice log-likelihoods is the answer.
Every statistic is a mean over questions with ``sd / sqrt(n)`` as its SE (``mmlu_stats.mean_se``); differences
between rows are paired over the questions both rows scored (``mmlu_stats``); "beyond the noise" is ``|mean| >
2 SE``. Avg. is over all the row's questions (question-weighted, as lm-eval's ``mmlu`` group).
"""

from __future__ import annotations

import math
from typing import Any

from fpxint_hf.evaluation.mmlu import CATEGORIES
from fpxint_hf.evaluation.mmlu_cache import CacheContent, Question
from fpxint_hf.evaluation.mmlu_stats import Estimate, answer_agreement, mean_se, verdict
from fpxint_hf.evaluation.table import PAPER_MMLU_AVG

FP, RTN, DEFAULT = "fp", "rtn4", "fpxint"
# bits per weight: a quantizer this close to the default's bits (or below) is compared with it
PEER_SLACK = 0.05
# rows paired with another row that stores as many bits per weight (the paper's T=2 against 8-bit rounding)
EQUAL_BITS = {"fpxint_t2": "rtn8"}
HEADS = {"humanities": "Hums.", "stem": "STEM", "social_sciences": "Social", "other": "Other"}
PAPER = {
    "model": "LLaMA3-8B",
    "rows": PAPER_MMLU_AVG["LLaMA3-8B"],
    "note": "Table 6 of arXiv:2412.06865, Avg. only: its per-category values were not found in the sources "
    "searched (the paper's PDF is not reachable offline).",
}


def _est(values: list[int] | list[float]) -> dict[str, float] | None:
    if len(values) < 2:
        return None
    e = mean_se(values)
    return {"mean": e.mean, "se": e.se, "n": e.n}


def _correct(q: Question, ll: list[float]) -> int:
    return int(max(range(len(ll)), key=ll.__getitem__) == q.answer)


def _paired(a: dict[str, int] | dict[str, float], b: dict[str, int] | dict[str, float]) -> dict | None:
    common = [k for k in a if k in b]
    return _est([a[k] - b[k] for k in common])


def row_numbers(
    questions: list[Question], categories: dict[str, str], cache: CacheContent, fp: CacheContent | None
) -> dict[str, Any]:
    """A row's accuracy by category and overall, its agreement with FP per question, and its progress."""
    scored = [q for q in questions if q.qid in cache.scores]
    correct = {q.qid: _correct(q, cache.scores[q.qid]) for q in scored}
    out: dict[str, Any] = {
        "n": len(scored),
        "categories": {
            c: _est([correct[q.qid] for q in scored if categories[q.subject] == c]) for c in CATEGORIES
        },
        "avg": _est(list(correct.values())),
        "scored_s": sum(cache.seconds[q.qid] for q in scored),
    }
    if fp is not None:
        common = [q.qid for q in scored if q.qid in fp.scores]
        same, kl = answer_agreement([fp.scores[k] for k in common], [cache.scores[k] for k in common])
        out["per_q"] = {"correct": correct, "same": dict(zip(common, same, strict=True))}
        out["per_q"]["kl"] = dict(zip(common, kl, strict=True))
    return out


def _peer_of_default(key: str, bits: float | None, by_key: dict[str, CacheContent]) -> bool:
    """A row the default is compared with directly: another quantizer (not FP, RTN W4 or the default itself) at
    no more than the default's bits per weight plus ``PEER_SLACK``."""
    default = by_key.get(DEFAULT)
    if key in (FP, RTN, DEFAULT) or default is None or bits is None:
        return False
    return bits <= (default.header or {}).get("bits_per_weight", 0.0) + PEER_SLACK


def build_report(
    questions: list[Question],
    categories: dict[str, str],
    caches: list[tuple[str, str, CacheContent]],
    skipped: list[tuple[str, str, str]],
    settings: dict[str, Any],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """The JSON of the table: ``caches`` are ``(row key, label, cache)`` in table order (FP's key ``"fp"``, RTN
    W4's ``"rtn4"``, the default's ``"fpxint"``), ``skipped`` are ``(row key, label, why)``. Rows carry their
    paired differences against FP (``vs_fp``), RTN W4 (``vs_rtn``) and, for other quantizers at about the
    default's bits or fewer (:func:`_peer_of_default`), against the default (``vs_default``) and, for a row of
    ``EQUAL_BITS``, against its partner at equal bits (``vs_equal``, the partner's key under ``"row"``)."""
    by_key = {key: cache for key, _, cache in caches}
    fp = by_key.get(FP)
    nums = {key: row_numbers(questions, categories, cache, fp) for key, _, cache in caches}
    rows = []
    for key, label, cache in caches:
        n, header = nums[key], cache.header or {}
        row = {
            "row": key,
            "name": label,
            "bits_per_weight": header.get("bits_per_weight"),
            "questions": n["n"],
            "planned": len(questions),
            "categories": n["categories"],
            "avg": n["avg"],
            "scored_s": round(n["scored_s"], 1),
            "build_s": [header.get("build_s"), *(s.get("build_s") for s in cache.sessions)],
            "commands": [
                c for c in [header.get("command"), *(s.get("command") for s in cache.sessions)] if c
            ],
            "settings": header.get("info", {}).get("settings"),
        }
        if fp is not None and key != FP:
            row["vs_fp"] = _against(n, nums[FP], same_of_b=None)
        if RTN in nums and fp is not None and key not in (FP, RTN):
            row["vs_rtn"] = _against(n, nums[RTN], same_of_b=nums[RTN])
        if fp is not None and _peer_of_default(key, row["bits_per_weight"], by_key):
            row["vs_default"] = _against(n, nums[DEFAULT], same_of_b=nums[DEFAULT])
        if fp is not None and (partner := EQUAL_BITS.get(key)) in nums:
            row["vs_equal"] = {"row": partner, **_against(n, nums[partner], same_of_b=nums[partner])}
        rows.append(row)
    return {
        "settings": settings,
        "rows": rows,
        "skipped": [{"row": k, "name": label, "why": why} for k, label, why in skipped],
        "paper": PAPER,
        "environment": environment,
    }


def _against(a: dict[str, Any], b: dict[str, Any], same_of_b: dict[str, Any] | None) -> dict[str, Any]:
    """Paired differences of row ``a`` against row ``b``: accuracy; against FP (``same_of_b`` None) the
    same-answer rate and answer KL themselves, against another row their differences."""
    pa = a["per_q"]
    acc = _paired(pa["correct"], b["per_q"]["correct"])
    if same_of_b is None:
        return {"acc": acc, "same": _est(list(pa["same"].values())), "kl": _est(list(pa["kl"].values()))}
    pb = same_of_b["per_q"]
    return {"acc": acc, "same": _paired(pa["same"], pb["same"]), "kl": _paired(pa["kl"], pb["kl"])}


# ------------------------------------------------------------------------------------------ markdown


def _pct(e: dict | None, signed: bool = False) -> str:
    if e is None:
        return "-"
    return f"{100 * e['mean']:{'+' if signed else ''}.1f} ± {100 * e['se']:.1f}"


def _kl(e: dict | None, signed: bool = False) -> str:
    """A KL estimate in nats with as many decimals as show its SE's first significant digit (at least 4), so a
    near-zero KL does not print as 0.0000 ± 0.0000."""
    if e is None:
        return "-"
    places = max(4, -math.floor(math.log10(e["se"]))) if e["se"] > 0 else 4
    return f"{e['mean']:{'+' if signed else ''}.{places}f} ± {e['se']:.{places}f}"


def _verdict(e: dict | None) -> str:
    return "-" if e is None else verdict(Estimate(e["mean"], e["se"], e["n"]))


def _bpw(r: dict[str, Any]) -> str:
    return "32 (fp32)" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"


def _short_name(name: str) -> str:
    """A row's name without its parenthesised note: "RTN W8 (equal bits to T=2)" -> "RTN W8"."""
    return name.split(" (")[0]


def _count(r: dict[str, Any]) -> str:
    return f"{r['questions']}" if r["questions"] == r["planned"] else f"{r['questions']} of {r['planned']}"


def _main_table(data: dict[str, Any]) -> str:
    head = "| method | bits/weight | questions | " + " | ".join(HEADS.values()) + " | Avg. |\n"
    lines = [head + "|---|---:|---:|" + "---:|" * (len(HEADS) + 1)]
    for r in data["rows"]:
        cats = " | ".join(_pct(r["categories"][c]) for c in HEADS)
        lines.append(f"| {r['name']} | {_bpw(r)} | {_count(r)} | {cats} | {_pct(r['avg'])} |")
    paper = data["paper"]
    for name, avg in paper["rows"].items():
        lines.append(f"| *paper, {paper['model']}:* {name} | - | - |" + " - |" * len(HEADS) + f" {avg:.1f} |")
    return "\n".join(lines)


def _paired_table(rows: list[dict[str, Any]], field: str, base: str) -> str:
    """Rows against FP (``field="vs_fp"``: same-answer rate and answer KL themselves) or against RTN W4 or the
    default (``"vs_rtn"``, ``"vs_default"``: their differences from that row's, with a verdict on the KL)."""
    vs_fp = field == "vs_fp"
    same = "same answer as FP % ± SE" if vs_fp else f"same answer as FP − {base} (points) ± SE"
    kl = "answer KL vs FP (nats) ± SE" if vs_fp else f"answer KL − {base}'s (nats) ± SE | verdict"
    lines = [
        f"| method | questions | accuracy − {base} (points) ± SE | verdict | {same} | {kl} |\n"
        f"|---|---:|---:|---|---:|---:|{'' if vs_fp else '---|'}"
    ]
    for r in rows:
        d = r[field]
        n = d["acc"]["n"] if d["acc"] else 0
        tail = _kl(d["kl"]) if vs_fp else f"{_kl(d['kl'], True)} | {_verdict(d['kl'])}"
        lines.append(
            f"| {r['name']} | {n} | {_pct(d['acc'], True)} | {_verdict(d['acc'])} | "
            f"{_pct(d['same'], not vs_fp)} | {tail} |"
        )
    return "\n".join(lines)


def _progress(data: dict[str, Any]) -> str:
    lines = []
    for r in data["rows"]:
        per_q = r["scored_s"] / r["questions"] if r["questions"] else 0.0
        builds = ", ".join(f"{b:.0f} s" for b in r["build_s"] if b is not None) or "-"
        lines.append(
            f"- {r['name']}: {_count(r)} questions scored, {r['scored_s'] / 60:.1f} min of scoring "
            f"({per_q:.2f} s per question); model built in {builds}"
            + ("; scored by " + ", ".join(f"`{c}`" for c in r["commands"]) if r["commands"] else "")
            + "."
        )
    lines += [f"- {s['name']}: not in the table ({s['why']})." for s in data["skipped"]]
    return "\n".join(lines)


def to_markdown(data: dict[str, Any]) -> str:
    """The document ``eval/mmlu_power.py`` writes, from its JSON alone."""
    s, rows = data["settings"], data["rows"]
    rtn = next((r["name"] for r in rows if r["row"] == RTN), None)
    vs_fp = [r for r in rows if "vs_fp" in r]
    vs_rtn = [r for r in rows if "vs_rtn" in r]
    vs_default = [r for r in rows if "vs_default" in r]
    default = next((_short_name(r["name"]) for r in rows if r["row"] == DEFAULT), None)
    qs = s["question_set"]
    parts = [
        f"# MMLU by category on {s['model']}, with standard errors\n",
        f"Table written by `{s['command']}` ({s['machine']}); the command of every scoring call is under "
        "*Progress*.\n",
        f"Model: {s['model']} — {s['fp_label']}. Quantized: every linear layer except `lm_head`, group size "
        f"{s['group_size']} for every row; every row runs a dense float32 forward.\n",
        "MMLU accuracy % ± SE (0-shot, lm-eval's stock prompts and log-likelihoods):\n",
        _main_table(data) + "\n",
    ]
    if vs_fp:
        parts += ["Against FP, paired over the same questions:\n", _paired_table(vs_fp, "vs_fp", "FP") + "\n"]
    if vs_rtn and rtn is not None:
        parts += [
            f"Against {rtn}, paired over the same questions:\n",
            _paired_table(vs_rtn, "vs_rtn", rtn) + "\n",
        ]
    if vs_default and default is not None:
        parts += [
            f"Other quantizers against {default} (at most {PEER_SLACK} bits per weight more), paired over the same questions:\n",
            _paired_table(vs_default, "vs_default", default) + "\n",
        ]
    names = {r["row"]: r for r in rows}
    for r in (r for r in rows if "vs_equal" in r):
        b = names[r["vs_equal"]["row"]]
        parts += [
            f"{r['name']} ({_bpw(r)} bits/weight) against {b['name']} ({_bpw(b)} bits/weight), paired over the "
            "same questions:\n",
            _paired_table([r], "vs_equal", _short_name(b["name"])) + "\n",
        ]
    parts += [
        "Progress and wall time:\n",
        _progress(data) + "\n",
        f"Questions: {qs['n']} of the {qs['of']} MMLU test questions ({qs['source']}), all {qs['subjects']} subjects, "
        f"{qs['how']} Categories: lm-eval's stock map of the 57 subjects (Hums. = humanities, Social = social "
        "sciences).\n",
        "Statistics: SE = sd/sqrt(n) over questions; differences are paired over the questions both rows scored; "
        "a difference is beyond the noise when it exceeds 2 SE. *same answer as FP*: the row's argmax choice is "
        "FP's; *answer KL*: KL(p_FP || p_row) over the softmax of the four choice log-likelihoods. A row scored "
        "on only part of the questions (`k of N`) is a run still in progress.\n",
        f"Paper rows: {data['paper']['note']} They are another model (and another FP), shown for the shape of "
        "the table only.\n",
        "bits/weight: stored bits of the quantized linear weights (codes + scales + zeros + any extra) / their "
        "count.\n",
    ]
    parts += [f"- {n}" for n in s.get("notes", [])]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ README quote

README_BEGIN = "<!-- mmlu-power: python eval/mmlu_power.py --readme renders this table from eval/results/mmlu_power.json -->"
README_END = "<!-- /mmlu-power -->"


def _beyond(e: dict[str, Any]) -> bool:
    """Beyond the noise: |mean| > 2 SE."""
    return abs(e["mean"]) > 2 * e["se"]


def _short(e: dict | None) -> str:
    """A paired accuracy difference in points with its SE and, beyond the noise, which way it goes."""
    if e is None:
        return "-"
    words = "" if not _beyond(e) else (" **loses**" if e["mean"] < 0 else " **gains**")
    return f"{100 * e['mean']:+.1f} ± {100 * e['se']:.1f}{words}"


def _against_fp(acc: dict[str, Any]) -> str:
    way = "does not lose" if not _beyond(acc) else ("loses" if acc["mean"] < 0 else "gains")
    return f"{way} accuracy against FP beyond the noise ({100 * acc['mean']:+.1f} ± {100 * acc['se']:.1f} points)"


def _against_row(r: dict[str, Any], field: str, base: dict[str, Any], base_name: str) -> str:
    acc, kl = r[field]["acc"], r[field]["kl"]
    acc_words = "within the noise" if not _beyond(acc) else ("higher" if acc["mean"] > 0 else "lower")
    kl_words = (
        "within the noise"
        if not _beyond(kl)
        else f"{'lower' if kl['mean'] < 0 else 'higher'}, {abs(kl['mean']) / kl['se']:.1f} SE"
    )
    base_kl = base["vs_fp"]["kl"]["mean"]
    own = r["vs_fp"]["kl"]["mean"]
    if base_kl <= 0:
        ratio = f"{own:.4f} against {base_name}'s 0"
    elif 0 < own < 0.01 * base_kl:  # two decimals would print 0.00x
        ratio = f"1/{base_kl / own:.0f} of {base_name}'s"
    else:
        ratio = f"{own / base_kl:.2f}x {base_name}'s"
    return (
        f"against {base_name} its accuracy is {100 * acc['mean']:+.1f} ± {100 * acc['se']:.1f} points "
        f"({acc_words}) and its answer KL {ratio} ({_kl(kl, signed=True)} nats, {kl_words})"
    )


def readme_verdicts(data: dict[str, Any]) -> list[str]:
    """One sentence per complete quantized row: does it lose accuracy against FP beyond the noise (2 SE), and how
    it compares with RTN W4, (another quantizer at about its bits) with the default and (a row of
    ``EQUAL_BITS``) with its partner at equal bits, in accuracy and answer KL. Rows still being scored get none
    and are compared with by none."""

    def complete(r: dict[str, Any] | None) -> bool:
        return r is not None and r["questions"] == r["planned"]

    rows = {r["row"]: r for r in data["rows"]}
    lines = []
    for r in data["rows"]:
        if r["row"] == FP or not complete(r) or not r.get("vs_fp"):
            continue
        text = f"- **{r['name']}**, {_bpw(r)} bits/weight, {_against_fp(r['vs_fp']['acc'])}"
        partner = r.get("vs_equal", {}).get("row")
        pairs = [("vs_rtn", RTN, "RTN W4"), ("vs_default", DEFAULT, "the default")]
        if partner in rows:
            pairs.append(("vs_equal", partner, _short_name(rows[partner]["name"])))
        for field, key, name in pairs:
            if r.get(field) and complete(rows.get(key)):
                text += f"; {_against_row(r, field, rows[key], name)}"
        lines.append(text + ".")
    return lines


def readme_block(data: dict[str, Any]) -> str:
    """The README's quote of the table: Avg. and the paired differences against FP and RTN W4, per row, then
    :func:`readme_verdicts` for the complete rows."""
    rtn = _short_name(next((r["name"] for r in data["rows"] if r["row"] == RTN), "RTN W4"))
    lines = [
        README_BEGIN,
        f"| method | bits/weight | questions | Avg. % ± SE | − FP (points) | − {rtn} (points) "
        "| same answer as FP % | answer KL vs FP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        vs_fp, vs_rtn = r.get("vs_fp", {}), r.get("vs_rtn", {})
        lines.append(
            f"| {r['name']} | {_bpw(r)} | {_count(r)} | {_pct(r['avg'])} | {_short(vs_fp.get('acc'))} | "
            f"{_short(vs_rtn.get('acc'))} | {_pct(vs_fp.get('same'))} | {_kl(vs_fp.get('kl'))} |"
        )
    verdicts = readme_verdicts(data)
    return "\n".join([*lines, *([""] + verdicts if verdicts else []), README_END])


def _block_span(readme: str) -> tuple[int, int] | None:
    """Where the README's block starts and ends (markers included), or None."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    return None if start < 0 or end < start else (start, end + len(README_END))


def replace_readme_block(readme: str, block: str) -> str:
    """``readme`` with the text between the markers (markers included) replaced by ``block``."""
    if (span := _block_span(readme)) is None:
        raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} block")
    return readme[: span[0]] + block + readme[span[1] :]


def readme_quote(readme: str) -> str | None:
    """The block the README holds now, or None."""
    span = _block_span(readme)
    return None if span is None else readme[span[0] : span[1]]
