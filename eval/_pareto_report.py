"""Targets, markdown and plot of eval/bench_pareto.py, all recomputed from its JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _by(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in res["rows"]}


def best_under(res: dict[str, Any], bits: float, families: tuple[str, ...]) -> dict[str, Any] | None:
    """The lowest-KL row of ``families`` at no more than ``bits`` bits per weight."""
    cands = [
        r for r in res["rows"] if r["family"] in families and r["bits"] <= bits + 0.005
    ]  # + the 32-bit terms_used counter per layer
    return min(cands, key=lambda r: r["kl"]) if cands else None


OURS = ("FP=xINT", "FP=xINT budget", "FP=xINT dual_scale", "FP=xINT int8 bias", "FP=xINT probe")
PEERS_3 = ("SINQ", "HQQ", "Hadamard+RTN", "HIGGS")  # the 3-bit peers of the issue (HQQ 3-bit among them)
PEERS_4 = ("SINQ", "HQQ", "Hadamard+RTN", "HIGGS", "NF4")  # at 4 bits: HIGGS and NF4 too (stricter)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the quality-per-bit issue, with the numbers it was judged on."""
    by, fp_ppl = _by(res), _by(res)["FP"]["ppl"]
    out = []

    def add(name: str, ok: bool, detail: str) -> None:
        out.append({"target": name, "met": bool(ok), "measured": detail})

    for lo, hi, peers in ((3.25, 3.5, PEERS_3), (4.25, 4.5, PEERS_4)):
        ours, best = best_under(res, hi, OURS), best_under(res, hi, peers)
        add(
            f"{lo}-{hi} bpw: KL at most 0.8x the best of {', '.join(peers)} (<= {hi} bpw)",
            ours["kl"] <= 0.8 * best["kl"],
            f"{ours['label']} ({ours['bits']:.3f} bpw): KL {ours['kl']:.4f} = {ours['kl'] / best['kl']:.3f}x "
            f"{best['label']} ({best['bits']:.3f} bpw) {best['kl']:.4f}",
        )
    hqq4, ours45 = by["HQQ 4-bit"], best_under(res, 4.5, OURS)
    add(
        "<= 4.5 bpw: KL at least 10% below HQQ 4-bit g64, PPL below it",
        ours45["kl"] <= 0.9 * hqq4["kl"] and ours45["ppl"] < hqq4["ppl"],
        f"{ours45['label']}: KL {ours45['kl']:.4f} ({ours45['kl'] / hqq4['kl']:.3f}x HQQ {hqq4['kl']:.4f}), "
        f"PPL {ours45['ppl']:.3f} vs {hqq4['ppl']:.3f}",
    )
    b5 = best_under(res, 5.0, OURS)
    add(
        "<= 5.0 bpw: PPL within 10% of FP",
        b5["ppl"] <= 1.10 * fp_ppl,
        f"{b5['label']} ({b5['bits']:.3f} bpw): PPL {b5['ppl']:.3f} = {100 * (b5['ppl'] / fp_ppl - 1):+.1f}% vs FP",
    )
    b65, rtn6 = best_under(res, 6.5, OURS), by["RTN W6"]
    add(
        "<= 6.5 bpw: PPL within 1% of FP and KL below RTN W6 g64",
        b65["ppl"] <= 1.01 * fp_ppl and b65["kl"] < rtn6["kl"],
        f"{b65['label']}: PPL {100 * (b65['ppl'] / fp_ppl - 1):+.2f}% vs FP, KL {b65['kl']:.4f} vs RTN W6 "
        f"{rtn6['kl']:.4f}",
    )
    b85, rtn8 = best_under(res, 8.5, OURS), by["RTN W8"]
    add(
        "8.5 bpw: KL at most 0.5x RTN W8 g64",
        b85["kl"] <= 0.5 * rtn8["kl"],
        f"{b85['label']}: KL {b85['kl']:.5f} = {b85['kl'] / rtn8['kl']:.2f}x RTN W8 {rtn8['kl']:.5f}",
    )
    two, rtn4 = by["FP=xINT 2+2"], by["RTN W4"]
    add(
        "2 x 2-bit no worse than RTN W4 (same group size)",
        two["kl"] <= rtn4["kl"] and two["ppl"] <= rtn4["ppl"],
        f"KL {two['kl']:.4f} vs {rtn4['kl']:.4f}, PPL {two['ppl']:.3f} vs {rtn4['ppl']:.3f}",
    )
    q = res["quant_seconds"]
    pairs = [("FP=xINT T=1 (3)", "HQQ 3-bit"), ("FP=xINT 3+2", "HQQ 3-bit")]
    pairs += [("FP=xINT T=1 (4)", "HQQ 4-bit"), ("FP=xINT T=2 (4+4)", "HQQ 4-bit")]
    opt_in = (
        "FP=xINT T=1 (4), dual_scale",
        "FP=xINT T=1 (4), dual_scale, int8 bias",
        "FP=xINT T=1 (4), probe",
    )
    pairs += [(a, "HQQ 4-bit") for a in opt_in if a in q]  # the opt-in options
    add(
        "quantization time of the whole model no more than 2x HQQ's (same weights, same process)",
        all(q[a] <= 2 * q[b] for a, b in pairs),
        "; ".join(f"{a} {q[a]:.2f} s = {q[a] / q[b]:.2f}x {b} {q[b]:.2f} s" for a, b in pairs)
        + f"; one 4096x4096 layer T=2: {q['FP=xINT T=2 (4+4), one 4096x4096 layer']:.2f} s",
    )
    return out


