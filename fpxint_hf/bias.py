"""How Eq. 1's per-group ``scale_1`` and ``bias`` are stored: float16 rounded up, and the int8 bias code.

``zero_bits=16`` (the default, and every checkpoint before the field) stores the bias as float16.
``zero_bits=8`` stores an int8 code ``b`` per group instead (8 bits per group fewer: 0.125 bits per weight at
group size 64), with

    bias = b · u,    u = scale_1 · 2^(X_1 - 8),    b ∈ [-128, 127]                      (Eq. Z)

``u`` is 1/16 of a first-term step for X_1 = 4 (1/32 for 3 bits, 1/64 for 2 bits), so ``b`` spans
±2^(X_1-1) steps: every group whose range holds 0 has its bias in reach, and moving the bias to the nearest
level of Eq. Z shifts the first-term grid by at most ``u/2`` (1/32 of a step at 4 bits), which the codes and
the later terms (computed from the stored values) absorb.  A group whose bias lies beyond ``127·u`` (all of its
weights far from 0) gets a larger ``scale_1`` so that it fits, as with integer zero points (GPTQ, AWQ).

Every computation uses the float16 value ``bias_value(b, scale_1)``, a function of what is stored, so a
reloaded checkpoint computes with exactly the bias its codes were fitted against; ``bias_code`` recovers ``b``
from that value exactly (the float16 rounding of ``b·u`` moves it by less than ``u/2`` once ``u >= 2^-20``,
which ``int8_bias`` guarantees by a floor on ``scale_1``).  Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import math

import torch

CODE_MIN, CODE_MAX = -128, 127
MIN_UNIT = 2.0**-20  # the smallest u: keeps float16(b·u) within u/2 of b·u, also for subnormal values


def ceil_fp16(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= x (so a stored scale never shrinks the range it must cover)."""
    y = x.clamp(min=2.0**-24).to(torch.float16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def unit_ratio(bits1: int) -> float:
    """``u / scale_1 = 2^(X_1 - 8)`` of Eq. Z for a first term of ``bits1`` bits."""
    return 2.0 ** (bits1 - 8)


def bias_value(code: torch.Tensor, scale16: torch.Tensor, bits1: int) -> torch.Tensor:
    """float16 bias ``[out, G]`` of the int8 codes ``b`` (Eq. Z)."""
    return (code.float() * scale16.float() * unit_ratio(bits1)).to(torch.float16)


def bias_code(zero16: torch.Tensor, scale16: torch.Tensor, bits1: int) -> torch.Tensor:
    """int8 code ``b`` ``[out, G]`` nearest to the bias ``zero16`` (the exact inverse of ``bias_value``)."""
    u = scale16.float() * unit_ratio(bits1)
    return zero16.float().div(u).round_().clamp_(CODE_MIN, CODE_MAX).to(torch.int8)


def stored_bias(zero16: torch.Tensor, scale16: torch.Tensor, bits1: int, zero_bits: int) -> torch.Tensor:
    """What a layer stores for the float16 bias ``zero16``: the bias itself (``zero_bits=16``) or its int8 code."""
    return zero16 if zero_bits == 16 else bias_code(zero16, scale16, bits1)


def bias_of(stored: torch.Tensor, scale16: torch.Tensor, bits1: int, zero_bits: int) -> torch.Tensor:
    """float16 bias of what ``stored_bias`` stored (the inverse: exact for both widths)."""
    return stored if zero_bits == 16 else bias_value(stored, scale16, bits1)


def int8_bias(scale16: torch.Tensor, zero16: torch.Tensor, bits1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 ``scale_1`` and bias ``[out, G]`` that Eq. Z can store: ``scale_1`` raised where the bias needs
    more than 127 units (or where ``u`` would fall below ``MIN_UNIT``), the bias moved to its nearest level."""
    ratio = unit_ratio(bits1)
    need = torch.maximum(zero16.float().abs() / (CODE_MAX * ratio), torch.tensor(MIN_UNIT / ratio))
    scale16 = torch.where(need > scale16.float(), ceil_fp16(need), scale16)
    return scale16, bias_value(bias_code(zero16, scale16, bits1), scale16, bits1)
