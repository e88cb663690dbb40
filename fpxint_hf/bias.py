"""How Eq. 1's per-group ``scale_1`` and ``bias`` are stored: float16 rounded up, an int8 bias code, or an integer zero point.

``zero_bits=16`` (the default, and every checkpoint before the field) stores the bias as float16.
``zero_bits=8`` stores an int8 code ``b`` per group instead (8 bits per group fewer: 0.125 bits per weight at
group size 64), with

    bias = b · u,    u = scale_1 · 2^(X_1 - 8),    b ∈ [-128, 127]                      (Eq. Z)

``u`` is 1/16 of a first-term step for X_1 = 4 (1/32 for 3 bits, 1/64 for 2 bits), so ``b`` spans
±2^(X_1-1) steps: every group whose range holds 0 has its bias in reach, and moving the bias to the nearest
level of Eq. Z shifts the first-term grid by at most ``u/2`` (1/32 of a step at 4 bits), which the codes and
the later terms (computed from the stored values) absorb.  A group whose bias lies beyond ``127·u`` (all of its
weights far from 0) gets a larger ``scale_1`` so that it fits, as with integer zero points (GPTQ, AWQ).

``zero_bits=X_1`` (2, 3 or 4, the first term's width) stores an integer zero point ``z`` as GPTQ and AWQ do,
in steps of the first term's scale:

    value = (q - z) · scale_1,   bias = (2^(X_1-1) - z) · scale_1,   z ∈ [0, 2^X_1 - 1]      (Eq. Zi)

(the first term stores ``q`` with the offset ``2^(X_1-1)``, so its level ``q`` is ``bias + (q - 2^(X_1-1))·scale_1``).
The bias is then a whole number of first-term steps, from ``-(2^(X_1-1) - 1)`` to ``2^(X_1-1)``: Eq. Z with
``u = scale_1`` and the code ``b = 2^(X_1-1) - z``, which for ``X_1 = 8`` is what ``zero_bits=8`` already stores
(up to the code range's sign).  One term with Eq. Zi is exactly the asymmetric group grid of GPTQ, AWQ and
compressed-tensors' ``pack-quantized`` format (``hf/export.py``).  ``int_zero_grid`` fits it.

Every computation uses the float16 value ``bias_value(b, scale_1)``, a function of what is stored, so a
reloaded checkpoint computes with exactly the bias its codes were fitted against; ``bias_code`` recovers ``b``
from that value exactly (the float16 rounding of ``b·u`` moves it by less than ``u/2`` once ``u >= 2^-20``,
which ``int8_bias`` guarantees by a floor on ``scale_1``).  Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import math

import torch

from .fit import LS_ITERS, Grid, grid_codes, grid_error

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


def zero_point_value(z: torch.Tensor, scale16: torch.Tensor, bits1: int) -> torch.Tensor:
    """float16 bias ``(2^(X_1-1) - z)·scale_1`` ``[out, G]`` of the integer zero points ``z`` (Eq. Zi)."""
    return ((2 ** (bits1 - 1) - z.float()) * scale16.float()).to(torch.float16)


def zero_point(zero16: torch.Tensor, scale16: torch.Tensor, bits1: int) -> torch.Tensor:
    """int8 zero point ``z`` ``[out, G]`` nearest to the bias ``zero16`` (the exact inverse of ``zero_point_value``:
    the float16 rounding of ``k·scale_1``, ``|k| <= 8``, moves it by far less than half a step)."""
    half = 2 ** (bits1 - 1)
    z = half - zero16.float() / scale16.float()
    return z.round_().clamp_(0, 2 * half - 1).to(torch.int8)


def stored_bias(zero16: torch.Tensor, scale16: torch.Tensor, bits1: int, zero_bits: int) -> torch.Tensor:
    """What a layer stores for the float16 bias ``zero16``: the bias itself (``zero_bits=16``), its int8 code
    (``zero_bits=8``) or its integer zero point (``zero_bits=X_1 < 8``)."""
    if zero_bits == 16:
        return zero16
    return bias_code(zero16, scale16, bits1) if zero_bits == 8 else zero_point(zero16, scale16, bits1)


def bias_of(stored: torch.Tensor, scale16: torch.Tensor, bits1: int, zero_bits: int) -> torch.Tensor:
    """float16 bias of what ``stored_bias`` stored (the inverse: exact for every width)."""
    if zero_bits == 16:
        return stored
    return bias_value(stored, scale16, bits1) if zero_bits == 8 else zero_point_value(stored, scale16, bits1)


def int8_bias(scale16: torch.Tensor, zero16: torch.Tensor, bits1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 ``scale_1`` and bias ``[out, G]`` that Eq. Z can store: ``scale_1`` raised where the bias needs
    more than 127 units (or where ``u`` would fall below ``MIN_UNIT``), the bias moved to its nearest level."""
    ratio = unit_ratio(bits1)
    need = torch.maximum(zero16.float().abs() / (CODE_MAX * ratio), torch.tensor(MIN_UNIT / ratio))
    scale16 = torch.where(need > scale16.float(), ceil_fp16(need), scale16)
    return scale16, bias_value(bias_code(zero16, scale16, bits1), scale16, bits1)


