"""Targets and markdown report of ``eval/bench.py`` (pure functions of its result dict)."""

from __future__ import annotations

from typing import Any

from _bench_rows import BITS

# decode of rows slower than this at warm-up (tokens/s) is timed once, on this many new tokens
SLOW_DECODE_TOK_S, SLOW_DECODE_TOKENS = 2.0, 8


def targets(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The acceptance targets, each with the measured numbers and met / missed / not measurable."""
    out: list[dict[str, Any]] = []

    def ppl(n: str) -> float | None:
        r = by.get(n, {})
        return r["quality"]["perplexity"] if "quality" in r else None

    def add(target: str, ok: bool | None, measured: str) -> None:
        out.append({"target": target, "met": ok, "measured": measured})

    t1, t2, rtn, nf4, fp = (
        ppl("FP=xINT T=1"),
        ppl("FP=xINT T=2"),
        ppl("RTN W4 g128"),
        ppl("bnb NF4"),
        ppl("fp32"),
    )
    b1 = by.get("FP=xINT T=1", {}).get("bits_per_weight")
    if t1 is not None and rtn is not None:
        add("T=1 PPL <= RTN-W4 PPL", t1 <= rtn, f"T=1 {t1:.4f} vs RTN {rtn:.4f} (both bf16)")
    if t1 is not None and nf4 is not None:
        bn = by["bnb NF4"]["bits_per_weight"]
        add(
            "T=1 PPL <= NF4 PPL at no more bits",
            t1 <= nf4 and b1 <= bn,
            f"T=1 {t1:.4f} @ {b1:.3f} b/w vs NF4 {nf4:.4f} @ {bn:.3f} b/w",
        )
    elif t1 is not None:
        add("T=1 PPL <= NF4 PPL at no more bits", None, "NF4 row skipped")
    if t2 is not None and fp is not None:
        rel = t2 / fp - 1
        add(
            "T=2 PPL within 1% of FP",
            abs(rel) <= 0.01,
            f"T=2 {t2:.4f} (bf16) vs FP {fp:.4f} (fp32): {100 * rel:+.2f}%",
        )
        bf = ppl("bf16")
        if bf is not None:
            out[-1]["measured"] += f"; vs bf16 {bf:.4f}: {100 * (t2 / bf - 1):+.2f}%"
    for t, need in ((1, 1.0), (2, 0.8)):
        r = by.get(f"FP=xINT T={t}", {})
        if "decode_vs_bf16" in r:
            add(
                f"decode T={t} >= {need}x bf16",
                r["decode_vs_bf16"] >= need,
                f"{r['decode_vs_bf16']:.3f}x bf16",
            )
    for t in (1, 2, 3):
        r = by.get(f"FP=xINT T={t}", {})
        if "bits_per_weight" in r:
            limit = t * BITS + 0.5
            add(
                f"T={t} linear weights <= (T*X+0.5)/16 of bf16",
                r["bits_per_weight"] <= limit,
                f"{r['bits_per_weight']:.3f} b/w = {r['bits_per_weight'] / 16:.4f} of bf16 (limit {limit / 16:.4f})",
            )
        if "quantize_vs_rtn" in r:
            add(
                f"T={t} quantization time <= 3x RTN",
                r["quantize_vs_rtn"] <= 3,
                f"{r['quantize_vs_rtn']:.2f}x RTN",
            )
    return out


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def to_markdown(res: dict[str, Any]) -> str:
    s, env = res["settings"], res["environment"]
    lines = [
        "# Side-by-side benchmark (one process)",
        "",
        f"`{res['command']}` — SmolLM2-135M-Instruct FP folder (GGUF Q4_1 dequantized to fp32); "
        f"{env.get('cpu', '?')}, {env['cpu_count']} cores, torch {env['torch']} with "
        f"{env['torch_threads']} threads, transformers {env['transformers']}; wall {res['wall_time_s']:.0f} s.",
        "",
        "| method | dtype | bits/weight | PPL | KL vs fp32 | top-1 | quant time (s) | quant vs RTN | "
        "prefill tok/s | prefill vs bf16 | decode tok/s | decode vs bf16 | RSS +MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        q = r["quality"]
        lines.append(
            f"| {r['name']} | {r['compute_dtype']} | {r['bits_per_weight']:.3f} | {q['perplexity']:.3f} | "
            f"{q['kl_vs_fp']:.4f} | {100 * q['top1_agreement']:.1f}% | {r['quantize_s']:.1f} | "
            f"{_f(r.get('quantize_vs_rtn'), '.2f')} | {_f(r.get('prefill_tok_s'), '.0f')} | "
            f"{_f(r.get('prefill_vs_bf16'), '.2f')} | {_f(r.get('decode_tok_s'), '.1f')} | "
            f"{_f(r.get('decode_vs_bf16'), '.2f')} | {_f(r.get('rss_increase_mb'), '.0f')} |"
        )
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for t in res["targets"]:
        met = {True: "yes", False: "**MISSED**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    rtn_rows = [r for r in res["rows"] if r["name"].startswith("RTN") and "fp32_quality" in r]
    lines += [
        "",
        "## Protocol",
        "",
        f"- PPL / KL / top-1: first {s['ppl_tokens']} pydoc tokens in windows of {s['context']} "
        "(`fpxint_hf.evaluation.metrics`), each row in its compute dtype (fp32 row in fp32, all others in bf16), "
        "KL and top-1 against the fp32 model."
        + "".join(
            f" {r['name']} scored in fp32 (fake-quantized weights): PPL {r['fp32_quality']['perplexity']:.3f}."
            for r in rtn_rows
        ),
        "- bits/weight: stored bytes of the quantized linear weights (all `nn.Linear` except `lm_head`, which is "
        "tied to the embedding and kept) / their count. FP=xINT: codes + fp16 scales + zeros + term count; RTN: "
        "4 or 8 bits + fp16 scale and zero per group; bnb NF4: packed uint8 + fp32 absmax + NF4 code table; bnb "
        "int8: int8 weight + fp32 absmax per row; HQQ: packed W_q + bf16 scale + zero; dense rows: 16 / 32.",
        f"- Group size: RTN and FP=xINT {s['group_size']} (64 for the 576-input layers, which 128 does not "
        "divide); bnb NF4 blocksize 64 and HQQ group 64 (their defaults), so they spend more bits on scales.",
        "- Quantization time: wall time of building the row (load from the fp32 safetensors folder + quantize), "
        "ratio to RTN (`fpxint_hf.evaluation.table.rtn_model`: load fp32 + round-to-nearest). The dense rows' "
        "times are plain loads.",
        f"- Prefill: one forward of {s['prefill_tokens']} tokens (batch 1, no cache); decode: greedy `generate` "
        f"of {s['decode_new_tokens']} new tokens after a {s['decode_prompt_tokens']}-token prompt (batch 1; the "
        "time includes the prompt's prefill); median of "
        f"{s['repeats']} repeat(s), rows timed round-robin after one warm-up each.",
        f"- Decode of rows slower than {SLOW_DECODE_TOK_S} tok/s at warm-up: timed once on {SLOW_DECODE_TOKENS} new tokens.",
        "- RSS +MB: process RSS after building the row minus before (earlier rows' models stay resident, freed "
        "allocator memory may be reused, so this is an estimate of the row's resident size). Process peak RSS: "
        f"{res['process_peak_rss_mb']:.0f} MB (getrusage, monotone over the whole run).",
    ]
    for r in res["rows"]:
        for n in r.get("notes", []):
            lines.append(f"- {r['name']}: {n}")
        if "skipped" in r:
            lines.append(f"- {r['name']} skipped: {r['skipped']}")
    return "\n".join(lines) + "\n"
