"""``M_sa`` of Eq. 1: the saturation range of each group and the few clipped values kept exactly.

Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import math

import torch

# ACIQ (Banner et al., 2019): clip value alpha / b minimizing the MSE of X-bit quantization of a
# Laplace(mu, b) variable.  The paper chooses the saturation range from a Laplace fit of the weights.
LAPLACE_CLIP = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
SEARCH_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # shrink factors of the min-max range
_FP16_MAX = torch.finfo(torch.float16).max


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, group_size)


def outlier_budget(in_features: int, outlier_fraction: float) -> int:
    """Fixed number K of saturated values kept per output row (0 disables ``M_sa``)."""
    return math.ceil(outlier_fraction * in_features) if outlier_fraction > 0 else 0


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


def outlier_index_dtype(in_features: int) -> torch.dtype:
    """Smallest signed integer dtype that holds a column index of ``in_features``."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32
