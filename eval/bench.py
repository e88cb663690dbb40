"""Side-by-side benchmark of FP=xINT against baselines and other 4-bit weight-only methods, in ONE process.

    python eval/bench.py [--quick]

Same model (the SmolLM2-135M FP folder of ``fpxint_hf.evaluation.assets.fp_model_dir()``), same inputs, rows:
bf16 and fp32 baselines, RTN W4 (fake-quantized, same group size as FP=xINT), bitsandbytes NF4, HQQ 4-bit
(``hqq.core.quantize.HQQLinear`` per ``nn.Linear``), torchao int4 weight-only (if it runs on CPU), the 8-bit peers
of T=2 at equal bits (RTN W8, bitsandbytes LLM.int8, HQQ 8-bit), FP=xINT T=1,2,3.
A row whose library is missing or fails is kept in the output with the reason.

Columns: bits per weight of the quantized linear weights from their stored bytes; PPL / KL / top-1 on the pydoc
text (``fpxint_hf.evaluation.metrics``) in the row's compute dtype, against the fp32 model; quantization wall
time (load + quantize) as a ratio to RTN's; prefill tokens/s (one 512-token forward) and decode tokens/s
(greedy ``generate``, batch 1), medians of repeats, timed round-robin over all rows and reported as ratios to
bf16; resident-memory increase of building each row (RSS is process-wide, so this is the RSS after the row's
model is built minus the RSS before, with every earlier model still resident) and the process peak RSS.
Writes ``eval/results/bench.json`` and ``eval/results/bench.md``.

Comparison libraries (the ``bench`` extra), installed without their dependencies so torch is left alone:
``pip install --no-deps bitsandbytes==0.50.2 hqq==0.2.8.post1 einops termcolor`` (psutil for RSS).
torchao (``pip install --no-deps torchao==0.18.0``) is tried; where its int4 weight-only path fails (0.18.0 on this
CPU: ``ImportError: Requires mslk >= 1.0.0``, a kernel package it does not declare), the row is kept as skipped
with the error it raised, which bench.md and docs/benchmarks.md quote.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench_report import SLOW_DECODE_TOK_S, SLOW_DECODE_TOKENS, targets, to_markdown  # noqa: E402
from _bench_rows import (  # noqa: E402
    BITS,
    GROUP,
    build_bnb,
    build_bnb_int8,
    build_dense,
    build_fpxint,
    build_hqq,
    build_rtn,
    build_torchao,
)

from fpxint_hf.evaluation.assets import fp_model_dir  # noqa: E402
from fpxint_hf.evaluation.metrics import evaluate_against, fp_reference, pydoc_windows  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402

OUT_DIR = ROOT / "eval" / "results"

try:
    import psutil

    _PROC = psutil.Process()
except ImportError:  # pragma: no cover
    _PROC = None


def rss_mb() -> float | None:
    return None if _PROC is None else _PROC.memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------ timing


@torch.no_grad()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    t = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def _environment(threads: int) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        env["cpu"] = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
        )
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        env["cpu_flags"] = sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))})
    except OSError:
        pass
    for mod in ("bitsandbytes", "hqq", "torchao", "psutil"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod)
        except Exception:
            env[mod] = None
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller budget (1024 PPL tokens, 1 timing repeat)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(OUT_DIR / "bench"), help="output prefix (.json, .md)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    settings = {
        "quick": args.quick,
        "ppl_tokens": 1024 if args.quick else 2048,
        "context": 512,
        "prefill_tokens": 512,
        "decode_prompt_tokens": 32,
        "decode_new_tokens": 16 if args.quick else 32,
        "repeats": 1 if args.quick else 3,
        "bits": BITS,
        "group_size": GROUP,
    }
    start = time.perf_counter()
    fp_dir = fp_model_dir()
    tok = AutoTokenizer.from_pretrained(fp_dir)
    windows = pydoc_windows(tok, settings["ppl_tokens"], settings["context"])
    long_windows = pydoc_windows(tok, 1024, 512)
    prefill_ids = long_windows[1:2]  # [1, 512]
    prompt = long_windows[0:1, : settings["decode_prompt_tokens"]]

    specs: list[tuple[str, str, Any]] = [
        ("fp32", "float32", lambda: build_dense(fp_dir, torch.float32)),
        ("bf16", "bfloat16", lambda: build_dense(fp_dir, torch.bfloat16)),
        ("RTN W4 g128", "bfloat16", lambda: build_rtn(fp_dir)),
        ("bnb NF4", "bfloat16", lambda: build_bnb(fp_dir)),
        ("HQQ 4-bit g64", "bfloat16", lambda: build_hqq(fp_dir)),
        ("torchao int4wo g64", "bfloat16", lambda: build_torchao(fp_dir)),
        # the equal-bits peers of FP=xINT T=2 (2x4 bits)
        ("RTN W8 g128", "bfloat16", lambda: build_rtn(fp_dir, 8)),
        ("bnb int8 (LLM.int8)", "bfloat16", lambda: build_bnb_int8(fp_dir)),
        ("HQQ 8-bit g64", "bfloat16", lambda: build_hqq(fp_dir, 8)),
        *[(f"FP=xINT T={t}", "bfloat16", (lambda t=t: build_fpxint(fp_dir, t))) for t in (1, 2, 3)],
    ]
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    reference = None
    for name, dtype, build in specs:
        print(f"[bench] building {name}", flush=True)
        row: dict[str, Any] = {"name": name, "compute_dtype": dtype}
        gc.collect()
        rss0 = rss_mb()
        t = time.perf_counter()
        try:
            model, bpw, notes = build()
        except Exception as e:  # keep the row with the reason
            row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
            print(f"[bench] {name} skipped: {row['skipped']}", flush=True)
            rows.append(row)
            gc.collect()
            continue
        row["quantize_s"] = time.perf_counter() - t
        if name.startswith("RTN"):
            rtn_fp32 = model
            model = None
        gc.collect()
        row["bits_per_weight"] = bpw
        row["notes"] = notes
        if name == "fp32":
            reference = fp_reference(model, windows)
        assert reference is not None
        if name.startswith("RTN"):
            # RTN is fake quantization (dequantized weights in a dense model): score it in fp32 too, then run
            # it in bf16 like the other quantized rows; its speed is that of the dense bf16 model (not timed).
            row["fp32_quality"] = evaluate_against(rtn_fp32, reference).to_json()
            model = rtn_fp32.to(torch.bfloat16)
            del rtn_fp32
            gc.collect()
            row["notes"].append("fake-quantized (dequantized weights in a dense bf16 model); speed not timed")
        row["rss_increase_mb"] = None if rss0 is None else rss_mb() - rss0
        row["quality"] = evaluate_against(model, reference).to_json()
        row["peak_rss_after_mb"] = peak_rss_mb()
        print(
            f"[bench] {name}: bpw={bpw:.3f} ppl={row['quality']['perplexity']:.3f} "
            f"q={row['quantize_s']:.1f}s",
            flush=True,
        )
        rows.append(row)
        models[name] = model

    # ---- timing: round-robin over all timed rows, repeats interleaved
    timed = [n for n in models if not n.startswith("RTN")]
    prefill: dict[str, list[float]] = {n: [] for n in timed}
    decode: dict[str, list[float]] = {n: [] for n in timed}
    by_name = {r["name"]: r for r in rows}
    with torch.no_grad():
        new_tokens: dict[str, int] = {}
        for n in timed:  # warm-up (kernel preparation, allocator); very slow decoders get a smaller budget
            time_prefill(models[n], prefill_ids[:, :64])
            rate = 4 / time_decode(models[n], prompt, 4)
            slow = rate < SLOW_DECODE_TOK_S
            new_tokens[n] = SLOW_DECODE_TOKENS if slow else settings["decode_new_tokens"]
            if slow:
                by_name[n]["notes"].append(
                    f"slow decode (~{rate:.2f} tok/s at warm-up): decode timed once on {SLOW_DECODE_TOKENS} new "
                    "tokens to keep the run short"
                )
        for rep in range(settings["repeats"]):
            print(f"[bench] timing round {rep + 1}/{settings['repeats']}", flush=True)
            for n in timed:
                prefill[n].append(time_prefill(models[n], prefill_ids))
                if rep == 0 or new_tokens[n] == settings["decode_new_tokens"]:
                    decode[n].append(time_decode(models[n], prompt, new_tokens[n]))
    for row in rows:
        n = row["name"]
        if n in timed:
            row["prefill_s"], row["decode_s"] = prefill[n], decode[n]
            row["prefill_tok_s"] = settings["prefill_tokens"] / statistics.median(prefill[n])
            row["decode_new_tokens"] = new_tokens[n]
            row["decode_tok_s"] = new_tokens[n] / statistics.median(decode[n])
    by = {r["name"]: r for r in rows}
    bf16, rtn = by["bf16"], by["RTN W4 g128"]
    for row in rows:
        if "prefill_tok_s" in row:
            row["prefill_vs_bf16"] = row["prefill_tok_s"] / bf16["prefill_tok_s"]
            row["decode_vs_bf16"] = row["decode_tok_s"] / bf16["decode_tok_s"]
        if "quantize_s" in row and "quantize_s" in rtn:
            row["quantize_vs_rtn"] = row["quantize_s"] / rtn["quantize_s"]

    result = {
        "rows": rows,
        "targets": targets(by),
        "settings": settings,
        "environment": _environment(threads),
        "process_peak_rss_mb": peak_rss_mb(),
        "wall_time_s": time.perf_counter() - start,
        "command": "python eval/bench.py" + (" --quick" if args.quick else ""),
    }
    print(write_results(args.out, result, to_markdown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
