"""Error-minimizing uniform grids: the calibration-free choice of ``scale`` and ``bias`` per group.

A uniform N-bit grid on one group of weights ``w`` (length ``gs``) is the set of levels

    z + s·c,   c ∈ [-2^(N-1), 2^(N-1) - 1]                                        (grid)

and quantizing ``w`` on it means ``c_j = clamp(round((w_j - z) / s))``.  Min-max round-to-nearest ("RTN",
"Normal" in the paper) takes ``s = (max - min) / (2^N - 1)`` and puts the first and last levels on the
group's extremes.  ``fit_grid`` instead minimizes the squared error

    E(s, z) = Σ_j a_j (w_j - z - s·c_j)²                                             (Eq. F)

in two calibration-free steps, vectorized over all groups of a matrix:

1. *clip search*: the min-max range shrunk about its midpoint by each factor of ``CLIP_GRID``; the factor
   with the lowest ``E`` wins per group (values outside the shrunk range saturate: the clipped excess);
2. *alternating least squares* (the idea behind HQQ's half-quadratic zero/scale refinement, here exact):
   for fixed ``(s, z)`` the codes above are the best; for fixed codes ``(s, z)`` is the least-squares
   line fit of ``w`` on ``c`` (a closed-form 2x2 solve per group).  A step is kept only where it lowers
   ``E``, so ``E`` never rises, and since factor 1.0 (min-max) is a candidate the fit is never worse
   than RTN on the same grid.

``a_j >= 0`` weighs input column j (default 1): a data-free estimate of ``E[x_j²]``, the second moment of
the activation that multiplies column j, turns Eq. F into the expected output error of the group
(``expansion.expand``'s ``importance``).  ``symmetric=True`` fixes ``z = 0`` and fits ``s`` alone.
Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # shrink factors of the min-max range tried first
LS_ITERS = 4  # alternating least-squares rounds after the clip search
_TINY = 1e-12


@dataclass(frozen=True)
class Grid:
    """A uniform grid per group: levels ``zero + scale·c`` with ``c`` in ``[qmin, qmax]`` (float32 ``[out, G]``)."""

    scale: torch.Tensor
    zero: torch.Tensor
    qmin: int
    qmax: int


def grid_codes(wg: torch.Tensor, g: Grid) -> torch.Tensor:
    """Nearest-level codes ``c`` (float32, ``[out, G, gs]``) of the groups ``wg`` on grid ``g``."""
    return wg.sub(g.zero.unsqueeze(-1)).div_(g.scale.unsqueeze(-1)).round_().clamp_(g.qmin, g.qmax)


def grid_error(wg: torch.Tensor, g: Grid, a: torch.Tensor | None = None) -> torch.Tensor:
    """``E`` of Eq. F per group (float32 ``[out, G]``); ``a`` broadcasts against ``wg`` (e.g. ``[1, G, gs]``)."""
    approx = grid_codes(wg, g).mul_(g.scale.unsqueeze(-1)).add_(g.zero.unsqueeze(-1))
    err = approx.sub_(wg).pow_(2)
    return (err if a is None else err.mul_(a)).sum(-1)


def minmax_grid(wg: torch.Tensor, bits: int, symmetric: bool = False, shrink: float = 1.0) -> Grid:
    """RTN's grid on ``[min, max]`` (symmetric: ``[-max|w|, max|w|]`` with codes ``±(2^(N-1) - 1)``),
    the range shrunk about its midpoint by ``shrink``."""
    half = 2 ** (bits - 1)
    if symmetric:
        m = wg.abs().amax(-1) * shrink
        return Grid((m / (half - 1)).clamp(min=_TINY), torch.zeros_like(m), -(half - 1), half - 1)
    lo, hi = wg.amin(-1), wg.amax(-1)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2 * shrink
    scale = (2 * rad / (2**bits - 1)).clamp(min=_TINY)
    return Grid(scale, mid - rad + half * scale, -half, half - 1)


def _least_squares(wg: torch.Tensor, c: torch.Tensor, g: Grid, symmetric: bool, a: torch.Tensor) -> Grid:
    """The ``(s, z)`` minimizing Eq. F for fixed codes ``c``; groups with a degenerate fit keep ``g``."""
    ac = a * c
    if symmetric:
        scc, scw = (ac * c).sum(-1), (ac * wg).sum(-1)
        s = scw / scc.clamp(min=_TINY)
        ok = (scc > 0) & (s > 0)
        return Grid(torch.where(ok, s, g.scale), g.zero, g.qmin, g.qmax)
    n = a.expand_as(wg).sum(-1)
    sc, scc, sw, scw = ac.sum(-1), (ac * c).sum(-1), (a * wg).sum(-1), (ac * wg).sum(-1)
    det = scc * n - sc * sc
    ok = det > 1e-6 * (scc * n).clamp(min=_TINY)  # at least two distinct codes in the group
    safe = torch.where(ok, det, torch.ones_like(det))
    s, z = (scw * n - sc * sw) / safe, (scc * sw - sc * scw) / safe
    ok &= s > 0
    return Grid(torch.where(ok, s, g.scale), torch.where(ok, z, g.zero), g.qmin, g.qmax)


def _keep_better(
    wg: torch.Tensor, best: Grid, err: torch.Tensor, cand: Grid, a: torch.Tensor | None
) -> tuple[Grid, torch.Tensor]:
    cand_err = grid_error(wg, cand, a)
    better = cand_err < err
    pick = Grid(
        torch.where(better, cand.scale, best.scale),
        torch.where(better, cand.zero, best.zero),
        best.qmin,
        best.qmax,
    )
    return pick, torch.where(better, cand_err, err)


def fit_grid(
    wg: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    clip_grid: tuple[float, ...] = CLIP_GRID,
    iters: int = LS_ITERS,
    weight: torch.Tensor | None = None,
) -> Grid:
    """The error-minimizing ``bits``-bit grid of each group of ``wg`` ``[out, G, gs]`` (see the module
    docstring): clip search over ``clip_grid``, then ``iters`` rounds of alternating least squares.
    ``weight``: the column weights ``a`` of Eq. F, shape ``[G, gs]`` (or anything broadcasting to ``wg``)."""
    wg = wg.float()
    a = None if weight is None else weight.float().expand_as(wg)
    best = minmax_grid(wg, bits, symmetric, clip_grid[0])
    err = grid_error(wg, best, a)
    for shrink in clip_grid[1:]:
        best, err = _keep_better(wg, best, err, minmax_grid(wg, bits, symmetric, shrink), a)
    ones = torch.ones_like(wg) if a is None else a
    for _ in range(iters):
        cand = _least_squares(wg, grid_codes(wg, best), best, symmetric, ones)
        best, err = _keep_better(wg, best, err, cand, a)
    return best


def rtn(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Plain asymmetric min-max round-to-nearest ("Normal" in the paper), dequantized, float32."""
    w = w.detach().float()
    gs = w.shape[1] if group_size is None else group_size
    wg = w.reshape(w.shape[0], -1, gs)
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