def _zero_point_grid(scale16: torch.Tensor, z: torch.Tensor, bits1: int) -> Grid:
    """The first term's grid ``[out, G]`` (float32 values of the float16 scale and bias) of Eq. Zi."""
    half = 2 ** (bits1 - 1)
    return Grid(scale16.float(), zero_point_value(z, scale16, bits1).float(), -half, half - 1)


def _fp16_step(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(min=2.0**-24, max=65504.0).to(torch.float16)


def int_zero_grid(
    wg: torch.Tensor,
    scale16: torch.Tensor,
    zero16: torch.Tensor,
    bits1: int,
    weight: torch.Tensor | None = None,
    iters: int = LS_ITERS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 ``scale_1`` and bias ``[out, G]`` of the one-term ``bits1``-bit grid with an integer zero point
    (Eq. Zi) minimizing Eq. F (``fit.py``) on the groups ``wg`` ``[out, G, gs]`` (column weights ``weight``).

    Start, per group, from the better of the float fit (``scale16``, ``zero16``) with its bias moved to the
    nearest whole step and RTN's min-max grid with its zero rounded (GPTQ's ``round(-min/scale)``); then
    alternate: for fixed codes ``c`` and zero ``z`` the least-squares scale of ``w ≈ scale·(c + 2^(X-1) - z)``,
    then for that scale the zero nearest to the least-squares bias.  A step is kept only where it lowers the
    error, so the result is never worse than RTN with integer zeros on the same float16 scales."""
    wg = wg.float()
    a = torch.ones_like(wg) if weight is None else weight.float().expand_as(wg)
    half = 2 ** (bits1 - 1)
    rtn_scale, rtn_bias = rtn_zero_point(wg, bits1)
    rtn_z = zero_point(rtn_bias, rtn_scale, bits1)
    best_s, best_z = scale16, zero_point(zero16, scale16, bits1)
    err = grid_error(wg, _zero_point_grid(best_s, best_z, bits1), a)
    best_s, best_z, err = _keep(wg, a, bits1, (best_s, best_z, err), rtn_scale, rtn_z)
    for _ in range(iters):
        g = _zero_point_grid(best_s, best_z, bits1)
        c = grid_codes(wg, g).add_(half - best_z.float().unsqueeze(-1))  # w ≈ scale·c
        acc = (a * c * c).sum(-1)
        s = (a * c * wg).sum(-1) / acc.clamp(min=1e-30)
        s16 = torch.where((acc > 0) & (s > 0), _fp16_step(s), best_s)
        best_s, best_z, err = _keep(wg, a, bits1, (best_s, best_z, err), s16, best_z)
        codes = grid_codes(wg, _zero_point_grid(best_s, best_z, bits1))
        b = (a * (wg - codes * best_s.float().unsqueeze(-1))).sum(-1) / a.sum(-1).clamp(min=1e-30)
        z = (half - b / best_s.float()).round_().clamp_(0, 2 * half - 1).to(torch.int8)
        best_s, best_z, err = _keep(wg, a, bits1, (best_s, best_z, err), best_s, z)
    return best_s, zero_point_value(best_z, best_s, bits1)


def _keep(
    wg: torch.Tensor,
    a: torch.Tensor,
    bits1: int,
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    s16: torch.Tensor,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, the candidate ``(s16, z)`` where its error is lower than ``best``'s, else ``best``."""
    cand = grid_error(wg, _zero_point_grid(s16, z, bits1), a)
    better = cand < best[2]
    return (
        torch.where(better, s16, best[0]),
        torch.where(better, z, best[1]),
        torch.where(better, cand, best[2]),
    )


def rtn_zero_point(wg: torch.Tensor, bits1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 ``scale_1`` and bias ``[out, G]`` of GPTQ's round-to-nearest grid on the groups ``wg``: the min-max
    scale (rounded up to float16) and the zero point ``round(-min / scale)`` (Eq. Zi), the range widened to hold 0
    as GPTQ's quantizer does (so ``z`` is always in range)."""
    lo, hi = wg.float().amin(-1).clamp(max=0), wg.float().amax(-1).clamp(min=0)
    scale16 = ceil_fp16(((hi - lo) / (2**bits1 - 1)).clamp(min=2.0**-24))
    z = (-lo / scale16.float()).round_().clamp_(0, 2**bits1 - 1).to(torch.int8)
    return scale16, zero_point_value(z, scale16, bits1)


def covering_zero_point(
    scale16: torch.Tensor, zero16: torch.Tensor, term_bits: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 ``scale_1`` and bias ``[out, G]`` with an integer zero point (Eq. Zi) for a nested series of more
    than one term: of the two whole-step biases around ``zero16``, the one whose smallest ``scale_1`` still spans
    the range ``[lowest, highest]`` of the fitted series (``expansion.nested_first_term``) with the least scale.
    A group where neither spans it keeps ``scale16`` and the nearest whole step (its ends saturate)."""
    h1, tail = 2 ** (term_bits[0] - 1), 2.0 ** (sum(term_bits) - term_bits[0])
    below, above = h1 + 0.5 - 0.5 / tail, h1 - 0.5 - 0.5 / tail
    s, b = scale16.float(), zero16.float()
    lowest, highest = b - below * s, b + above * s
    best_s, best_z = scale16, zero_point(zero16, scale16, term_bits[0])
    best_need = torch.full_like(s, math.inf)
    for k in ((b / s).floor().clamp(1 - h1, h1), (b / s).ceil().clamp(1 - h1, h1)):
        need_lo = torch.where(lowest < 0, -lowest / (below - k), torch.zeros_like(s))
        up = k + above
        need_hi = torch.where(highest > 0, highest / up.clamp(min=1e-30), torch.zeros_like(s))
        need = torch.maximum(need_lo, need_hi).clamp(min=2.0**-24)
        s16 = ceil_fp16(need.clamp(max=65504.0))
        spans = ((k - below) * s16.float() <= lowest + 2**-6 * s) & (up * s16.float() >= highest - 2**-6 * s)
        ok = spans & (up > 0) & (need < best_need) & (need <= 65504.0)
        best_s, best_need = torch.where(ok, s16, best_s), torch.where(ok, need, best_need)
        best_z = torch.where(ok, (h1 - k).to(torch.int8), best_z)
    return best_s, zero_point_value(best_z, best_s, term_bits[0])


def zero_point_first_term(
    wc: torch.Tensor,
    scale16: torch.Tensor,
    zero16: torch.Tensor,
    term_bits: tuple[int, ...],
    fit: str,
    a: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale_1`` and bias with an integer zero point (Eq. Zi) from the nested series' fit on the groups ``wc``:
    one term is fitted under the constraint (``int_zero_grid``; ``fit="minmax"``: GPTQ's RTN grid); a longer
    series moves its bias to a whole step, ``scale_1`` raised so that it still spans its range
    (``covering_zero_point``)."""
    if len(term_bits) > 1:
        return covering_zero_point(scale16, zero16, term_bits)
    if fit == "minmax":
        return rtn_zero_point(wc, term_bits[0])
    return int_zero_grid(wc, scale16, zero16, term_bits[0], a)
