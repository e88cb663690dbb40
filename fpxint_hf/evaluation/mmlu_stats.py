"""Standard errors and paired differences for MMLU rows scored question by question, and the markdown of the
larger-model MMLU table (``eval/bench_mmlu.py``), rendered from a :class:`~.table.TableResult` alone so that
the committed JSON re-renders the committed markdown.

Statistics (every row answers the same questions, so rows are compared *paired*):

- accuracy ``p`` of a row over its ``n`` questions, standard error ``sd(c) / sqrt(n)`` with ``c_j`` in {0, 1}
  and the sample standard deviation (``ddof=1``), i.e. ``sqrt(p (1 - p) / (n - 1))``, as lm-eval reports it;
- paired difference of row A against row B: mean of ``d_j = a_j - b_j`` over the same questions, standard
  error ``sd(d) / sqrt(n)``; only the questions where the two rows disagree move it. "Beyond the noise" below
  means ``|mean| > 2 SE`` (about a two-sided 95 % test, normal approximation).

The questions are the first ``limit`` of each listed subject, treated as a sample of independent questions:
the standard errors describe that subset, not the whole of MMLU.

Answer distributions (rows scored with their per-choice log-likelihoods): a question's answer distribution is
the softmax of the four choice log-likelihoods lm-eval scored (its accuracy is the argmax of the same numbers).
Against FP, per question: *same answer* (1 when the row's argmax is FP's) and the *answer KL*
``KL(p_FP || p_row)`` in nats. These are paired, continuous measures of how far a row moved from FP on MMLU
itself; unlike accuracy they do not need the row to cross a right/wrong boundary to register damage, so they
separate rows with far fewer questions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .table import PAPER_MMLU_AVG, Row, TableResult


@dataclass(frozen=True)
class Estimate:
    """A mean of per-question values with its standard error."""

    mean: float
    se: float
    n: int

    def pct(self) -> str:
        """``"12.3 ± 4.5"`` in percent (points)."""
        return f"{100 * self.mean:.1f} ± {100 * self.se:.1f}"


def mean_se(values: list[int] | list[float]) -> Estimate:
    """Mean and ``sd / sqrt(n)`` (ddof=1) of ``values``; needs two or more."""
    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 values for a standard error, got {n}")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def flat_correct(row: Row) -> list[int]:
    """The row's 0/1 scores, subjects in sorted order and questions in lm-eval's doc order."""
    if row.mmlu is None or not row.mmlu.correct:
        raise ValueError(f"row {row.name!r} has no per-question MMLU scores (run with per_question=True)")
    return [c for subject in sorted(row.mmlu.correct) for c in row.mmlu.correct[subject]]


def paired_difference(a: Row, b: Row) -> Estimate:
    """Accuracy of ``a`` minus that of ``b`` on the same questions, with its paired standard error."""
    if (
        a.mmlu is None
        or b.mmlu is None
        or {s: len(v) for s, v in a.mmlu.correct.items()} != {s: len(v) for s, v in b.mmlu.correct.items()}
    ):
        raise ValueError(f"rows {a.name!r} and {b.name!r} were not scored on the same questions")
    return mean_se([x - y for x, y in zip(flat_correct(a), flat_correct(b), strict=True)])


def flat_logliks(row: Row) -> list[list[float]]:
    """The row's per-choice log-likelihoods, in the order of :func:`flat_correct`."""
    if row.mmlu is None or not row.mmlu.choice_logliks:
        raise ValueError(f"row {row.name!r} has no per-choice log-likelihoods")
    return [q for subject in sorted(row.mmlu.choice_logliks) for q in row.mmlu.choice_logliks[subject]]


def answer_kl(p_logliks: list[float], q_logliks: list[float]) -> float:
    """``KL(softmax(p) || softmax(q))`` over the answer choices, in nats."""
    p_log = _log_softmax(p_logliks)
    q_log = _log_softmax(q_logliks)
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log, strict=True))


