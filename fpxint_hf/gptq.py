"""Second-order error feedback for the series' codes: GPTQ (Frantar et al., 2023) on the series' fixed grid.

A nested series of widths ``X_1..X_T`` is one uniform grid of ``N = ΣX_i`` bits per group (``expansion.py``):

    levels  base + δ·k,   k ∈ [0, 2^N - 1],   δ = scale_1 / 2^(N - X_1)                      (Eq. G)

Rounding every weight to its nearest level (what ``expansion._series_codes`` does term by term) minimizes the
weight error.  The error a layer's *output* makes on inputs ``x`` is ``Σ_r (w_r - ŵ_r) H (w_r - ŵ_r)ᵀ`` with
``H = E[x xᵀ]`` (Eq. H): correlated input channels let the rounding error of one column be compensated by the
columns not yet rounded.  GPTQ does that column by column: round column ``j``, then move the columns after it
by ``-err_j · H⁻¹[j, j+1:] / H⁻¹[j, j]`` (the optimal brain surgeon update, with the Cholesky factor of the
damped ``H⁻¹`` and lazy batches of ``BLOCK`` columns, as in IST-DASLab's ``gptq.py``).  Here the grid of every
group is fixed beforehand (GPTQ's "static groups") by the series' own first-term fit, so the codes stay codes of
the series: ``expansion.expand`` decomposes the chosen levels into the terms exactly.

``H`` comes from the FP model fed random token ids (``hf/probe.py``; no data).  GPTQ does not promise a lower
Eq. H than plain rounding, so ``second_order_levels`` keeps, row by row, whichever of the two has the lower
Eq. H: the weighted error never rises over the plain fit.  Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import torch

BLOCK = 128  # columns per lazy batch
DAMP = 0.01  # added to H's diagonal, as a fraction of its mean (GPTQ's percdamp)
FULL_SPAN = 4096  # layers with at most this many inputs compensate over all of them
SPAN = 1024  # wider layers compensate within spans of this many columns (``in·SPAN²`` work, not ``in³``)


def compensation_span(in_features: int) -> int | None:
    """The ``span`` of ``gptq_levels`` for a layer with ``in_features`` inputs (``None``: all columns)."""
    return None if in_features <= FULL_SPAN else SPAN


def series_grid(
    scale: torch.Tensor, zero: torch.Tensor | None, term_bits: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(base, δ, top)`` of Eq. G per group (float32 ``[out, G]``) for a nested series' stored ``scale_1`` and
    bias (``None``: symmetric, bias 0); ``top = 2^N - 1``."""
    n, x1 = sum(term_bits), term_bits[0]
    s1 = scale.float()
    step = s1 / 2.0 ** (n - x1)
    z = torch.zeros_like(s1) if zero is None else zero.float()
    base = z - 2 ** (x1 - 1) * s1 - (s1 - step) / 2
    return base, step, 2**n - 1


def round_to_grid(w: torch.Tensor, base: torch.Tensor, step: torch.Tensor, top: int) -> torch.Tensor:
    """Nearest level of Eq. G for columns ``w`` ``[out, m]`` with per-column ``base``/``step`` ``[out, m]``."""
    k = (w - base).div_(step).round_().clamp_(0, top)
    return k.mul_(step).add_(base)


def inverse_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``λ = damp·mean diag H``), the form GPTQ's update reads.

    With ``J`` the reversal of the columns and ``J H J = L Lᵀ``, ``U = J L⁻¹ J`` is upper triangular and
    ``UᵀU = H⁻¹``: one Cholesky and one triangular inverse, a third of the work of inverting ``H`` first."""
    h = h.float().flip(0, 1).clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * h.diagonal().mean().clamp(min=1e-12)
    low = torch.linalg.cholesky(h)
    eye = torch.eye(h.shape[0], device=h.device)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)


def gptq_levels(
    w: torch.Tensor,
    h: torch.Tensor,
    base: torch.Tensor,
    step: torch.Tensor,
    top: int,
    group_size: int,
    damp: float = DAMP,
    act_order: bool = True,
    span: int | None = None,
) -> torch.Tensor:
    """GPTQ's levels (float32 ``[out, in]``) of ``w`` on the fixed per-group grids of Eq. G, for input
    covariance ``h`` ``[in, in]``; ``act_order``: columns in order of falling ``H_jj`` (static groups keep each
    column's own grid).  ``span``: compensate only within consecutive spans of that many columns (of the
    ordered columns), with ``H`` restricted to each span: ``in·span²`` work instead of ``in³``."""
    w = w.float().clone()
    n = w.shape[1]
    base_c = base.float().repeat_interleave(group_size, dim=1)
    step_c = step.float().repeat_interleave(group_size, dim=1)
    h = h.float().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n)
    w, base_c, step_c, h = w[:, perm], base_c[:, perm], step_c[:, perm], h[perm][:, perm]
    q = torch.empty_like(w)
    width = n if span is None else span
    for s1 in range(0, n, width):
        s2 = min(s1 + width, n)
        part = slice(s1, s2)
        q[:, part] = _gptq_span(
            w[:, part], inverse_cholesky(h[part, part], damp), base_c[:, part], step_c[:, part], top
        )
    return q[:, torch.argsort(perm)]


def _gptq_span(
    w: torch.Tensor, u: torch.Tensor, base: torch.Tensor, step: torch.Tensor, top: int
) -> torch.Tensor:
    """GPTQ's column loop with lazy batches of ``BLOCK`` columns over ``w`` ``[out, m]`` given the upper Cholesky
    factor ``u`` of its damped ``H⁻¹``.  Works on the transposes (a column is a contiguous row)."""
    wt, bt, st = w.T.contiguous(), base.T.contiguous(), step.T.contiguous()
    qt = torch.empty_like(wt)
    n = wt.shape[0]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        w1, u1 = wt[i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = w1[i]
            qc = (
                col.sub(bt[i1 + i]).div_(st[i1 + i]).round_().clamp_(0, top).mul_(st[i1 + i]).add_(bt[i1 + i])
            )
            qt[i1 + i] = qc
            e = col.sub(qc).div_(u1[i, i])
            w1[i:].sub_(u1[i, i:].unsqueeze(1) * e.unsqueeze(0))
            err1[i] = e
        wt[i2:].sub_(u[i1:i2, i2:].T @ err1)
    return qt.T


def output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Eq. H per output row (float32 ``[out]``): ``(w_r - ŵ_r) H (w_r - ŵ_r)ᵀ``."""
    d = approx.float() - w.float()
    return ((d @ h.float()) * d).sum(1)


def second_order_levels(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    term_bits: tuple[int, ...],
    group_size: int,
    damp: float = DAMP,
    span: int | None = None,
) -> torch.Tensor:
    """The levels of Eq. G (float32 ``[out, in]``) the series stores for ``w``: per row, GPTQ's or plain rounding's,
    whichever has the lower output error Eq. H under ``h`` (so never worse than the plain fit)."""
    base, step, top = series_grid(scale, zero, term_bits)
    plain = round_to_grid(
        w.float(), base.repeat_interleave(group_size, 1), step.repeat_interleave(group_size, 1), top
    )
    gptq = gptq_levels(w, h, base, step, top, group_size, damp, span=span)
    better = output_error(w, gptq, h) < output_error(w, plain, h)
    return torch.where(better.unsqueeze(1), gptq, plain)
