"""CPU timings of the FP=xINT forward paths against dense ``F.linear``, side by side in one process.

For every layer shape (out x in) and token count (1: decode, 128: prefill) the same input is fed to

- dense ``F.linear`` with a bfloat16 and a float32 weight (the baselines);
- ``FPxINTLinear`` in ``reference`` mode (4-bit, 2 active terms, bfloat16 activations);
- the ``int4`` kernel with 1, 2 and 3 active terms (grouped scales), bfloat16 activations;
- the ``int4`` kernel and the collapsed ``int8`` kernel on a per-channel expansion (1 and 2 terms);
- on 4096x4096 only: ``int4`` with 2 terms plus 1 % saturated outliers (the sparse ``M_sa`` term);
- on the three small shapes only (they take seconds per call on the big ones): ``terms`` mode, dense
  float16, and the kernels with float32 / float16 activations.

All paths of one shape and token count are timed interleaved (``measure_interleaved``): one warm-up
call each (which also builds the module's kernel cache), then up to ``--rounds`` rounds in which each
path gets one ``torch.utils.benchmark.Timer.timeit`` sample; the reported time is the median over rounds.
The ratio is ``median / median(bf16 dense)`` of the same shape and token count in the same run.

Threads: ``torch.set_num_threads(1)`` by default (``--threads``).  The sandbox this was written on has
2 CPUs shared with other jobs; with 2 threads, a busy second core stalls every parallel region and the
timings became erratic (e.g. a 576x576 bf16 decode matmul at 16 ms instead of 0.1 ms), so the
default is the single-threaded, reproducible setting.

Run from the repository root:  ``python eval/bench_kernels.py``  (writes eval/results/bench_kernels.{json,md}).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import fpxint_hf
from fpxint_hf.expansion import expand, resolve_group_size, snr_db
from fpxint_hf.linear import FPxINTLinear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)]  # (out_features, in_features)
TOKENS = (1, 128)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx", "amx", "fma", "vnni", "f16c")
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(wanted))
    except OSError:
        pass
    return []


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def measure_interleaved(fns: dict, threads: int, rounds: int, budget_s: float, sample_s: float) -> dict:
    """Time every callable of ``fns`` side by side: one warm-up call each (builds kernel caches; timed as
    ``first_call_ms``), then ``rounds`` rounds in which each callable gets one ``Timer.timeit`` sample of
    about ``sample_s`` seconds; the order alternates every round so slow drifts of the machine's load hit
    every path alike.  Fewer rounds (>= 3) when a round would cost more than ``budget_s / rounds``."""
    first, est = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = est[name] = time.perf_counter() - t0
        if first[name] < 0.5:  # cheap: a second call gives a better estimate of one call (caches built)
            t0 = time.perf_counter()
            fn()
            est[name] = time.perf_counter() - t0
    per_round = sum(max(e, sample_s) for e in est.values())
    rounds = max(3, min(rounds, int(budget_s / per_round)))
    samples = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            number = max(1, math.ceil(sample_s / max(est[name], 1e-7)))
            m = Timer("fn()", globals={"fn": fns[name]}, num_threads=threads).timeit(number)
            samples[name].append(m.mean)
    out = {}
    for name, ts in samples.items():
        t = torch.tensor(ts)
        out[name] = {
            "median_ms": t.median().item() * 1e3,
            "min_ms": t.min().item() * 1e3,
            "iqr_ms": (t.quantile(0.75) - t.quantile(0.25)).item() * 1e3,
            "rounds": rounds,
            "calls_per_sample": max(1, math.ceil(sample_s / max(est[name], 1e-7))),
            "first_call_ms": first[name] * 1e3,
        }
    return out


LEGACY = {"series": "legacy", "fit": "minmax"}  # the rule eval/results/bench_kernels.md measured


def module(e, *, terms: int, group_size: int, outliers: int = 0) -> FPxINTLinear:
    out_f, in_f = e.shape
    m = FPxINTLinear(
        in_f,
        out_f,
        bias=False,
        bits=4,
        terms=terms,
        group_size=group_size,
        outlier_budget=outliers,
        series=e.series,
    )
    return m.load_expansion(e)


def paths_for(w: torch.Tensor, big: bool):
    """(label, dtype name, callable(x) -> y) for every path of one weight."""
    out_f, in_f = w.shape
    gs = resolve_group_size(in_f, 128)
    grouped = module(expand(w, bits=4, terms=3, group_size=gs, **LEGACY), terms=3, group_size=gs)
    per_channel = module(expand(w, bits=4, terms=2, group_size=None, **LEGACY), terms=2, group_size=in_f)
    wb = w.bfloat16()

    def fx(base, mode, k):
        m = copy.deepcopy(base)  # one module per path: each keeps its own (single-entry) kernel cache
        m.forward_mode, m.active_terms = mode, k
        return m

    yield "dense F.linear", "bf16", lambda x: F.linear(x, wb)
    yield "dense F.linear", "fp32", lambda x: F.linear(x, w)
    yield "reference T=2 grouped", "bf16", fx(grouped, "reference", 2)
    for k in (1, 2, 3):
        yield f"int4 T={k} grouped", "bf16", fx(grouped, "int4", k)
    for k in (1, 2):
        yield f"int4 T={k} per-channel", "bf16", fx(per_channel, "int4", k)
        yield f"int8-collapsed T={k} per-channel", "bf16", fx(per_channel, "int8", k)
    if big:
        if out_f == in_f:
            e = expand(w, bits=4, terms=2, group_size=gs, outlier_fraction=0.01, **LEGACY)
            k_out = e.outlier_idx.shape[1]
            with_sa = module(e, terms=2, group_size=gs, outliers=k_out)
            yield f"int4 T=2 grouped + 1% M_sa ({k_out}/row)", "bf16", fx(with_sa, "int4", 2)
        return
    # small shapes only (seconds per call on the big ones): the term-parallel einsum path, and the
    # kernels with float32 / float16 activations, whose CPU implementations are not vectorized
    yield "terms T=2 grouped", "bf16", fx(grouped, "terms", 2)
    w16 = w.half()
    yield "dense F.linear", "fp16", lambda x: F.linear(x, w16)
    yield "int4 T=1 grouped", "fp16", fx(grouped, "int4", 1)
    yield "int4 T=1 grouped", "fp32", fx(grouped, "int4", 1)
    yield "int4 T=2 grouped", "fp32", fx(grouped, "int4", 2)
    yield "int8-collapsed T=2 per-channel", "fp32", fx(per_channel, "int8", 2)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shapes = [s for s in SHAPES if f"{s[0]}x{s[1]}" in args.shapes] if args.shapes else SHAPES
    rows, started, load_before = [], time.perf_counter(), loadavg()
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * in_f**-0.5
        xs = {n: torch.randn(n, in_f) for n in TOKENS}
        exact = {n: F.linear(x, w) for n, x in xs.items()}
        paths = {(label, dname): fn for label, dname, fn in paths_for(w, big=out_f * in_f > 4e6)}
        for n in TOKENS:
            inputs = {d: xs[n].to(t) for d, t in DTYPES.items()}
            fns = {key: (lambda fn=fn, x=inputs[key[1]]: fn(x)) for key, fn in paths.items()}
            with torch.inference_mode():
                stats = measure_interleaved(fns, threads, args.rounds, args.budget, args.sample_time)
                snrs = {key: snr_db(fn(inputs[key[1]]), exact[n]) for key, fn in paths.items()}
            for (label, dname), st in stats.items():
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "tokens": n,
                        "path": label,
                        "dtype": dname,
                        **st,
                        "snr_vs_fp32_dense_db": round(snrs[(label, dname)], 2),
                    }
                )
                print(f"{out_f}x{in_f} n={n:<3} {label:<40} {dname}  {st['median_ms']:9.3f} ms", flush=True)
        del paths, fns
    for r in rows:
        base = next(
            b
            for b in rows
            if (b["shape"], b["tokens"], b["path"], b["dtype"])
            == (r["shape"], r["tokens"], "dense F.linear", "bf16")
        )
        r["ratio_to_bf16_dense"] = r["median_ms"] / base["median_ms"]
    return {
        "machine": {
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_num_threads": threads,
            "python": platform.python_version(),
            "fpxint_hf": fpxint_hf.__version__,
        },
        "settings": {
            "shapes_out_x_in": [f"{o}x{i}" for o, i in shapes],
            "tokens": list(TOKENS),
            "rounds_max": args.rounds,
            "sample_s": args.sample_time,
            "budget_s_per_shape_and_tokens": args.budget,
            "timer": "torch.utils.benchmark.Timer.timeit, interleaved rounds (order alternating), median over "
            "rounds of the per-call mean of each sample, after one warm-up call",
            "weights": "randn / sqrt(in), 4-bit asymmetric, no outliers unless stated; inputs randn",
            "total_s": round(time.perf_counter() - started, 1),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "rows": rows,
    }


def markdown(res: dict) -> str:
    mach, rows = res["machine"], res["rows"]
    shapes = res["settings"]["shapes_out_x_in"]
    lines = [
        "# FP=xINT CPU kernel benchmark",
        "",
        f"CPU: {mach['cpu']} ({mach['logical_cpus']} logical CPUs, flags: {' '.join(mach['cpu_flags'])}), "
        f"torch {mach['torch']} ({mach['torch_cpu_capability']}), `torch.set_num_threads({mach['torch_num_threads']})`.",
        "",
        f"Timer: {res['settings']['timer']}; total bench time {res['settings']['total_s']} s.  Cells: median ms "
        "(ratio to bf16 dense `F.linear` of the same shape and token count, same run; < 1 is faster).  "
        "Shapes are out x in; `T`: active terms; `act`: activation dtype.",
        "",
        f"Load average (1/5/15 min) before: {res['settings']['loadavg_before']}, after: "
        f"{res['settings']['loadavg_after']} (other jobs shared these CPUs).",
        "",
    ]
    for n in TOKENS:
        lines += [f"## {n} token{'s' if n > 1 else ''} ({'decode' if n == 1 else 'prefill'})", ""]
        lines += ["| path | act | " + " | ".join(shapes) + " |", "|---|---|" + "---:|" * len(shapes)]
        for path, dtype in dict.fromkeys((r["path"], r["dtype"]) for r in rows):
            cells = []
            for s in shapes:
                hit = [
                    r for r in rows if (r["shape"], r["tokens"], r["path"], r["dtype"]) == (s, n, path, dtype)
                ]
                cells.append(
                    f"{hit[0]['median_ms']:.3g} ({hit[0]['ratio_to_bf16_dense']:.2f}x)" if hit else "-"
                )
            lines.append(f"| {path} | {dtype} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "`-`: not run on that shape (the big shapes skip the paths that take seconds per call on the small "
        "ones: `terms`, and the kernels with fp32/fp16 activations).  The interleaved rounds keep the ratios fair "
        "when the load drifts; the single thread keeps a busy second core from stalling parallel regions.",
        "",
        "`grouped`: group size 128, or 64 where 128 does not divide in_features (576).  "
        "`per-channel`: one scale per output row (the only layout the int8 kernel takes).",
        "",
        "Accuracy (SNR of each path's output against the fp32 dense output, dB) and the first-call time "
        "(which includes preparing the packed weights) are in `bench_kernels.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1, see the module docstring)"
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (at most; at least 3)")
    p.add_argument(
        "--sample-time", type=float, default=0.05, help="seconds per timed sample (at least one call)"
    )
    p.add_argument("--budget", type=float, default=15.0, help="seconds of rounds per shape and token count")
    p.add_argument("--shapes", nargs="*", help="subset of shapes, e.g. 576x576 4096x4096")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    res = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_kernels.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out_dir / "bench_kernels.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
