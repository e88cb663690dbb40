"""The first term of Eq. 1: ``scale_1`` and the bias of each group, by series rule and first-term fit.

- ``legacy_first_term``: the rule of fpxint_hf 0.1 (min-max range, nothing clamped).
- ``nested_first_term``: the whole nested series is one uniform grid of ``N = ΣX_i`` bits; its step and lowest
  level come from ``FIRST_TERM_FITS[fit]`` (``"optimized"``: ``fit.fit_grid``'s clip search and least squares,
  up to ``FIT_MAX_BITS`` bits in all; ``"minmax"``: RTN's range), and ``scale_1`` and the bias follow.

Stored values are float16, ``scale_1`` rounded up so the stored grid never shrinks the range it must cover.
Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bias import ceil_fp16
from .fit import Grid, fit_grid, minmax_grid

FIT_MAX_BITS = 8  # the error-minimizing fit is used for series of at most this many bits in total

_FP16_MAX = torch.finfo(torch.float16).max


def legacy_first_term(
    wc: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float16 ``scale_1`` and bias ``[out, G]`` of the legacy rule for the saturated groups ``wc`` ``[out, G, gs]``.

    ``scale_1`` (rounded up) covers ``[min, max]`` of each group given the stored bias, so no value is
    clamped: ``|R_1| <= scale_1 / 2``.
    """
    half = 2 ** (bits - 1)
    lo, hi = wc.amin(-1), wc.amax(-1)
    if symmetric:
        zero16 = None
        need = torch.maximum(hi.abs(), lo.abs()) / (half - 1)
    else:
        zero16 = (lo + half * (hi - lo) / (2**bits - 1)).to(torch.float16)
        zero = zero16.float()
        need = torch.maximum((zero - lo) / half, (hi - zero) / (half - 1))
    if need.numel() and need.max() > _FP16_MAX:
        raise ValueError(f"weight range {need.max().item():.3g} per step exceeds the float16 scale range")
    return ceil_fp16(need), zero16


def _optimized_grid(wg: torch.Tensor, bits: int, symmetric: bool, a: torch.Tensor | None) -> Grid:
    """``fit.fit_grid`` (clip search + least squares), up to ``FIT_MAX_BITS`` bits in all; min-max above."""
    if bits > FIT_MAX_BITS:
        return minmax_grid(wg, bits, symmetric)
    return fit_grid(wg, bits, symmetric=symmetric, weight=a)


def _minmax_grid(wg: torch.Tensor, bits: int, symmetric: bool, a: torch.Tensor | None) -> Grid:
    """RTN's min-max range (``a`` is not used)."""
    return minmax_grid(wg, bits, symmetric)


FIRST_TERM_FITS: dict[str, Callable[[torch.Tensor, int, bool, torch.Tensor | None], Grid]] = {
    "optimized": _optimized_grid,
    "minmax": _minmax_grid,
}
"""The first-term fits of a nested series by name (``fit``): the whole series' N-bit grid of each group of
``wc`` ``[out, G, gs]``.  Its keys are ``settings.FIT_METHODS`` (tests/test_defaults.py checks it)."""


def nested_first_term(
    wc: torch.Tensor, term_bits: tuple[int, ...], symmetric: bool, fit: str, a: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float16 ``scale_1`` and bias ``[out, G]`` of a nested series on the groups ``wc`` ``[out, G, gs]``.

    The whole series is one uniform grid of ``N = ΣX_i`` bits with step ``δ = scale_1 / 2^(N - X_1)``;
    its levels run from ``bias - 2^(X_1-1)·scale_1 - (scale_1 - δ)/2`` upwards (the mid-rise terms add
    ``±(scale_1 - δ)/2`` around each first-term level).  ``δ`` and the grid's lowest level come from
    the N-bit fit; the bias follows.
    """
    n = sum(term_bits)
    h1, tail = 2 ** (term_bits[0] - 1), 2.0 ** (n - term_bits[0])
    first_grid = FIRST_TERM_FITS[fit]
    if symmetric:
        g = first_grid(wc, n, True, a)
        reach = g.scale * (2 ** (n - 1) - 1)  # the fitted |range|
        scale = reach / (h1 - 0.5 - 0.5 / tail)
        return _fp16_scale(scale), None
    g = first_grid(wc, n, False, a)
    lowest = g.zero - 2 ** (n - 1) * g.scale  # the fitted grid's lowest and highest levels
    highest = g.zero + (2 ** (n - 1) - 1) * g.scale
    zero = lowest + h1 * g.scale * tail + (g.scale * tail - g.scale) / 2
    if zero.numel() and zero.abs().max() > _FP16_MAX:
        raise ValueError(f"weight bias {zero.abs().max().item():.3g} exceeds the float16 range")
    zero16 = zero.to(torch.float16)
    # scale_1 (rounded up) such that the stored grid, about the stored bias, still spans [lowest, highest]
    below, above = h1 + 0.5 - 0.5 / tail, h1 - 0.5 - 0.5 / tail
    z = zero16.float()
    scale = torch.maximum((z - lowest) / below, (highest - z) / above)  # above >= 1: every width is >= 2 bits
    return _fp16_scale(scale), zero16


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """float16 scale rounded up, so the stored grid never shrinks the range it must cover."""
    if scale.numel() and scale.max() > _FP16_MAX:
        raise ValueError(f"weight range {scale.max().item():.3g} per step exceeds the float16 scale range")
    return ceil_fp16(scale)