def to_markdown(res: dict[str, Any]) -> str:
    fp_ppl = _by(res)["FP"]["ppl"]
    lines = [
        "# Quality per bit (group 64 everywhere)",
        "",
        f"`{res['command']}`: {res['model']}; {res['tokens']} pydoc tokens in windows of 512, float32 forward, "
        f"{res['threads']} threads, torch {res['torch']}, {res['wall_s'] / 60:.1f} min.",
        "",
        "| method | family | bits/weight | PPL | PPL vs FP | KL vs FP | top-1 vs FP |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(res["rows"], key=lambda r: (r["bits"], r["kl"])):
        lines.append(
            f"| {r['label']} | {r['family']} | {r['bits']:.3f} | {r['ppl']:.3f} | "
            f"{100 * (r['ppl'] / fp_ppl - 1):+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% |"
        )
    lines += ["", "## Targets", "", "| target | verdict | measured |", "|---|---|---|"]
    for t in targets(res):
        lines.append(f"| {t['target']} | {'met' if t['met'] else 'MISSED'} | {t['measured']} |")
    lines += ["", "## Quantization time (all linear weights of the model, already in memory)", ""]
    lines += [f"- {k}: {v:.2f} s" for k, v in res["quant_seconds"].items()]
    lines += [
        "",
        "Per row, as built above (peers: their quantizer on every weight; FP=xINT: `from_pretrained` with",
        "quantize-on-load, the act_proxy and a budget's candidates included, loading the weights included):",
        "",
    ]
    lines += [f"- {r['label']}: {r['quant_s']:.2f} s" for r in res["rows"] if "quant_s" in r]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    fams = sorted({r["family"] for r in res["rows"] if r["family"] != "FP"})
    fp_ppl = _by(res)["FP"]["ppl"]
    markers = "osD^v<>pPX*h"
    for ax, key, name in ((axes[0], "ppl", "perplexity"), (axes[1], "kl", "KL vs FP (nats)")):
        for i, fam in enumerate(fams):
            pts = sorted((r["bits"], r[key]) for r in res["rows"] if r["family"] == fam and r[key] > 0)
            ours = fam.startswith("FP=xINT")
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                ("-" if ours else "--") if len(pts) > 1 else "",
                marker=markers[i % len(markers)],
                lw=2.0 if ours else 1.0,
                label=fam,
            )
        if key == "ppl":
            ax.axhline(fp_ppl, color="k", lw=0.8, ls="--", label="FP")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (group 64)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
