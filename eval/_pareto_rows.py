"""Row builders of eval/bench_pareto.py: every method at group 64, weights fake-quantized or FP=xINT modules.

Peers are fake-quantized (their dequantized weights in the float32 model) so every row runs the same float32
forward; bits per weight count what each method stores (codes + scales/zeros/absmax) per linear weight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpxint_hf import FPxINTConfig
from fpxint_hf.evaluation.assets import fp_model_dir
from fpxint_hf.evaluation.metrics import (
    FPReference,
    QualityMetrics,
    evaluate_against,
    fp_reference,
    pydoc_windows,
)
from fpxint_hf.evaluation.table import quantizable_linears
from fpxint_hf.expansion import rtn
from fpxint_hf.model_ops import model_bits_per_weight, set_active_terms

GROUP = 64


def load_fp(fp_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()


@dataclass(frozen=True)
class Baseline:
    """What every row of the accuracy benches (pareto, options, act) is measured against."""

    fp_dir: Path  # the embedded SmolLM2 FP folder
    tokens: int  # pydoc tokens, in windows of 512
    ref: FPReference  # the float32 FP model's next-token log-probs on them
    fp: QualityMetrics  # the FP model's own scores (its perplexity)


def fp_baseline(tokens: int) -> Baseline:
    """Load the FP model once, keep its reference on ``tokens`` pydoc tokens and its own scores, free it."""
    from transformers import AutoTokenizer

    fp_dir = fp_model_dir()
    fp = load_fp(fp_dir)
    windows = pydoc_windows(AutoTokenizer.from_pretrained(fp_dir), tokens, 512)
    ref = fp_reference(fp, windows)
    return Baseline(fp_dir, windows.numel(), ref, evaluate_against(fp, ref))


def fake_quant(fp_dir: Path, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[nn.Module, float]:
    """The FP model with every quantizable linear weight replaced by ``fn(weight)``; returns (model, seconds)."""
    model = load_fp(fp_dir)
    start = time.perf_counter()
    with torch.no_grad():
        for _, lin in quantizable_linears(model):
            lin.weight.copy_(fn(lin.weight.float()))
    return model, time.perf_counter() - start


def counted_row(
    fp_dir: Path, fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, float]]
) -> dict[str, Any]:
    """A peer whose ``fn(weight, layer index)`` returns (dequantized weight, stored bits), bits summed."""
    model = load_fp(fp_dir)
    stored = n = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for i, (_, lin) in enumerate(quantizable_linears(model)):
            deq, bits = fn(lin.weight.float(), i)
            lin.weight.copy_(deq)
            stored, n = stored + bits, n + lin.weight.numel()
    return {"model": model, "bits": stored / n, "quant_s": time.perf_counter() - start}


def rtn_row(fp_dir: Path, bits: int, group: int = GROUP) -> dict[str, Any]:
    model, secs = fake_quant(fp_dir, lambda w: rtn(w, bits, group))
    return {"model": model, "bits": bits + 32 / group, "quant_s": secs}


def rtn8_top4_row(fp_dir: Path) -> dict[str, Any]:
    """The naive "several precisions from one file": the top 4 bits of each RTN W8 code, read at the
    midpoint of the 16 codes they stand for (4.5 bits per weight if stored alone)."""

    def top4(w: torch.Tensor) -> torch.Tensor:
        wg = w.reshape(w.shape[0], -1, GROUP)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        step = ((hi - lo) / 255).clamp(min=1e-12)
        q8 = ((wg - lo) / step).round()
        return ((torch.div(q8, 16, rounding_mode="floor") * 16 + 7.5) * step + lo).reshape(w.shape)

    model, secs = fake_quant(fp_dir, top4)
    return {"model": model, "bits": 4 + 32 / GROUP, "quant_s": secs}


def hqq_row(fp_dir: Path, nbits: int) -> dict[str, Any]:
    from hqq.core.quantize import Quantizer

    def hqq(w: torch.Tensor) -> torch.Tensor:
        w_q, meta = Quantizer.quantize(
            w, nbits=nbits, group_size=GROUP, optimize=True, axis=1, compute_dtype=torch.float32, device="cpu"
        )
        return Quantizer.dequantize(w_q, meta).reshape(w.shape).float()

    model, secs = fake_quant(fp_dir, hqq)
    # hqq stores a float16 scale and zero per group (compute dtype float16/bfloat16 in practice)
    return {"model": model, "bits": nbits + 32 / GROUP, "quant_s": secs}


def nf4_row(fp_dir: Path) -> dict[str, Any]:
    import bitsandbytes.functional as bnbf

    def nf4(w: torch.Tensor) -> torch.Tensor:
        q, state = bnbf.quantize_4bit(w, blocksize=GROUP, quant_type="nf4")
        return bnbf.dequantize_4bit(q, state).float()

    model, secs = fake_quant(fp_dir, nf4)
    return {"model": model, "bits": 4 + 32 / GROUP, "quant_s": secs}  # float32 absmax per block of 64


def int8_row(fp_dir: Path) -> dict[str, Any]:
    """LLM.int8's weight format (int8, float32 absmax per output row); its run-time outlier decomposition of
    the activations is not modelled by a weight-only fake quantization."""

    def int8(w: torch.Tensor) -> torch.Tensor:
        absmax = w.abs().amax(1, keepdim=True).clamp(min=1e-12)
        return (w / absmax * 127).round() * absmax / 127

    model, secs = fake_quant(fp_dir, int8)
    n = sum(lin.weight.numel() for _, lin in quantizable_linears(model))
    rows = sum(lin.weight.shape[0] for _, lin in quantizable_linears(model))
    return {"model": model, "bits": 8 + 32 * rows / n, "quant_s": secs}


def fpxint_row(fp_dir: Path, active: int | None = None, **cfg: Any) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    config = FPxINTConfig(group_size=GROUP, forward_mode="dense", **cfg)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=config, dtype=torch.float32
    ).eval()
    secs = time.perf_counter() - start
    if active is not None:
        set_active_terms(model, active)
    return {"model": model, "bits": model_bits_per_weight(model, active), "quant_s": secs}
