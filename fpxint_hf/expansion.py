"""FP=xINT tensor expansion: a floating-point matrix as a series of low-bit integer matrices.

Theorem 1 of the paper writes every weight tensor, group by group, as

    M = M_sa + bias·1 + Σ_{i=1..T} scale_i · Q_i                                   (Eq. 1)

- ``Q_1`` is the X-bit quantization of ``M - M_sa`` (asymmetric: ``bias`` sits at the middle of the
  clip range; symmetric: ``bias = 0``);
- ``Q_i`` (i > 1) quantizes the residual ``R_{i-1} = M - M_sa - bias·1 - Σ_{j<i} scale_j Q_j``;
- ``M_sa`` holds the few values cut off by saturation (the part outside the clip range), kept as a
  sparse tensor with a fixed budget per output row.

Scales.  ``scale_1`` is chosen per group so that every value of ``M - M_sa`` lands on the grid
without clamping, hence ``|R_1| <= scale_1 / 2``.  Later terms use signed codes in
``[-(2^(X-1) - 1), 2^(X-1) - 1]`` and the fixed ratio ``scale_i = scale_{i-1} / (2^X - 2)``, so the
residual always fits the next grid exactly: ``|R_i| <= scale_i / 2`` and the error shrinks by
``2^X - 2`` (14 for 4-bit) with every added term.  Only ``scale_1`` (and ``bias``) are stored; the
residual scales follow from it.  Both are stored in float16, and every code is computed from the
*stored* value, so rounding of the stored scale/bias is absorbed by the later terms.

Every code is stored unsigned with the offset ``2^(X-1)``: ``value = (q - 2^(X-1)) · scale (+ bias)``,
the same convention as PyTorch's packed int4 kernels.

This module is pure torch math: no ``nn``, no transformers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_METHODS = ("laplace", "search", "minmax")

# ACIQ (Banner et al., 2019): clip value alpha / b minimizing the MSE of X-bit quantization of a
# Laplace(mu, b) variable.  The paper chooses the saturation range from a Laplace fit of the weights.
LAPLACE_CLIP = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
SEARCH_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # shrink factors of the min-max range
_FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class Expansion:
    """The terms of Eq. 1 for one 2-D weight ``[out_features, in_features]`` (unpacked codes)."""

    codes: torch.Tensor  # uint8 [T, out, in]: Q_i + 2^(X-1); unused terms hold 2^(X-1) (value 0)
    scale: torch.Tensor  # float16 [out, G]: scale_1 of each group
    zero: torch.Tensor | None  # float16 [out, G]: bias of each group; None when symmetric
    outlier_idx: torch.Tensor  # int32 [out, K]: column of each kept saturated value
    outlier_val: torch.Tensor  # float16 [out, K]: M_sa at that column (0 where the slot is unused)
    terms_used: int  # terms actually computed (<= T; fewer when the residual fell below tol)
    bits: int
    group_size: int

    @property
    def terms(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape[1:])


def residual_ratio(bits: int) -> int:
    """``scale_{i-1} / scale_i`` for i >= 2: the residual grid is ``2^X - 2`` times finer."""
    return 2**bits - 2


def term_scales(scale: torch.Tensor, bits: int, terms: int) -> torch.Tensor:
    """float32 ``[terms, out, G]``: ``scale_i = scale_1 / (2^X - 2)^(i-1)`` (Eq. 1)."""
    powers = torch.arange(terms, device=scale.device, dtype=torch.float32)
    return scale.float().unsqueeze(0) / residual_ratio(bits) ** powers.view(-1, 1, 1)


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """The group size actually used for a layer with ``in_features`` inputs.

    ``None`` means one group per output channel.  A ``group_size`` that does not divide
    ``in_features`` falls back to the largest power of two below it that does (at least 16),
    else to per-channel, with a warning: e.g. 576 inputs with group 128 use groups of 64.
    """
    if group_size is None or group_size >= in_features:
        return in_features
    if in_features % group_size == 0:
        return group_size
    g = 1 << (group_size.bit_length() - 1)
    while g >= 16 and in_features % g:
        g //= 2
    fallback = g if g >= 16 else in_features
    warnings.warn(
        f"group_size={group_size} does not divide in_features={in_features}; using "
        f"{'per-channel' if fallback == in_features else f'group_size={fallback}'} for this layer",
        stacklevel=2,
    )
    return fallback


def outlier_budget(in_features: int, outlier_fraction: float) -> int:
    """Fixed number K of saturated values kept per output row (0 disables ``M_sa``)."""
    return math.ceil(outlier_fraction * in_features) if outlier_fraction > 0 else 0


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, group_size)


def _ceil_fp16(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= x (so a stored scale never shrinks the range it must cover)."""
    y = x.clamp(min=2.0**-24).to(torch.float16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def clip_range(
    wg: torch.Tensor, bits: int, symmetric: bool, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saturation range ``[lo, hi]`` per group of ``wg`` ``[out, G, gs]``.

    ``laplace``: fit Laplace(mu, b) per group (mu = mean, b = mean |w - mu|; mu = 0 when symmetric)
    and clip at ``mu ± c_X·b`` (ACIQ constants).  ``search``: shrink the min-max range by the factor
    in ``SEARCH_GRID`` that minimizes the squared error of one X-bit term with clamping.
    ``minmax``: no saturation.
    """
    lo, hi = wg.amin(-1), wg.amax(-1)
    if symmetric:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    if method == "minmax":
        return lo, hi
    if method == "laplace":
        mu = torch.zeros_like(lo) if symmetric else wg.mean(-1)
        alpha = LAPLACE_CLIP[bits] * (wg - mu.unsqueeze(-1)).abs().mean(-1)
        return torch.maximum(lo, mu - alpha), torch.minimum(hi, mu + alpha)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best, best_err = (lo, hi), None
    for gamma in SEARCH_GRID:
        cand_lo, cand_hi = mid - gamma * half, mid + gamma * half
        step = ((cand_hi - cand_lo) / (2**bits - 1)).clamp(min=1e-12).unsqueeze(-1)
        q = ((wg.clamp(cand_lo.unsqueeze(-1), cand_hi.unsqueeze(-1)) - cand_lo.unsqueeze(-1)) / step).round()
        err = (q * step + cand_lo.unsqueeze(-1) - wg).pow(2).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, cand_lo, best[0]), torch.where(better, cand_hi, best[1]))
    return best


def saturate(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M_sa``: keep the ``budget`` largest saturated excesses per row, as (idx int32, val float16).

    Saturated values that do not fit the budget widen their group's range instead, so every
    value of ``M - M_sa`` stays representable and the series still converges.
    """
    out_features = w.shape[0]
    wg = _groups(w, group_size)
    excess = (wg - wg.clamp(lo.unsqueeze(-1), hi.unsqueeze(-1))).reshape(out_features, -1)
    idx = excess.abs().topk(budget, dim=1).indices if budget else excess.new_zeros(out_features, 0).long()
    kept = torch.zeros_like(excess, dtype=torch.bool).scatter_(1, idx, True)
    dropped = _groups(~kept & (excess != 0), group_size)
    lo = torch.minimum(lo, torch.where(dropped, wg, math.inf).amin(-1))
    hi = torch.maximum(hi, torch.where(dropped, wg, -math.inf).amax(-1))
    excess = (wg - wg.clamp(lo.unsqueeze(-1), hi.unsqueeze(-1))).reshape(out_features, -1)
    val = excess.gather(1, idx)
    if val.numel() and val.abs().max() > _FP16_MAX:
        raise ValueError(f"saturated weight excess {val.abs().max().item():.3g} exceeds the float16 range")
    return idx.to(torch.int32), val.to(torch.float16)


def sparse_matrix(idx: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense float32 ``M_sa`` from its per-row (idx, val) lists; unused slots carry val 0."""
    dense = torch.zeros(shape, dtype=torch.float32, device=val.device)
    return dense.scatter_add_(1, idx.long(), val.float())


def quantize_first_term(
    wc: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``Q_1``, ``scale_1``, ``bias`` and the residual ``R_1`` for the saturated groups ``wc`` ``[out, G, gs]``.

    ``scale_1`` (float16, rounded up) covers ``[min, max]`` of each group given the stored bias,
    so no value is clamped: ``|R_1| <= scale_1 / 2``.  ``Q_1`` is returned centred (float32,
    without the ``2^(X-1)`` offset).
    """
    half = 2 ** (bits - 1)
    lo, hi = wc.amin(-1), wc.amax(-1)
    if symmetric:
        zero16 = None
        need = torch.maximum(hi.abs(), lo.abs()) / (half - 1)
        residual = wc.clone()
    else:
        zero16 = (lo + half * (hi - lo) / (2**bits - 1)).to(torch.float16)
        zero = zero16.float()
        need = torch.maximum((zero - lo) / half, (hi - zero) / (half - 1))
        residual = wc - zero.unsqueeze(-1)
    if need.numel() and need.max() > _FP16_MAX:
        raise ValueError(f"weight range {need.max().item():.3g} per step exceeds the float16 scale range")
    scale16 = _ceil_fp16(need)
    q = _quantize_residual(residual, scale16.float().unsqueeze(-1), -half, half - 1)
    return q, scale16, zero16, residual


def _quantize_residual(residual: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Centred codes ``round(R / step)`` (float32); subtracts ``step · Q`` from ``residual`` in place."""
    q = residual.div(step).round_().clamp_(qmin, qmax)
    residual.sub_(q * step)
    return q


def dequantize_term(codes: torch.Tensor, step: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """float32 ``step · (Q - 2^(X-1))`` for codes ``[out, in]`` and per-group ``step`` ``[out, G]``."""
    q = _groups(codes, group_size).float().sub_(2 ** (bits - 1))
    return q.mul_(step.unsqueeze(-1)).reshape(codes.shape)


def expand(
    w: torch.Tensor,
    bits: int = 4,
    terms: int = 2,
    group_size: int | None = 128,
    symmetric: bool = False,
    clip: str = "laplace",
    outlier_fraction: float = 0.0,
    tol: float = 0.0,
) -> Expansion:
    """Expand a 2-D weight into Eq. 1.  ``group_size`` must divide ``in_features`` (see
    ``resolve_group_size``); ``tol > 0`` stops once ``max |R_i| < tol``.

    With ``outlier_fraction == 0`` nothing is saturated (``M_sa = 0``): every value must then be
    representable, so the clip range is the group's min-max range whatever ``clip`` says.
    """
    if w.dim() != 2:
        raise ValueError(f"expand() takes a 2-D weight, got shape {tuple(w.shape)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; allowed: {SUPPORTED_BITS}")
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip={clip!r} is not supported; allowed: {CLIP_METHODS}")
    out_features, in_features = w.shape
    gs = in_features if group_size is None else group_size
    if in_features % gs:
        raise ValueError(f"group_size={gs} does not divide in_features={in_features}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    w = w.detach().float()
    half = 2 ** (bits - 1)

    budget = outlier_budget(in_features, outlier_fraction)
    if budget:
        lo, hi = clip_range(_groups(w, gs), bits, symmetric, clip)
        idx, val = saturate(w, lo, hi, gs, budget)
        wc = w - sparse_matrix(idx, val, w.shape)  # M - M_sa
    else:
        idx = torch.zeros(out_features, 0, dtype=torch.int32, device=w.device)
        val = torch.zeros(out_features, 0, dtype=torch.float16, device=w.device)
        wc = w

    q, scale16, zero16, residual = quantize_first_term(_groups(wc, gs), bits, symmetric)
    codes = torch.full((terms, out_features, in_features), half, dtype=torch.uint8, device=w.device)
    codes[0] = q.add_(half).reshape(out_features, in_features)
    steps = term_scales(scale16, bits, terms).unsqueeze(-1)
    used = 1
    for i in range(1, terms):
        if tol > 0 and residual.abs().max() < tol:
            break
        q = _quantize_residual(residual, steps[i], -(half - 1), half - 1)
        codes[i] = q.add_(half).reshape(out_features, in_features)
        used += 1
    return Expansion(codes, scale16, zero16, idx, val, used, bits, gs)


def reconstruct(e: Expansion, terms: int | None = None) -> torch.Tensor:
    """Invert Eq. 1 with the first ``terms`` terms (default: all computed): float32 ``[out, in]``."""
    k = e.terms_used if terms is None else min(terms, e.terms_used)
    steps = term_scales(e.scale, e.bits, k)
    approx = dequantize_term(e.codes[0], steps[0], e.bits, e.group_size)
    if e.zero is not None:
        approx = _groups(approx, e.group_size).add_(e.zero.float().unsqueeze(-1)).reshape(approx.shape)
    for i in range(1, k):
        approx += dequantize_term(e.codes[i], steps[i], e.bits, e.group_size)
    return approx + sparse_matrix(e.outlier_idx, e.outlier_val, e.shape)


def rtn(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Plain asymmetric min-max round-to-nearest ("Normal" in the paper), dequantized, float32."""
    w = w.detach().float()
    gs = w.shape[1] if group_size is None else group_size
    wg = _groups(w, gs)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    step = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    return (((wg - lo) / step).round() * step + lo).reshape(w.shape)


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """``||approx - ref||_F / ||ref||_F``."""
    ref = ref.float()
    return ((approx.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def snr_db(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB, as torchao's ``compute_error``: ``20·log10(||ref|| / ||ref - approx||)``."""
    ref = ref.float()
    noise = (ref - approx.float()).norm()
    return math.inf if noise == 0 else (20 * torch.log10(ref.norm() / noise)).item()
