"""Targets and markdown of ``eval/bench_speed.py`` (pure functions of its result dict; the test re-renders)."""

from __future__ import annotations

import statistics
from typing import Any

T1_ROW = "FP=xINT W4A16 T=1 int4"
T2_ROWS = ("FP=xINT W4A16 T=2 int4", "FP=xINT W4A16 T=2 dense")
W4A8_ROW = "FP=xINT W4A8 T=1 int"  # torch._int_mm products (auto on the CPU), weight group 128/64
LIMIT_SHARE, T2_VS_BF16, W4A8_PREFILL = 0.7, 1.0, 1.3
STACKED_SLACK = 1.05  # "no slower than the wide matmul", with 5 % for timer noise


def bandwidth(result: dict[str, Any]) -> float:
    """Median STREAM-copy bandwidth of the run, bytes/s."""
    return statistics.median(result["copy_bandwidth_bytes_s"])


def derived(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per row: ratios to bf16, the memory-bound limit (bandwidth / bytes per token) and decode's share of it."""
    rows = {r["name"]: r for r in result["rows"]}
    bf16, bw = rows.get("bf16"), bandwidth(result)
    out = {}
    for name, r in rows.items():
        limit = bw / r["decode_bytes"]["total"]
        out[name] = {
            "prefill_vs_bf16": r["prefill_tok_s"] / bf16["prefill_tok_s"] if bf16 else float("nan"),
            "decode_vs_bf16": r["decode_tok_s"] / bf16["decode_tok_s"] if bf16 else float("nan"),
            "limit_tok_s": limit,
            "decode_vs_limit": r["decode_tok_s"] / limit,
        }
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with met (True / False / None = not measurable) and the measured numbers."""
    d, out = derived(result), []

    def add(target: str, ok: bool | None, measured: str) -> None:
        out.append({"target": target, "met": ok, "measured": measured})

    name = f"decode T=1 (int4) >= {LIMIT_SHARE}x its memory-bound limit"
    if T1_ROW in d:
        v = d[T1_ROW]
        add(
            name,
            v["decode_vs_limit"] >= LIMIT_SHARE,
            f"{v['decode_vs_limit']:.3f}x ({v['limit_tok_s']:.1f} tok/s)",
        )
    else:
        add(name, None, f"no row {T1_ROW!r}")
    for row in T2_ROWS:
        name = f"decode {row.removeprefix('FP=xINT W4A16 ')} >= {T2_VS_BF16}x bf16 decode"
        ok = d[row]["decode_vs_bf16"] >= T2_VS_BF16 if row in d else None
        add(name, ok, f"{d[row]['decode_vs_bf16']:.3f}x bf16" if row in d else f"no row {row!r}")
    name = f"prefill W4A8 (512 tokens) >= {W4A8_PREFILL}x bf16 prefill"
    if W4A8_ROW in d:
        v = d[W4A8_ROW]["prefill_vs_bf16"]
        add(name, v >= W4A8_PREFILL, f"{v:.3f}x bf16")
    else:
        add(name, None, f"no row {W4A8_ROW!r}")
    ratios = [t["median_ms"]["stacked"] / t["median_ms"]["wide"] for t in result["term_parallel"]]
    add(
        f"int4 T=2 (one stacked call) <= {STACKED_SLACK}x one int4 matmul of the same total size",
        max(ratios) <= STACKED_SLACK,
        f"stacked / wide {min(ratios):.3f}x .. {max(ratios):.3f}x over {len(ratios)} shape x token cases",
    )
    return out


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "yes" if met else "**MISSED**"


def _timing_table(title: str, note: str, records: list[dict[str, Any]], ref: str) -> list[str]:
    """A section of one-layer timings: median ms of every path per (shape, tokens), with its ratio to ``ref``."""
    paths = list(records[0]["median_ms"])
    lines = [
        "",
        f"## {title}",
        "",
        note,
        "",
        "| shape (out x in) | tokens | " + " | ".join(paths) + " |",
        "|---|---:|" + "---:|" * len(paths),
    ]
    for t in records:
        ms = t["median_ms"]
        cells = " | ".join(f"{ms[p]:.3g} ({ms[p] / ms[ref]:.2f}x)" for p in paths)
        lines.append(f"| {t['shape'][0]}x{t['shape'][1]} | {t['tokens']} | {cells} |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    s, env, d = result["settings"], result["environment"], derived(result)
    lines = [
        "# Decode / prefill speed and the memory-bound limit (one process)",
        "",
        f"`{result['command']}` — SmolLM2-135M (embedded FP folder; `lm_head` tied to the embedding, kept bf16); "
        f"torch {env['torch']} ({env['cpu_capability']}), {env['cpu_count']} CPUs, {s['threads']} torch thread(s); "
        f"wall {result['wall_time_s']:.0f} s.  Load average (1/5/15 min) before "
        f"{[round(v, 2) for v in env['loadavg_before']]}, after {[round(v, 2) for v in env['loadavg_after']]}"
        " (other jobs shared these CPUs: absolute numbers are noisy, ratios were measured side by side).",
        "",
        f"STREAM-like copy bandwidth: **{bandwidth(result) / 1e9:.2f} GB/s** (median of "
        f"{len(result['copy_bandwidth_bytes_s'])} samples, read + written bytes of a 256 MiB float32 copy).",
        "",
        "| row | forward | prefill tok/s | vs bf16 | decode tok/s | vs bf16 | MB read / token | limit tok/s | "
        "decode / limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        v = d[r["name"]]
        lines.append(
            f"| {r['name']} | {r['forward_mode'] or '-'} | {r['prefill_tok_s']:.1f} | {v['prefill_vs_bf16']:.2f} | "
            f"{r['decode_tok_s']:.1f} | {v['decode_vs_bf16']:.2f} | {r['decode_bytes']['total'] / 1e6:.1f} | "
            f"{v['limit_tok_s']:.1f} | {v['decode_vs_limit']:.2f} |"
        )
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {_verdict(t['met'])} | {t['measured']} |" for t in result["targets"]]
    lines += [
        "",
        "## Bytes read per decoded token (MB)",
        "",
        "| row | quantized linears | dense linears (lm_head) | embedding row | norms | KV cache | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        b = {k: v / 1e6 for k, v in r["decode_bytes"].items()}
        lines.append(
            f"| {r['name']} | {b['quantized_linears']:.2f} | {b['dense_linears']:.2f} | {b['embedding_row']:.4f} | "
            f"{b['other_params']:.3f} | {b['kv_cache']:.2f} | {b['total']:.2f} |"
        )
    lines += _timing_table(
        "Term parallelism (int4, T=2, bf16 activations)",
        "Median ms (ratio to `wide`: one int4 matmul of `[out, 2·in]`, the same total size).  `stacked` is the "
        "backend's call (both terms in one kernel call, stacked along the input dimension); `sequential` one call "
        "per term plus a float32 add (the former path); `out-stacked` one call on `[2·out, in]` then a sum over "
        "terms; `T=1` one term.",
        result["term_parallel"],
        "wide",
    )
    if result.get("w4a8_kernels"):
        lines += _timing_table(
            "W4A8 products on one layer (bf16 activations in and out)",
            "Median ms (ratio to `bf16`: `F.linear` with the dequantized bf16 weight).  `W4A16 int4`: the packed int4 "
            "kernel, T=1; `W4A8 float32-codes` / `W4A8 int`: `act_kernels.act_linear` with one 8-bit activation "
            "term and 4 outliers per token (A_sa), products as float32 matmuls on the codes / `torch._int_mm` "
            "(bit-identical outputs), one matmul per weight group.",
            result["w4a8_kernels"],
            "bf16",
        )
    lines += [
        "",
        "## Protocol",
        "",
        f"- Prefill: one forward of {s['prefill_tokens']} tokens, batch 1, fresh KV cache, `logits_to_keep=1` (as "
        f"`generate`). Decode: {s['decode_steps']} greedy one-token forwards with the KV cache after a "
        f"{s['decode_prompt_tokens']}-token prompt (prompt not timed). Medians of {s['repeats']} repeat(s), rows "
        "round-robin (order reversed every other round) after one warm-up each.",
        "- MB read / token: every byte the decode forward reads: the prepared weights of each FP=xINT layer (int4: "
        "packed codes + bf16 scale/zero table per term and group + outliers; dense: the bf16 matrix), `lm_head` "
        "(bf16, 49152 x 576), one embedding row, norm weights and the KV cache at the mean decode context. "
        "limit tok/s = copy bandwidth / MB read; decode / limit = the share of it reached.",
        "- Rows are `SpeedRow`s in `eval/bench_speed.py::ROWS` (FPxINTConfig kwargs + forward mode).",
    ]
    return "\n".join(lines) + "\n"
