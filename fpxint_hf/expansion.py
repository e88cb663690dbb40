"""FP=xINT tensor expansion: a floating-point matrix as a series of low-bit integer matrices.

Theorem 1 of the paper writes every weight tensor, group by group, as

    M = M_sa + bias·1 + Σ_{i=1..T} scale_i · Q_i                                   (Eq. 1)

- ``Q_1`` is the X-bit quantization of ``M - M_sa`` (asymmetric: ``bias`` sits at the middle of the
  clip range; symmetric: ``bias = 0``);
- ``Q_i`` (i > 1) quantizes the residual ``R_{i-1} = M - M_sa - bias·1 - Σ_{j<i} scale_j Q_j``;
- ``M_sa`` holds the few values cut off by saturation (the part outside the clip range), kept as a
  sparse tensor with a fixed budget per output row.

Only ``scale_1`` and ``bias`` are stored (float16, per group; the bias as an int8 code with ``zero_bits=8``,
``bias.py``); the residual scales follow from them by a fixed ratio, and every code is computed from the *stored* values, so their rounding is absorbed by the
later terms.

Every code is stored unsigned with the offset ``2^(X-1)``: ``value = (q - 2^(X-1)) · scale (+ bias)``,
the same convention as PyTorch's packed int4 kernels.

Two series rules (``SERIES_RULES``; a checkpoint records its rule in its config):

- ``"legacy"`` (checkpoints of fpxint_hf 0.1): ``scale_1`` covers each group's min-max range without
  clamping (``|R_1| <= scale_1/2``); later terms use signed codes ``±(2^(X-1) - 1)`` on a grid ``2^X - 2``
  times finer, so the residual always fits and the error shrinks 14x per 4-bit term.
- ``"nested"`` (the default): the terms may have different widths ``X_i`` (``term_bits``); term i > 1 is
  a *mid-rise* quantizer that uses all ``2^(X_i)`` codes, ``value = (q - 2^(X_i-1) + 1/2)·scale_i`` with
  ``scale_i = scale_{i-1} / 2^(X_i)``.  If ``|R_{i-1}| <= scale_{i-1}/2`` then ``|R_i| <= scale_i/2``: the
  error falls by ``2^(X_i)`` per term (16 for 4-bit, 4 for 2-bit), and the first k terms together are
  exactly one uniform grid of ``2^(X_1+…+X_k)`` levels.  ``scale_1`` and ``bias`` are chosen so that the
  full T-term grid is the error-minimizing uniform grid of ``N = ΣX_i`` bits (``fit.fit_grid``: clip
  search + least squares; min-max when ``fit="minmax"`` or N > ``FIT_MAX_BITS``).  Values clipped by that
  grid are carried by the later terms up to half a first-term step (beyond that they saturate, as in
  any clipped quantizer; ``M_sa`` keeps them exactly when ``outlier_fraction > 0``).  Truncating to k
  terms gives the nested coarser grid, a proper ``X_1+…+X_k``-bit quantizer on a slightly shrunk range.

This module is pure torch math: no ``nn``, no transformers.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .bias import int8_bias, zero_point_first_term
from .first_term import FIRST_TERM_FITS, FIT_MAX_BITS, legacy_first_term, nested_first_term  # noqa: F401
from .fit import Grid, fit_grid, minmax_grid, relative_error, rtn, snr_db  # noqa: F401  (re-exported)
from .gptq import second_order_levels
from .saturation import LAPLACE_CLIP, SEARCH_GRID, clip_range, outlier_budget, saturate, sparse_matrix  # noqa: F401
from .settings import (  # noqa: F401  (re-exported)
    CLIP_METHODS,
    DEFAULTS,
    FIT_METHODS,
    SERIES_RULES,
    SUPPORTED_BITS,
    ZERO_BITS,
    ExpansionSettings,
)
from .transform import fit_input_transform, fold_weight, transform_hessian


@dataclass
class Expansion:
    """The terms of Eq. 1 for one 2-D weight ``[out_features, in_features]`` (unpacked codes)."""

    codes: torch.Tensor  # uint8 [T, out, in]: Q_i + 2^(X-1); unused terms hold 2^(X-1) (value 0)
    scale: torch.Tensor  # float16 [out, G]: scale_1 of each group
    zero: torch.Tensor | None  # float16 [out, G]: bias of each group; None when symmetric
    outlier_idx: torch.Tensor  # int32 [out, K]: column of each kept saturated value
    outlier_val: torch.Tensor  # float16 [out, K]: M_sa at that column (0 where the slot is unused)
    terms_used: int  # terms actually computed (<= T; fewer when the residual fell below tol)
    term_bits: tuple[int, ...]  # X_i of each stored term
    group_size: int
    series: str  # one of SERIES_RULES
    errors: tuple[float, ...] = ()  # ||M - approx_k||_F / ||M||_F after k = 1..terms_used terms (not stored)
    col_scale: torch.Tensor | None = None  # float16 [in]: dual_scale's t; the series holds M/t (transform.py)
    rot_signs: torch.Tensor | None = None  # int8 [in]: ±1 signs of the block Hadamard rotation (rotation.py)
    zero_bits: int = 16  # how ``zero`` is stored: float16, 8 or X_1 (int8 code or zero point, bias.py)

    @property
    def terms(self) -> int:
        return self.codes.shape[0]

    @property
    def bits(self) -> int:
        """X of the first term (all terms share it unless ``term_bits`` is mixed)."""
        return self.term_bits[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[1]), int(self.codes.shape[2]))


def residual_ratio(bits: int, series: str) -> int:
    """``scale_{i-1} / scale_i`` for a term of ``bits`` bits: ``2^X - 2`` (legacy) or ``2^X`` (nested)."""
    return 2**bits if series == "nested" else 2**bits - 2


def normalize_bits(bits: int | tuple[int, ...] | list[int], terms: int) -> tuple[int, ...]:
    """``term_bits`` of a series: an int means every term has that width; a sequence gives one width a term."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        return (bits,) * terms
    if isinstance(bits, bool):
        raise ValueError(f"bits={bits!r} is not a width")
    out = tuple(bits)
    if len(out) != terms:
        raise ValueError(f"bits={list(out)} gives {len(out)} widths for terms={terms}")
    return out


