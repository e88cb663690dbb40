"""The W4A8 products, timed side by side on one layer (part of ``eval/bench_speed.py``).

On the SmolLM2 gate/up and down shapes, 1 and 512 tokens, bfloat16 activations in and out:

- ``bf16``: ``F.linear`` with a bf16 weight (the unquantized layer);
- ``W4A16 int4``: ``kernels.int4_linear`` on a 1-term expansion (the packed int4 kernel);
- ``W4A8 float32-codes``: ``act_kernels.act_linear`` with ``method="float32"`` (float32 sgemm on the integer
  codes, exact; the CPU default of an ``act_bits`` layer);
- ``W4A8 int``: the same with ``method="int"``: ``torch._int_mm`` (int8 × int8 → int32, oneDNN's integer GEMM
  where torch routes it there; on this torch's CPU build it is the path the issue names).

All four compute the same layer (the W4A8 paths bit-identically); only the time differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from bench_kernels import measure_interleaved

from fpxint_hf import kernels
from fpxint_hf.act_kernels import ActSpec, act_linear, prepare_act
from fpxint_hf.expansion import expand, reconstruct, resolve_group_size

SHAPES = [(1536, 576), (576, 1536)]  # SmolLM2-135M gate/up and down
TOKENS = (1, 512)
PATHS = ("bf16", "W4A16 int4", "W4A8 float32-codes", "W4A8 int")


def _paths(out_f: int, in_f: int, n: int) -> dict[str, Any]:
    torch.manual_seed(0)
    e = expand(torch.randn(out_f, in_f) * 0.02, bits=4, terms=1, group_size=resolve_group_size(in_f, 128))
    w_bf16 = reconstruct(e, 1).to(torch.bfloat16)
    int4 = kernels.prepare_int4(e, 1, torch.bfloat16)
    a8 = {m: prepare_act(e, 1, ActSpec(8, 1, 0.0, 4, m)) for m in ("float32", "int")}
    x = torch.randn(n, in_f, dtype=torch.bfloat16)
    return {
        "bf16": lambda: F.linear(x, w_bf16),
        "W4A16 int4": lambda: kernels.int4_linear(x, int4),
        "W4A8 float32-codes": lambda: act_linear(x, a8["float32"]),
        "W4A8 int": lambda: act_linear(x, a8["int"]),
    }


def w4a8_kernel_bench(threads: int, rounds: int = 3) -> list[dict[str, Any]]:
    """One record per (shape, tokens): median ms of every path."""
    out = []
    for out_f, in_f in SHAPES:
        for n in TOKENS:
            times = measure_interleaved(_paths(out_f, in_f, n), threads, max(rounds, 3), 20.0, 0.05)
            out.append(
                {
                    "shape": [out_f, in_f],
                    "tokens": n,
                    "median_ms": {k: v["median_ms"] for k, v in times.items()},
                }
            )
    return out