def _log_softmax(x: list[float]) -> list[float]:
    top = max(x)
    norm = top + math.log(sum(math.exp(v - top) for v in x))
    return [v - norm for v in x]


def _argmax(x: list[float]) -> int:
    return max(range(len(x)), key=x.__getitem__)


def vs_fp(row: Row, fp: Row) -> tuple[list[int], list[float]]:
    """Per question: 1 when ``row`` picks FP's answer, and the answer KL from FP (nats)."""
    a, b = flat_logliks(fp), flat_logliks(row)
    if len(a) != len(b):
        raise ValueError(f"rows {row.name!r} and {fp.name!r} were not scored on the same questions")
    return answer_agreement(a, b)


def answer_agreement(fp: list[list[float]], row: list[list[float]]) -> tuple[list[int], list[float]]:
    """Per question (the same questions, in the same order): 1 when ``row``'s argmax choice is ``fp``'s, and
    the answer KL ``KL(p_fp || p_row)`` in nats."""
    pairs = list(zip(fp, row, strict=True))
    return [int(_argmax(x) == _argmax(y)) for x, y in pairs], [answer_kl(x, y) for x, y in pairs]


def _find(rows: list[Row], prefix: str) -> Row | None:
    return next((r for r in rows if r.name.startswith(prefix)), None)


def verdict(diff: Estimate) -> str:
    """Plain words for a paired difference: beyond the noise (``|mean| > 2 SE``) or not."""
    if diff.se == 0:
        return "no question answered differently"
    z = diff.mean / diff.se
    if abs(z) > 2:
        return f"{'higher' if z > 0 else 'lower'} beyond the noise ({z:+.1f} SE)"
    return f"within the noise ({z:+.1f} SE)"


def comparisons(result: TableResult) -> list[tuple[str, str, Estimate]]:
    """Paired differences shown under the table: every FP=xINT row and HQQ against RTN W4, and each row
    against FP."""
    rows = [r for r in result.rows if r.mmlu is not None and r.mmlu.correct]
    rtn, fp = _find(rows, "RTN W4"), _find(rows, "FP")
    out = []
    if rtn is not None:
        for r in rows:
            if r.name.startswith(("FP=xINT", "HQQ")):
                out.append((r.name, rtn.name, paired_difference(r, rtn)))
    if fp is not None:
        out += [(r.name, fp.name, paired_difference(r, fp)) for r in rows if r is not fp]
    return out


def answer_reference(result: TableResult) -> Row | None:
    """The FP row the answer columns compare against, or ``None`` when there is none or some MMLU row lacks its
    per-choice log-likelihoods (runs before they were recorded)."""
    rows = [r for r in result.rows if r.mmlu is not None]
    return _find(rows, "FP") if all(r.mmlu.choice_logliks for r in rows if r.mmlu is not None) else None


def answer_comparisons(result: TableResult) -> list[tuple[str, str, Estimate]]:
    """Paired differences of the answer KL from FP: every FP=xINT row and HQQ against RTN W4."""
    rows = [r for r in result.rows if r.mmlu is not None]
    fp, rtn = _find(rows, "FP"), _find(rows, "RTN W4")
    if fp is None or rtn is None:
        return []
    _, base = vs_fp(rtn, fp)
    return [
        (r.name, rtn.name, mean_se([a - b for a, b in zip(vs_fp(r, fp)[1], base, strict=True)]))
        for r in rows
        if r.name.startswith(("FP=xINT", "HQQ"))
    ]


def _answer_cells(row: Row, fp: Row) -> str:
    same, kl = vs_fp(row, fp)
    k = mean_se(kl)
    return f" {mean_se(same).pct()} | {k.mean:.4f} ± {k.se:.4f} |"