def term_scales(scale: torch.Tensor, term_bits: tuple[int, ...], terms: int, series: str) -> torch.Tensor:
    """float32 ``[terms, out, G]``: ``scale_i = scale_{i-1} / residual_ratio(X_i)`` (Eq. 1)."""
    ratios = [1.0] + [float(residual_ratio(b, series)) for b in term_bits[1:terms]]
    div = torch.tensor(ratios, dtype=torch.float64).cumprod(0).to(torch.float32)
    return scale.float().unsqueeze(0) / div.to(scale.device).view(-1, 1, 1)


def term_offsets(term_bits: tuple[int, ...], terms: int, series: str) -> tuple[float, ...]:
    """``o_i`` of ``value_i = (q_i - 2^(X_i-1) + o_i)·scale_i``: 1/2 for the mid-rise terms of a nested series."""
    return tuple(0.5 if series == "nested" and i else 0.0 for i in range(terms))


def code_range(bits: int, i: int, series: str) -> tuple[int, int]:
    """Centred code range ``[cmin, cmax]`` of term ``i`` (0-based) of width ``bits``."""
    half = 2 ** (bits - 1)
    return (-half, half - 1) if i == 0 or series == "nested" else (-(half - 1), half - 1)


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


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, group_size)


def dequantize_term(
    codes: torch.Tensor, step: torch.Tensor, bits: int, group_size: int, offset: float = 0.0
) -> torch.Tensor:
    """float32 ``step · (Q - 2^(X-1) + offset)`` for codes ``[out, in]`` and per-group ``step`` ``[out, G]``."""
    q = _groups(codes, group_size).float().sub_(2 ** (bits - 1) - offset)
    return q.mul_(step.unsqueeze(-1)).reshape(codes.shape)


@dataclass(frozen=True)
class ExpandOptions:
    """What one ``expand`` call adds to the settings: the layer's input statistics (used, never stored).

    ``importance`` (``[in]``, >= 0) weighs the fit's error by input column (a data-free estimate of ``E[x_j²]``;
    ``None``: all equal).  ``hessian`` (``[in, in]``, the layer's input covariance ``E[x xᵀ]``; nested series
    only): the codes of the fitted grid are chosen with GPTQ's error feedback where that lowers the output error
    (``gptq.py``; ``hessian_span``: compensate within spans of that many columns only)."""

    importance: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    hessian_span: int | None = None


