"""Decode and prefill speed of FP=xINT against bf16, against the memory-bound limit, in ONE process.

    python eval/bench_speed.py [--quick] [--threads N] [--profile ROW]

Model: the embedded SmolLM2-135M FP folder (``fpxint_hf.evaluation.assets.fp_model_dir()``), built per row as
``eval/bench.py`` builds it (``from_pretrained`` with an ``FPxINTConfig``; ``lm_head``, tied to the embedding, stays
bf16).  Rows are ``SpeedRow``s in ``ROWS``: ``FPxINTConfig`` keyword arguments + a forward mode; a new row is one
line (e.g. ``SpeedRow("FP=xINT W4A8 T=1 int", {**W4, "terms": 1, "act_bits": 8}, "auto")``).

Measured, side by side (rows and repeats round-robin, medians of repeats):

- prefill tokens/s: one forward of a 512-token prompt (batch 1, fresh ``DynamicCache``, ``logits_to_keep=1`` as
  ``generate`` does);
- decode tokens/s: after a 32-token prompt (not timed), N greedy steps of one token each with the KV cache (the
  forward ``generate`` runs per new token, without its bookkeeping);
- a STREAM-like copy bandwidth (``b.copy_(a)`` of two 256 MiB float32 tensors, read + written bytes / time), one
  sample per round;
- bytes read per decoded token of each row, counted from what the forward actually reads: the prepared kernel
  weights of every ``FPxINTLinear`` (packed codes + scale/zero tables + outliers, or the dense weight), every
  ``nn.Linear`` weight (the bf16 ``lm_head``), one embedding row, the norms, and the KV cache at the mean decode
  context; memory-bound limit = bandwidth / bytes, and each row's decode as a fraction of it;
- term parallelism: the ``int4`` backend's T=2 call (``kernels.int4_linear``: terms stacked along the input
  dimension, one kernel call) against one int4 matmul of the same total size (``[out, 2·in]``), against the
  former T sequential calls and against stacking along the output dimension, on SmolLM2's layer shapes;
- the W4A8 products on one layer (``_speed_act``): bf16 ``F.linear``, the int4 kernel, and ``act_linear`` with
  float32 matmuls on the codes and with ``torch._int_mm``.

Writes ``eval/results/speed.json`` and ``speed.md`` (``_speed_report.to_markdown``; the test re-renders it).
Threads: torch's default unless ``--threads``; the copy bandwidth is measured with the same threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from _speed_act import w4a8_kernel_bench  # noqa: E402
from _speed_report import targets, to_markdown  # noqa: E402
from _speed_terms import term_parallel_bench  # noqa: E402

from fpxint_hf.evaluation.assets import fp_model_dir  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402
from fpxint_hf.linear import FPxINTLinear  # noqa: E402

OUT = ROOT / "eval" / "results" / "speed"
W4 = {"bits": 4, "group_size": 128}  # W4A16, group 128 (64 on the 576-input layers), the defaults' series


@dataclass(frozen=True)
class SpeedRow:
    """One timed model: ``config`` = ``FPxINTConfig`` kwargs (``None``: the plain bf16 model), ``forward_mode``."""

    name: str
    config: dict[str, Any] | None = None
    forward_mode: str | None = None
    notes: list[str] = field(default_factory=list)


ROWS = [
    SpeedRow("bf16"),
    SpeedRow("FP=xINT W4A16 T=1 int4", {**W4, "terms": 1}, "int4"),
    SpeedRow("FP=xINT W4A16 T=1 dense", {**W4, "terms": 1}, "dense"),
    SpeedRow("FP=xINT W4A16 T=2 int4", {**W4, "terms": 2}, "int4"),
    SpeedRow("FP=xINT W4A16 T=2 dense", {**W4, "terms": 2}, "dense"),
    SpeedRow("FP=xINT W4A8 T=1 int", {**W4, "terms": 1, "act_bits": 8}, "auto"),  # torch._int_mm products
    SpeedRow(
        "FP=xINT W4A8 T=1 int, per channel",
        {"bits": 4, "group_size": None, "terms": 1, "act_bits": 8},
        "auto",
    ),
]


def build(row: SpeedRow, fp_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from fpxint_hf import FPxINTConfig, set_forward_mode

    if row.config is None:
        return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()
    cfg = FPxINTConfig(**row.config, forward_mode=row.forward_mode or "auto")
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.bfloat16).eval()
    return set_forward_mode(model, row.forward_mode or "auto")


# ------------------------------------------------------------------ timing


def _cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, cache=_cache(model), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


@torch.inference_mode()
def time_decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy one-token forwards with the KV cache, after the (untimed) prompt."""
    cache = _cache(model)
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def copy_bandwidth(a: torch.Tensor, b: torch.Tensor, copies: int = 5) -> float:
    """STREAM "copy": bytes read + written per second, median of ``copies`` ``b.copy_(a)``."""
    times = []
    for _ in range(copies):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


# ------------------------------------------------------------------ bytes per decoded token


def tensor_bytes(obj: Any) -> int:
    """Bytes of a tensor (sparse CSR: its three arrays), or of every tensor field of a prepared-weights dataclass."""
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.sparse_csr:
            return sum(tensor_bytes(t) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
        return obj.numel() * obj.element_size()
    if is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in fields(obj))
    return 0


