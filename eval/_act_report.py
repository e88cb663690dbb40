"""Markdown and targets of eval/bench_act.py, recomputed from its JSON (tests/test_act_results.py re-renders)."""

from __future__ import annotations

from typing import Any


def label(r: dict[str, Any]) -> str:
    if r["weights"] == "FP":
        return "FP"
    if r["act_bits"] is None:
        return f"{r['weights']} A16"
    sa = f", A_sa {r['act_outliers']}/token" if r["act_outliers"] else ", no A_sa"
    return f"{r['weights']} A{r['act_bits']} x{r['act_terms']}{sa}"


def row_line(r: dict[str, Any]) -> str:
    return (
        f"{label(r):32s} {r['bits']:7.3f} b/w  PPL {r['ppl']:8.3f}  KL {r['kl']:.4f}  top-1 {r['top1']:.3f}"
    )


def _find(
    res: dict[str, Any], weights: str, bits: int | None, terms: int, outliers: int | None = None
) -> dict[str, Any]:
    """The row of ``weights`` with these activation settings (``outliers``: the default A_sa when None)."""
    outliers = res["default_act_outliers"] if outliers is None else outliers
    for r in res["rows"]:
        if (
            r["weights"] == weights
            and r["act_bits"] == bits
            and (bits is None or r["act_outliers"] == outliers)
        ):
            if bits is None or r["act_terms"] == terms:
                return r
    raise KeyError((weights, bits, terms, outliers))


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (KL within 10% of W4A16 with the same weights), for every weight setting measured,
    at the default ``act_outliers``."""
    out = []
    for w in sorted({r["weights"] for r in res["rows"] if r["weights"] != "FP"}):
        base = _find(res, w, None, 0)
        for bits, terms in ((8, 1), (4, 2)):
            r = _find(res, w, bits, terms)
            out.append(
                {
                    "target": f"{w} A{bits} with {terms} act term{'s' * (terms > 1)}: KL within 10% of {w} A16",
                    "met": r["kl"] <= 1.10 * base["kl"],
                    "measured": f"KL {r['kl']:.4f} = {r['kl'] / base['kl']:.3f}x A16 {base['kl']:.4f}",
                }
            )
    return out


def claim(res: dict[str, Any]) -> list[str]:
    """Whether activation terms recover accuracy: KL per act term count, for each weight setting and width."""
    lines = []
    for w in sorted({r["weights"] for r in res["rows"] if r["weights"] != "FP"}):
        base = _find(res, w, None, 0)["kl"]
        for bits in (8, 4):
            kls = [_find(res, w, bits, t)["kl"] for t in (1, 2, 3)]
            falls = all(b <= a for a, b in zip(kls, kls[1:], strict=False))
            lines.append(
                f"- {w} A{bits}: KL {' -> '.join(f'{k:.4f}' for k in kls)} with 1 -> 2 -> 3 terms (A16 {base:.4f}); "
                f"{'never rises' if falls else 'RISES'}, 3 terms = {kls[-1] / base:.3f}x A16"
            )
    return lines


def to_markdown(res: dict[str, Any]) -> str:
    fp_ppl = next(r["ppl"] for r in res["rows"] if r["weights"] == "FP")
    lines = [
        "# Activation series: W4A16 vs W4A8 vs W4A4",
        "",
        f"`{res['command']}`: {res['model']}; weights {res['weights']}; {res['tokens']} pydoc tokens in windows of "
        f"512, float32 forward, {res['threads']} threads, torch {res['torch']}, {res['wall_s'] / 60:.1f} min.",
        "Activation bits = act_bits x act_terms per value (A_sa: values per token kept in float on top). Bits per "
        "weight count the stored weight series (activations are not stored).",
        "",
        "| weights + activations | bits/weight | act bits | PPL | PPL vs FP | KL vs FP | top-1 vs FP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        act = (
            "32"
            if r["weights"] == "FP"
            else "16"
            if r["act_bits"] is None
            else str(r["act_bits"] * r["act_terms"])
        )
        lines.append(
            f"| {label(r)} | {r['bits']:.3f} | {act} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp_ppl - 1):+.2f}% | "
            f"{r['kl']:.4f} | {100 * r['top1']:.1f}% |"
        )
    lines += ["", "## Targets", "", "| target | verdict | measured |", "|---|---|---|"]
    lines += [
        f"| {t['target']} | {'met' if t['met'] else 'MISSED'} | {t['measured']} |" for t in targets(res)
    ]
    lines += ["", "## Do activation terms recover accuracy (the paper's claim)?", "", *claim(res)]
    return "\n".join(lines) + "\n"
