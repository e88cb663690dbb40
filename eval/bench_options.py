"""Which input transform wins: FP=xINT T=1 with {none, dual_scale, rotation, both} at 3 and 4 bits, group 64.

    python eval/bench_options.py [--tokens 2048] [--out eval/results/options]

One process, float32 forward for every row, the same pydoc tokens (windows of 512) as eval/bench_pareto.py.
Rows: FP=xINT T=1 (nested series, optimized fit, act_proxy="norm"), symmetric and asymmetric, 3 and 4 bits, each
with the four combinations of ``dual_scale`` and ``rotation="hadamard"``; the peers the options come from, run
through the same code with the plain min-max grid (``fit="minmax"``): RTN, Hadamard+RTN (rotation) and SINQ-style
dual scaling + RTN (dual_scale).  Bits per weight count every stored tensor (codes, scales, zeros, t, signs).
Writes ``<out>.json`` and ``<out>.md``.  SmolLM2's FP weights are GGUF Q4_1 (group 32), which biases 4-bit rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pareto_rows as rows  # noqa: E402

from fpxint_hf.evaluation.metrics import evaluate_against  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402

OPTIONS = {  # label -> settings
    "none": {},
    "dual_scale": {"dual_scale": True},
    "rotation": {"rotation": "hadamard"},
    "both": {"dual_scale": True, "rotation": "hadamard"},
}
ABLATIONS = {  # which part of the first-term fit dual_scale does not combine with (3 and 4 bits, asymmetric)
    "dual_scale, fit=minmax": {"dual_scale": True, "fit": "minmax"},
    "dual_scale, act_proxy=None": {"dual_scale": True, "act_proxy": None},
    "dual_scale, fit=minmax, act_proxy=None": {"dual_scale": True, "fit": "minmax", "act_proxy": None},
}
PEERS = {  # the same transforms on RTN's min-max grid, no activation proxy: the methods they come from
    "RTN": {},
    "Hadamard+RTN": {"rotation": "hadamard"},
    "SINQ-style (dual_scale)+RTN": {"dual_scale": True},
}


def configs() -> list[dict[str, Any]]:
    """The rows, most informative first (3 bits; the peers last): results are written after every row."""
    out = []
    for bits in (3, 4):
        for symmetric in (False, True):
            for option, extra in OPTIONS.items():
                cfg = {"series": "nested", "fit": "optimized", **extra}
                out.append({"bits": bits, "symmetric": symmetric, "option": option, "cfg": cfg})
    for bits in (3,):  # the informative width (the FP weights are a 4-bit grid already)
        for peer, extra in PEERS.items():
            cfg = {"series": "nested", "fit": "minmax", "act_proxy": None, **extra}
            out.append({"bits": bits, "symmetric": False, "option": f"peer: {peer}", "cfg": cfg})
    for bits in (3, 4):
        for label, extra in ABLATIONS.items():
            if bits == 3 and extra.get("fit") == "minmax" and "act_proxy" in extra:
                continue  # = the 3-bit SINQ-style peer row above
            cfg = {"series": "nested", "fit": "optimized", **extra}
            out.append({"bits": bits, "symmetric": False, "option": label, "cfg": cfg})
    return out


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Input transforms: none / dual_scale / rotation / both (FP=xINT T=1, group 64)",
        "",
        f"`{res['command']}`: {res['model']}; {res['tokens']} pydoc tokens in windows of 512, float32 forward, "
        f"{res['threads']} threads (machine shared with other jobs), torch {res['torch']}, "
        f"{res['wall_s'] / 60:.1f} min.  FP PPL {res['fp_ppl']:.3f}.",
        "",
        "| bits | first term | option | bits/weight | PPL | KL vs FP | top-1 vs FP | quantize s |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        kind = "symmetric" if r["symmetric"] else "asymmetric"
        lines.append(
            f"| {r['bits']} | {kind} | {r['option']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
            f"{100 * r['top1']:.1f}% | {r['quant_s']:.1f} |"
        )
    lines += [
        "",
        "## Lowest KL per setting (FP=xINT rows)",
        "",
        "| bits | first term | best | KL | vs none |",
    ]
    lines.append("|---:|---|---|---:|---:|")
    for bits in (3, 4):
        for sym in (False, True):
            group = [
                r
                for r in res["rows"]
                if r["bits"] == bits and r["symmetric"] == sym and not r["option"].startswith("peer:")
            ]
            if not group:
                continue
            best = min(group, key=lambda r: r["kl"])
            none = next((r for r in group if r["option"] == "none"), best)
            kind = "symmetric" if sym else "asymmetric"
            lines.append(
                f"| {bits} | {kind} | {best['option']} | {best['kl']:.4f} | {best['kl'] / none['kl']:.3f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="eval/results/options")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard", default="0/1", help="K/N: run rows K, K+N, ... into <out>.shard-K.json")
    ap.add_argument("--rows", default=None, help="i,j,...: run these rows of configs() (into shard K's file)")
    ap.add_argument(
        "--merge", type=int, default=None, help="N: merge <out>.shard-*.json of N shards, run nothing"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge is not None:
        return merge(out, args.merge)
    k, n = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = rows.fp_baseline(args.tokens)
    fp_dir, ref, fp_ppl = base.fp_dir, base.ref, base.fp.perplexity
    res = {
        "command": "python eval/bench_options.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (FP = its GGUF Q4_1 weights dequantized to float32)",
        "tokens": base.tokens,
        "group_size": rows.GROUP,
        "threads": args.threads,
        "torch": torch.__version__,
        "fp_ppl": fp_ppl,
        "rows": [],
        "wall_s": 0.0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.shard-{k}.json") if n > 1 else out.with_suffix(".json")
    chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(k, len(configs()), n)
    for c in [configs()[i] for i in chosen]:
        built = rows.fpxint_row(fp_dir, bits=c["bits"], terms=1, symmetric=c["symmetric"], **c["cfg"])
        m = evaluate_against(built.pop("model"), ref)
        row = {**{k: c[k] for k in ("bits", "symmetric", "option")}, "settings": c["cfg"]}
        row |= {"bpw": built["bits"], "quant_s": built["quant_s"], "ppl": m.perplexity, "kl": m.kl_vs_fp}
        row["top1"] = m.top1_agreement
        res["rows"].append(row)
        print(
            f"{c['bits']} {'sym ' if c['symmetric'] else 'asym'} {c['option']:30s} {row['bpw']:.3f} b/w  "
            f"PPL {m.perplexity:8.3f}  KL {m.kl_vs_fp:.4f}  top-1 {m.top1_agreement:.3f}",
            flush=True,
        )
        res["wall_s"] = time.perf_counter() - start
        part.write_text(json.dumps(res, indent=1) + "\n")  # after every row
    if n == 1:
        out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


def merge(out: Path, n: int) -> int:
    """One ``<out>.json`` / ``.md`` from the shards, rows in the order of ``configs()`` (wall time: the longest
    shard)."""
    parts = [json.loads(out.with_name(f"{out.name}.shard-{k}.json").read_text()) for k in range(n)]
    order = [(c["bits"], c["symmetric"], c["option"]) for c in configs()]
    unique = {(r["bits"], r["symmetric"], r["option"]): r for p in reversed(parts) for r in p["rows"]}
    rows_ = sorted(
        unique.values(),
        key=lambda r: order.index((r["bits"], r["symmetric"], r["option"])),
    )
    res = {**parts[0], "rows": rows_, "wall_s": max(p["wall_s"] for p in parts), "shards": n}
    res["command"] = f"python eval/bench_options.py --shard K/{n} [--rows ...] for K < {n}, then --merge {n}"
    print(write_results(out, res, to_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
