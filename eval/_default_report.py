"""The markdown of eval/bench_default.py's JSON: the rows by bits class, the targets of the default recipe."""

from __future__ import annotations

from typing import Any

DEFAULT = "FP=xINT default: FPxINTConfig()"
THREE = "FP=xINT 3-bit: FPxINTConfig(bits=3)"
EIGHT = "FP=xINT T=2: FPxINTConfig(terms=2)"
PEERS4 = ("SINQ 4-bit", "HQQ 4-bit", "bnb NF4")
EQUAL_BITS = (
    0.005  # bits per weight within which two methods count as equal storage (a budget lands just below)
)


def _rows(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in res["rows"] if "skipped" not in r}


def _ratio_target(name: str, ours: dict | None, peers: list[dict], limit: float) -> list[str]:
    peers = [p for p in peers if ours is not None and p["bits"] <= ours["bits"] + EQUAL_BITS]
    if ours is None or not peers:
        return [f"| {name} | not measured | |"]
    best = min(peers, key=lambda p: p["kl"])
    ratio = ours["kl"] / best["kl"]
    verdict = "met" if ratio <= limit else "missed"
    return [
        f"| {name} | {verdict} | KL {ours['kl']:.4f} at {ours['bits']:.3f} bpw = {ratio:.3f}x {best['label']} "
        f"({best['kl']:.4f} at {best['bits']:.3f} bpw) |"
    ]


def targets(res: dict[str, Any]) -> list[str]:
    r = _rows(res)
    d, three, eight = r.get(DEFAULT), r.get(THREE), r.get(EIGHT)
    lines = ["| target | verdict | measured |", "|---|---|---|"]
    lines += _ratio_target("default (<= 4.5 bpw): KL <= 0.8x the best of SINQ, HQQ, NF4 at equal or fewer bits", d,
                           [r[p] for p in PEERS4 if p in r], 0.8)  # fmt: skip
    lines += _ratio_target("3-bit recipe (<= 3.5 bpw): KL <= 0.8x SINQ 3-bit", three,
                           [r[p] for p in ("SINQ 3-bit",) if p in r], 0.8)  # fmt: skip
    g = r.get("GPTQ 4-bit, calibrated")
    if d is not None and g is not None:
        ratio = d["kl"] / g["kl"]
        lines.append(f"| data-free default vs calibrated GPTQ 4-bit (goal <= 1.0x) | {'met' if ratio <= 1 else 'missed'} "
                     f"| {ratio:.3f}x (KL {d['kl']:.4f} vs {g['kl']:.4f}) |")  # fmt: skip
    else:
        lines.append("| data-free default vs calibrated GPTQ 4-bit (goal <= 1.0x) | not measured | |")
    g3 = r.get("GPTQ 3-bit, calibrated")
    if three is not None and g3 is not None:  # no target at 3 bits: the ratio is reported
        lines.append(f"| 3-bit recipe vs calibrated GPTQ 3-bit (reported, no target) | - | {three['kl'] / g3['kl']:.3f}x "
                     f"(KL {three['kl']:.4f} at {three['bits']:.3f} bpw vs {g3['kl']:.4f} at {g3['bits']:.3f}) |")  # fmt: skip
    w8 = r.get("RTN W8")
    if eight is not None and w8 is not None:
        ok = eight["kl"] <= w8["kl"]
        lines.append(f"| T=2 (8.5 bpw) KL <= RTN W8's | {'met' if ok else 'missed'} | {eight['kl']:.5f} vs "
                     f"{w8['kl']:.5f} ({eight['kl'] / w8['kl']:.2f}x) |")  # fmt: skip
    hqq = r.get("HQQ 4-bit")
    if d is not None and hqq is not None:
        ratio = d["quant_s"] / hqq["quant_s"]
        lines.append(f"| quantization time <= 2x HQQ's | {'met' if ratio <= 2 else 'missed'} | {d['quant_s']:.1f} s "
                     f"(load, probe and fit) = {ratio:.2f}x HQQ 4-bit {hqq['quant_s']:.1f} s (fit only) |")  # fmt: skip
    mem = res.get("memory")
    if mem:
        m = mem["default"]
        ratio = m["peak_rss_anon"] / mem["checkpoint_bytes"]
        lines.append(f"| peak RssAnon of quantize-on-load <= 0.5x the FP float32 checkpoint | "
                     f"{'met' if ratio <= 0.5 else 'missed'} | {m['peak_rss_anon'] / 2**30:.2f} GiB = {ratio:.2f}x "
                     f"{mem['checkpoint_bytes'] / 2**30:.2f} GiB{_floor(mem)} |")  # fmt: skip
    return lines