def to_markdown(result: TableResult) -> str:
    """The document ``eval/bench_mmlu.py`` writes: command, table with standard errors, paired differences."""
    s = result.settings
    fp_row = answer_reference(result)
    answers = fp_row is not None
    head = (
        "| method | bits/weight | MMLU acc. % ± SE |"
        + (" same answer as FP % ± SE | answer KL vs FP (nats) ± SE |" if answers else "")
        + " PPL | KL vs FP (nats) | top-1 vs FP |\n"
        + "|---|---:|---:|"
        + ("---:|---:|" if answers else "")
        + "---:|---:|---:|\n"
    )
    lines = []
    for r in result.rows:
        acc = mean_se(flat_correct(r)).pct() if r.mmlu is not None and r.mmlu.correct else "-"
        bpw = "32 (fp32)" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}"
        q = r.quality
        extra = ""
        if fp_row is not None:
            extra = " - | - |" if r.mmlu is None else _answer_cells(r, fp_row)
        lines.append(
            f"| {r.name} | {bpw} | {acc} |{extra} {q.perplexity:.3f} | {q.kl_vs_fp:.4f} | "
            f"{100 * q.top1_agreement:.2f}% |"
        )
    diffs = "\n".join(f"| {a} − {b} | {d.pct()} | {verdict(d)} |" for a, b, d in comparisons(result))
    subjects = s.get("mmlu_subjects") or []
    paper = "; ".join(
        f"{model}: " + ", ".join(f"{k} {v}" for k, v in nums.items())
        for model, nums in PAPER_MMLU_AVG.items()
    )
    minutes = result.wall_time_s / 60
    return (
        f"# MMLU on {s['model']}\n\nCommand: `{s.get('command', '?')}` ({minutes:.0f} min wall time, "
        f"{result.environment.get('machine', '?')}).\n\n"
        f"Model: {s['model']} — {s.get('fp_label', '?')}. Quantized: every linear layer except `lm_head` "
        f"(bits={s['bits']}, group_size={s['group_size']} for every row).\n\n"
        + head
        + "\n".join(lines)
        + "\n\nPaired differences (same questions; accuracy points ± SE):\n\n"
        "| rows | difference % ± SE | verdict |\n|---|---:|---|\n"
        + diffs
        + (_answer_section(result) if answers else "")
        + f"\n\nMMLU: 0-shot, lm-eval's stock per-subject tasks on {s.get('mmlu_source', '?')}; the first "
        f"{s['mmlu_limit']} questions of each of {len(subjects)} subjects ({s.get('mmlu_questions', '?')} "
        f"questions per row): {', '.join(subjects)}. Chance is 25 %. SE = sd/sqrt(n) over questions; a "
        "difference is beyond the noise when it exceeds 2 SE.\n"
        f"PPL / KL / top-1: {s['tokens']} pydoc tokens in windows of {s['context']}, against the FP model on "
        "the same tokens.\nbits/weight: stored bytes of the quantized linear weights (codes + scales + zeros + "
        f"outliers) / their count.\nPaper (Table 6, MMLU Avg. %, for reference only): {paper}.\n"
        + "".join(f"\n- {n}" for n in result.notes)
        + "\n"
    )


def _answer_section(result: TableResult) -> str:
    rows = "\n".join(
        f"| {a} − {b} | {d.mean:+.4f} ± {d.se:.4f} | {verdict(d)} |" for a, b, d in answer_comparisons(result)
    )
    return (
        "\n\nPaired differences of the answer KL from FP (same questions; nats ± SE; lower is closer to FP, so "
        "a negative difference favours the first row):\n\n"
        "| rows | difference ± SE | verdict |\n|---|---:|---|\n" + rows + "\n\n"
        "Answer distribution of a question: softmax of the four choice log-likelihoods lm-eval scored (the "
        "accuracy above is their argmax). *same answer as FP*: the row picks FP's choice; *answer KL vs FP*: "
        "KL(p_FP || p_row) over the four choices, averaged over questions."
    )
