"""FP=xINT activation series: a token's activation vector as a series of low-bit integer vectors.

The paper (arXiv:2412.06865, Sec. 3, the activation half of Eq. 1) expands activations like weights:

    A = A_sa + bias_A·1 + Σ_{j=1..T_a} scale_{A,j} · Ã_j                          (Eq. 1, activations)

computed here per token (one row of ``x``), at run time, without calibration data:

- ``A_sa`` keeps the ``outliers`` largest-magnitude values of the token exactly (sparse; 0 = none);
- ``Ã_1`` is the asymmetric X-bit quantization of the rest on its min-max range: ``scale_{A,1} = (max - min) /
  (2^X - 1)``, ``bias_A = min + 2^(X-1)·scale_{A,1}``, codes ``-2^(X-1) .. 2^(X-1) - 1`` (nothing is clipped);
- ``Ã_j`` (j > 1) is the symmetric X-bit quantization of the residual ``R_{j-1}`` with its own dynamic scale
  ``scale_{A,j} = max|R_{j-1}| / (2^(X-1) - 1)``, codes ``±(2^(X-1) - 1)``: since ``max|R_{j-1}| <=
  scale_{A,j-1}/2``, each scale is about ``2^X - 2`` times smaller than the last (14 for 4 bits, 254 for 8).
  Rounding to the nearest level never increases any residual entry, so the error never rises with ``j``.

Stop rule (the paper stops adding activation terms once the residual's max is below 1e-4): with ``tol > 0`` a
token whose ``max|R_{j-1}| < tol`` gets no term j (codes and scale 0); the series ends once every token has
stopped.  A product ``W·A`` with a weight series of ``T_w`` terms is then ``T_w × T_a`` integer × integer
matmuls (``act_kernels.py``).  Pure torch math: no ``nn``, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import ACT_BITS


@dataclass
class ActivationSeries:
    """The terms of the activation series of ``N`` tokens of ``in_features`` values (``x`` as ``[N, in]``)."""

    codes: torch.Tensor  # int8 [J, N, in]: Ã_j, centred (term 1: -2^(X-1)..2^(X-1)-1; later: ±(2^(X-1)-1))
    scale: torch.Tensor  # float32 [J, N]: scale_{A,j} per token (0 where a token stopped under tol)
    bias: torch.Tensor  # float32 [N]: bias_A per token
    outlier_idx: torch.Tensor  # int64 [N, K]: columns of A_sa (K = outliers)
    outlier_val: torch.Tensor  # float32 [N, K]: A_sa at those columns
    bits: int

    @property
    def terms(self) -> int:
        return int(self.codes.shape[0])

    def max_code(self) -> int:
        """The largest ``|Ã_j|`` any term can hold: ``2^(X-1)`` (bounds the integer sums of ``act_kernels``)."""
        return 2 ** (self.bits - 1)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1, for dividing (a zero scale has zero codes)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def expand_activations(
    x: torch.Tensor, bits: int, terms: int, tol: float = 0.0, outliers: int = 0
) -> ActivationSeries:
    """Expand each row of ``x`` (``[N, in]``, any float dtype; computed in float32) into the activation series
    of Eq. 1 with at most ``terms`` terms of ``bits`` bits, ``outliers`` values per token kept in ``A_sa`` and
    the stop rule ``tol`` (see the module docstring)."""
    if bits not in ACT_BITS:
        raise ValueError(f"act_bits={bits!r} is not supported; allowed: one of {ACT_BITS}")
    if x.dim() != 2:
        raise ValueError(f"expand_activations() takes [tokens, features], got shape {tuple(x.shape)}")
    if terms < 1 or tol < 0 or not 0 <= outliers < max(x.shape[1], 1):
        raise ValueError(
            f"act_terms={terms} (>= 1), act_tol={tol} (>= 0), outliers={outliers} (< in) invalid"
        )
    r = x.detach().to(torch.float32, copy=True)
    n, width = r.shape
    idx = r.new_zeros(n, outliers, dtype=torch.int64)
    val = r.new_zeros(n, outliers)
    if outliers and n:
        idx = r.abs().topk(outliers, dim=-1).indices
        val = r.gather(1, idx)
        r.scatter_(1, idx, 0.0)
    half = 2 ** (bits - 1)
    # two reductions: torch.aminmax(dim=) is ~10x slower than amin + amax on the CPU (torch 2.13)
    lo, hi = (r.amin(-1), r.amax(-1)) if width and n else (r.new_zeros(n), r.new_zeros(n))
    s1 = (hi - lo) / (2**bits - 1)
    bias = lo + half * s1
    c = r.sub(bias[:, None]).div_(_safe(s1)[:, None]).round_().clamp_(-half, half - 1)
    if terms > 1:  # the residual feeds the later terms only
        r -= bias[:, None] + s1[:, None] * c
    codes, scales = [c.to(torch.int8)], [s1]
    for _ in range(1, terms):
        peak = r.abs().amax(-1) if width else r.new_zeros(n)
        live = peak >= tol if tol > 0 else peak > 0
        if not bool(live.any()):
            break
        s = torch.where(live, peak / (half - 1), torch.zeros_like(peak))
        c = torch.round(r / _safe(s)[:, None]).clamp_(-(half - 1), half - 1) * live[:, None]
        r -= s[:, None] * c
        codes.append(c.to(torch.int8))
        scales.append(s)
    if len(codes) == 1:  # one term: no copy
        return ActivationSeries(codes[0].unsqueeze(0), s1.unsqueeze(0), bias, idx, val, bits)
    return ActivationSeries(torch.stack(codes), torch.stack(scales), bias, idx, val, bits)


def dequantize_activations(s: ActivationSeries, terms: int | None = None) -> torch.Tensor:
    """float32 ``[N, in]``: ``A_sa + bias_A·1 + Σ_{j<=terms} scale_{A,j}·Ã_j`` (default: every term)."""
    k = s.terms if terms is None else min(terms, s.terms)
    a = series_part(s, k) + s.bias[:, None]
    return a.scatter_add_(1, s.outlier_idx, s.outlier_val) if s.outlier_idx.numel() else a


def series_part(s: ActivationSeries, terms: int | None = None) -> torch.Tensor:
    """float32 ``[N, in]``: the integer terms alone, ``Σ_{j<=terms} scale_{A,j}·Ã_j``."""
    k = s.terms if terms is None else min(terms, s.terms)
    return torch.einsum("jn,jnc->nc", s.scale[:k], s.codes[:k].float())