def _floor(mem: dict[str, Any]) -> str:
    """What the process holds before reading a weight, and the load's peak above it, when it was measured."""
    floor = next((m for n, m in mem.items() if n.startswith("imports only") and isinstance(m, dict)), None)
    if floor is None:
        return ""
    base, peak, size = floor["peak_rss_anon"], mem["default"]["peak_rss_anon"], mem["checkpoint_bytes"]
    return (f"; the interpreter with torch and transformers imported holds {base / 2**30:.2f} GiB = "
            f"{base / size:.2f}x before reading a weight, the load adds {(peak - base) / 2**30:.2f} GiB = "
            f"{(peak - base) / size:.2f}x")  # fmt: skip


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Best by default: {res.get('model', '')}", ""]
    if "rows" in res:
        lines += [f"`{res['command']}`: group {res['group_size']}, {res['tokens']} pydoc tokens in windows of 512, "
                  f"float32, {res['threads']} threads, torch {res['torch']}, CPU {res['cpu']}, "
                  f"{res['wall_s'] / 60:.1f} min.", "",
                  "| method | bits/weight | KL vs FP | PPL | top-1 vs FP | quantize s |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        if res.get("note"):
            lines[-3:-3] = [res["note"], ""]
        for cls in (3, 4, 8, 32):
            for row in sorted((x for x in res["rows"] if x["class"] == cls and "skipped" not in x),
                              key=lambda x: x["bits"]):  # fmt: skip
                secs = f"{row['quant_s']:.1f}" if "quant_s" in row else ""
                lines.append(f"| {row['label']} | {row['bits']:.3f} | {row['kl']:.5f} | {row['ppl']:.3f} | "
                             f"{100 * row['top1']:.1f}% | {secs} |")  # fmt: skip
        skipped = [x for x in res["rows"] if "skipped" in x]
        if skipped:
            lines += [
                "",
                "Not measured: " + "; ".join(f"{x['label']} ({x['skipped']})" for x in skipped) + ".",
            ]
        lines += ["", "## Targets", "", *targets(res)]
    mem = res.get("memory")
    if mem:
        lines += ["", f"## Memory (`{res['memory_command']}`)", "",
                  f"FP float32 checkpoint: {mem['checkpoint_bytes'] / 2**30:.2f} GiB. Peak anonymous memory "
                  "(`RssAnon`, sampled every 10 ms; safetensors are memory-mapped, so `VmHWM` would count the "
                  "mapped file) of `from_pretrained(dir, quantization_config=...)` in a fresh process:", "",
                  "| config | peak RssAnon GiB | x checkpoint | seconds |", "|---|---:|---:|---:|"]  # fmt: skip
        for name, m in mem.items():
            if isinstance(m, dict):
                lines.append(f"| {name} | {m['peak_rss_anon'] / 2**30:.2f} | "
                             f"{m['peak_rss_anon'] / mem['checkpoint_bytes']:.2f}x | {m['seconds']:.1f} |")  # fmt: skip
        if "note" in mem:
            lines += ["", mem["note"]]
    return "\n".join(lines) + "\n"
