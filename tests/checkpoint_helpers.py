"""Helpers shared by the checkpoint tests: what an FP=xINT layer stores and how it is saved."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from fpxint_hf import FPxINTLinear

BUFFER_DTYPES = {
    "codes": torch.uint8,
    "scale": torch.float16,
    "zero": torch.float16,
    "outlier_idx": torch.int16,  # in_features <= 32767
    "outlier_val": torch.float16,
    "terms_used": torch.int32,
}


def fpxint_modules(model: nn.Module) -> dict[str, FPxINTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FPxINTLinear)}


def saved_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def expected_buffers(module: FPxINTLinear) -> set[str]:
    names = {"codes", "scale", "terms_used"}
    if not module.symmetric:
        names.add("zero")
    if module.outlier_budget:
        names |= {"outlier_idx", "outlier_val"}
    return names