def decode_bytes(model: nn.Module, context: float) -> dict[str, float]:
    """Bytes one decoded token reads (after a warm-up forward built the kernel caches), by kind."""
    parts = {"quantized_linears": 0.0, "dense_linears": 0.0, "embedding_row": 0.0, "other_params": 0.0}
    for m in model.modules():
        if isinstance(m, FPxINTLinear):
            if m._kernel_cache is None:
                raise RuntimeError(f"{m.extra_repr()}: no prepared weights (run a forward first)")
            parts["quantized_linears"] += tensor_bytes(m._kernel_cache[2]) + tensor_bytes(m.bias)
        elif isinstance(m, nn.Linear):
            parts["dense_linears"] += tensor_bytes(m.weight) + tensor_bytes(m.bias)
        elif isinstance(m, nn.Embedding):
            parts["embedding_row"] += m.embedding_dim * m.weight.element_size()
        else:
            parts["other_params"] += sum(tensor_bytes(p) for p in m.parameters(recurse=False))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_row = 2 * cfg.num_key_value_heads * head_dim * 2  # K and V, bf16
    parts["kv_cache"] = cfg.num_hidden_layers * kv_row * context
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------ profile


def profile_decode(model: nn.Module, prompt: torch.Tensor, steps: int, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    time_decode(model, prompt, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_decode(model, prompt, steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    path.write_text(f"torch.profiler, {steps} decode steps (plus one prompt forward)\n\n{table}\n")
    print(table)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 16 decode steps, 1 term-parallel round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(OUT), help="output prefix (.json, .md)")
    ap.add_argument("--profile", metavar="ROW", help="only profile decode of the row with this name")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    start, load_before = time.perf_counter(), os.getloadavg()
    settings = {
        "quick": args.quick,
        "prefill_tokens": 512,
        "decode_prompt_tokens": 32,
        "decode_steps": 16 if args.quick else 64,
        "repeats": 1 if args.quick else 3,
        "threads": threads,
    }
    fp_dir = fp_model_dir()
    from transformers import AutoTokenizer

    from fpxint_hf.evaluation.metrics import pydoc_windows

    ids = pydoc_windows(AutoTokenizer.from_pretrained(fp_dir), 1024, 512)
    prefill_ids, prompt = ids[1:2], ids[0:1, : settings["decode_prompt_tokens"]]
    steps = settings["decode_steps"]
    rows = [r for r in ROWS if args.profile in (None, r.name)]
    if not rows:
        ap.error(f"--profile {args.profile!r} is not a row: {[r.name for r in ROWS]}")
    models = {}
    for r in rows:
        print(f"[speed] building {r.name}", flush=True)
        models[r.name] = build(r, fp_dir)
    if args.profile:
        name = args.profile.replace(" ", "_").replace("=", "")
        profile_decode(
            models[args.profile], prompt, steps, Path(args.out).parent / f"speed_profile_{name}.txt"
        )
        return 0

    a = torch.rand(2**26)  # 256 MiB float32, far beyond the caches
    b = torch.empty_like(a)
    copy_bandwidth(a, b, 2)
    prefill: dict[str, list[float]] = {r.name: [] for r in rows}
    decode: dict[str, list[float]] = {r.name: [] for r in rows}
    bandwidth: list[float] = []
    for r in rows:  # warm-up: builds kernel caches, allocator
        time_prefill(models[r.name], prefill_ids[:, :64])
        time_decode(models[r.name], prompt, 2)
    for rep in range(settings["repeats"]):
        print(f"[speed] round {rep + 1}/{settings['repeats']}", flush=True)
        bandwidth.append(copy_bandwidth(a, b))
        for r in rows if rep % 2 == 0 else rows[::-1]:
            prefill[r.name].append(time_prefill(models[r.name], prefill_ids))
            decode[r.name].append(time_decode(models[r.name], prompt, steps))
    bandwidth.append(copy_bandwidth(a, b))
    del a, b
    context = settings["decode_prompt_tokens"] + (steps + 1) / 2
    out_rows = []
    for r in rows:
        out_rows.append(
            {
                **asdict(r),
                "prefill_s": prefill[r.name],
                "decode_s": decode[r.name],
                "prefill_tok_s": settings["prefill_tokens"] / statistics.median(prefill[r.name]),
                "decode_tok_s": steps / statistics.median(decode[r.name]),
                "decode_bytes": decode_bytes(models[r.name], context),
            }
        )
    print("[speed] term parallelism", flush=True)
    terms = term_parallel_bench(threads, rounds=1 if args.quick else 5)
    print("[speed] W4A8 products", flush=True)
    w4a8 = w4a8_kernel_bench(threads, rounds=1 if args.quick else 3)
    result = {
        "rows": out_rows,
        "copy_bandwidth_bytes_s": bandwidth,
        "term_parallel": terms,
        "w4a8_kernels": w4a8,
        "settings": settings,
        "environment": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        },
        "wall_time_s": time.perf_counter() - start,
        "command": "python eval/bench_speed.py"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else ""),
    }
    result["targets"] = targets(result)
    print(write_results(args.out, result, to_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
