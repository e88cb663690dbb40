"""Term parallelism of the ``int4`` backend, timed side by side (part of ``eval/bench_speed.py``).

On each SmolLM2 layer shape and token count, with bfloat16 activations:

- ``stacked``: ``kernels.int4_linear`` on the prepared weights of a real 2-term expansion (both terms in ONE
  ``_weight_int4pack_mm_for_cpu`` call, stacked along the input dimension, x repeated);
- ``wide``: one int4 matmul of the same total size, ``[out, 2·in]`` codes with the same group size, on an input
  that is already ``2·in`` wide: what the stacked call should cost;
- ``sequential``: the former path, one call per term (``[out, in]`` each) and a float32 add;
- ``out-stacked``: the alternative stacking, one call on ``[2·out, in]`` then ``view(n, 2, out).sum(1)``;
- ``T=1``: ``int4_linear`` with one term (half the work).

The extra paths use random codes and scales (the kernel's time does not depend on the values).
"""

from __future__ import annotations

from typing import Any

import torch
from bench_kernels import measure_interleaved

from fpxint_hf import kernels
from fpxint_hf.expansion import expand, resolve_group_size

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M: q/o, k/v, gate/up, down
TOKENS = (1, 512)


def _random_int4(out_f: int, in_f: int, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    table = (torch.rand(in_f // gs, out_f, 2) * 0.01).to(torch.bfloat16)
    return packed, table


def _paths(out_f: int, in_f: int, n: int) -> dict[str, Any]:
    torch.manual_seed(0)
    gs = resolve_group_size(in_f, 128)
    e = expand(torch.randn(out_f, in_f), bits=4, terms=2, group_size=gs)
    w2 = kernels.prepare_int4(e, 2, torch.bfloat16)
    w1 = kernels.prepare_int4(e, 1, torch.bfloat16)
    kgs = w2.group_size
    x = torch.randn(n, in_f, dtype=torch.bfloat16)
    x2 = torch.randn(n, 2 * in_f, dtype=torch.bfloat16)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    wide, seq_a, seq_b, outs = (
        _random_int4(2 * out_f if i == 3 else out_f, 2 * in_f if i == 0 else in_f, kgs) for i in range(4)
    )

    def sequential() -> torch.Tensor:
        return (mm(x, seq_a[0], kgs, seq_a[1]).float() + mm(x, seq_b[0], kgs, seq_b[1])).to(x.dtype)

    def out_stacked() -> torch.Tensor:
        return mm(x, outs[0], kgs, outs[1]).view(n, 2, out_f).float().sum(1).to(x.dtype)

    return {
        "stacked": lambda: kernels.int4_linear(x, w2),
        "wide": lambda: mm(x2, wide[0], kgs, wide[1]),
        "sequential": sequential,
        "out-stacked": out_stacked,
        "T=1": lambda: kernels.int4_linear(x, w1),
    }


def term_parallel_bench(threads: int, rounds: int = 5) -> list[dict[str, Any]]:
    """One record per (shape, tokens): median ms of every path and the ratios to ``wide``."""
    out = []
    for out_f, in_f in SHAPES:
        for n in TOKENS:
            times = measure_interleaved(_paths(out_f, in_f, n), threads, max(rounds, 3), 6.0, 0.05)
            ms = {k: v["median_ms"] for k, v in times.items()}
            out.append({"shape": [out_f, in_f], "tokens": n, "median_ms": ms})
    return out