NO_OPTIONS = ExpandOptions()


def expand(
    w: torch.Tensor,
    settings: ExpansionSettings = DEFAULTS,
    options: ExpandOptions = NO_OPTIONS,
    **fields: Any,
) -> Expansion:
    """Expand a 2-D weight into Eq. 1 with ``settings`` (``fields``: settings to change, e.g. ``bits=3``; the
    act_* settings play no part here) and ``options`` (the layer's input statistics, ``ExpandOptions``).

    ``group_size`` must divide ``in_features`` (see ``resolve_group_size``); ``tol > 0`` stops once
    ``max |R_i| < tol``.  ``bits`` is one width for all terms or one width per term (``series="nested"`` only);
    ``fit`` chooses the first term of a nested series (``"optimized"``: ``fit.fit_grid``; ``"minmax"``: RTN's
    range).  ``rotation``/``dual_scale`` first transform ``w`` (``transform.fit_input_transform``): the series
    then holds the transformed matrix, ``reconstruct`` returns it and ``original_weight`` the weight in the input
    basis.  ``zero_bits=8`` stores the bias as an int8 code (``bias.int8_bias``; nested series only);
    ``zero_bits=X_1`` (the first term's width, below 8) an integer zero point in first-term steps
    (``bias.int_zero_grid``).

    With ``outlier_fraction == 0`` nothing is saturated (``M_sa = 0``).  In the legacy rule every value
    must then be representable, so the clip range is the group's min-max range whatever ``clip`` says.
    """
    s = dataclasses.replace(settings, **fields) if fields else settings  # validated by ExpansionSettings
    if w.dim() != 2:
        raise ValueError(f"expand() takes a 2-D weight, got shape {tuple(w.shape)}")
    term_bits, series, symmetric = s.term_bits, s.series, s.symmetric
    importance, hessian = options.importance, options.hessian
    out_features, in_features = w.shape
    gs = in_features if s.group_size is None else s.group_size
    if in_features % gs:
        raise ValueError(f"group_size={gs} does not divide in_features={in_features}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    w = w.detach().float()
    col_scale = rot_signs = None
    if hessian is not None and series != "nested":
        raise ValueError("a hessian (second-order fit) needs series='nested'")
    if hessian is not None and tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}], got {tuple(hessian.shape)}")
    if s.dual_scale or s.rotation is not None:
        w, importance, col_scale, rot_signs = fit_input_transform(w, s.dual_scale, s.rotation, gs, importance)
        if hessian is not None:
            hessian = transform_hessian(hessian.to(w.device), col_scale, rot_signs)

    budget = outlier_budget(in_features, s.outlier_fraction)
    if budget:
        lo, hi = clip_range(_groups(w, gs), term_bits[0], symmetric, s.clip)
        idx, val = saturate(w, lo, hi, gs, budget)
        wc = w - sparse_matrix(idx, val, (out_features, in_features))  # M - M_sa
    else:
        idx = torch.zeros(out_features, 0, dtype=torch.int32, device=w.device)
        val = torch.zeros(out_features, 0, dtype=torch.float16, device=w.device)
        wc = w

    if series == "nested":
        a = None if importance is None else _column_weight(importance, in_features, gs, w.device)
        scale16, zero16 = nested_first_term(_groups(wc, gs), term_bits, symmetric, s.fit, a)
        if zero16 is not None and s.zero_bits == 8:
            scale16, zero16 = int8_bias(scale16, zero16, term_bits[0])
        elif zero16 is not None and s.zero_bits != 16:  # an integer zero point (bias.py, Eq. Zi)
            scale16, zero16 = zero_point_first_term(_groups(wc, gs), scale16, zero16, term_bits, s.fit, a)
    else:
        a = None
        scale16, zero16 = legacy_first_term(_groups(wc, gs), term_bits[0], symmetric)
    target = None
    if hessian is not None:
        target = second_order_levels(
            wc, hessian.to(w.device), scale16, zero16, term_bits, gs, span=options.hessian_span
        )
    codes, used, errors = _series_codes(w, wc, scale16, zero16, term_bits, gs, series, s.tol, a, target)
    return Expansion(
        codes,
        scale16,
        zero16,
        idx,
        val,
        used,
        term_bits,
        gs,
        series,
        errors,
        col_scale=col_scale,
        rot_signs=rot_signs,
        zero_bits=s.zero_bits if zero16 is not None else 16,
    )


def _column_weight(importance: torch.Tensor, in_features: int, gs: int, device: torch.device) -> torch.Tensor:
    """``[G, gs]`` fit weights from a per-column ``importance``, normalized to mean 1 per group."""
    a = importance.detach().float().to(device).reshape(-1)
    if a.numel() != in_features or not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"importance must hold {in_features} finite values >= 0, got shape {tuple(a.shape)}")
    a = a.reshape(-1, gs)
    return (a / a.mean(-1, keepdim=True).clamp(min=1e-30)).clamp(min=1e-6)


def _series_codes(
    w: torch.Tensor,
    wc: torch.Tensor,
    scale16: torch.Tensor,
    zero16: torch.Tensor | None,
    term_bits: tuple[int, ...],
    gs: int,
    series: str,
    tol: float,
    a: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, tuple[float, ...]]:
    """Greedy codes of every term from the *stored* scale/bias: term i rounds the residual ``R_{i-1}`` to
    its grid.  Returns the uint8 codes ``[T, out, in]``, the terms computed and the relative error of ``wc``
    after each (weighted by the column weights ``a`` ``[G, gs]`` when given).  ``target``: levels of the full
    series' grid to encode instead of ``wc`` (``gptq.second_order_levels``; decomposed exactly)."""
    terms, (out_features, in_features) = len(term_bits), w.shape
    codes = torch.empty((terms, out_features, in_features), dtype=torch.uint8, device=w.device)
    for i, b in enumerate(term_bits):
        codes[i] = 2 ** (b - 1)  # value 0 (legacy) / unused
    residual = _groups(wc if target is None else target, gs).clone()
    gap = None if target is None else _groups(wc - target, gs)  # what the encoded levels leave of wc
    if zero16 is not None:
        residual -= zero16.float().unsqueeze(-1)
    steps = term_scales(scale16, term_bits, terms, series).unsqueeze(-1)
    offsets = term_offsets(term_bits, terms, series)
    wa = None if a is None else a.sqrt()
    norm = (w if wa is None else _groups(w, gs) * wa).norm().clamp(min=1e-30)
    errors, used = [], 0
    for i, b in enumerate(term_bits):
        if i and tol > 0 and residual.abs().max() < tol:
            break
        cmin, cmax = code_range(b, i, series)
        c = residual.div(steps[i]).sub_(offsets[i]).round_().clamp_(cmin, cmax)
        residual.sub_((c + offsets[i]) * steps[i])
        codes[i] = c.add_(2 ** (b - 1)).reshape(out_features, in_features)
        used += 1
        left = residual if gap is None else residual + gap
        errors.append(((left if wa is None else left * wa).norm() / norm).item())
    return codes, used, tuple(errors)


def reconstruct(e: Expansion, terms: int | None = None) -> torch.Tensor:
    """Invert Eq. 1 with the first ``terms`` terms (default: all computed): float32 ``[out, in]``."""
    k = e.terms_used if terms is None else min(terms, e.terms_used)
    steps = term_scales(e.scale, e.term_bits, k, e.series)
    offsets = term_offsets(e.term_bits, k, e.series)
    approx = dequantize_term(e.codes[0], steps[0], e.term_bits[0], e.group_size)
    if e.zero is not None:
        approx = _groups(approx, e.group_size).add_(e.zero.float().unsqueeze(-1)).reshape(approx.shape)
    for i in range(1, k):
        approx += dequantize_term(e.codes[i], steps[i], e.term_bits[i], e.group_size, offsets[i])
    return approx + sparse_matrix(e.outlier_idx, e.outlier_val, e.shape)


def original_weight(e: Expansion, terms: int | None = None) -> torch.Tensor:
    """``reconstruct`` folded back through the input transforms (``e.col_scale``, ``e.rot_signs``): float32
    ``[out, in]`` in the layer's original input basis (the same as ``reconstruct`` without transforms)."""
    return fold_weight(reconstruct(e, terms), e.col_scale, e.rot_signs)
