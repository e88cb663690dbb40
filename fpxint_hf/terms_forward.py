"""The ``terms`` forward of ``FPxINTLinear`` (the paper's "AbelianAdd"), as a function of an ``Expansion``.

All ``k`` integer-valued term matrices in one batched matmul (per group), then the weighted reduce
``Σ_{i,g} scale_{i,g} · (Q_{i,g} x_g)`` plus the bias and ``M_sa`` terms.  Integer codes are exact in bf16/fp16
and the scales are applied in float32 after the matmul.  Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import torch

from . import kernels
from .expansion import Expansion, term_offsets, term_scales


def terms_linear(x: torch.Tensor, e: Expansion, k: int) -> torch.Tensor:
    """``x @ reconstruct(e, k).T`` as ``k`` low-bit matmuls and one reduce, for any leading shape of ``x``."""
    out_features, in_features = e.shape
    gs = e.group_size
    groups = in_features // gs
    xg = x.reshape(-1, groups, gs)  # [N, G, gs]
    shift = torch.tensor(
        [
            2 ** (b - 1) - o
            for b, o in zip(e.term_bits[:k], term_offsets(e.term_bits, k, e.series), strict=True)
        ],
        dtype=x.dtype,
        device=x.device,
    )  # integers or half-integers: exact in bf16/fp16
    q = (e.codes[:k].to(x.dtype) - shift.view(-1, 1, 1)).view(k, out_features, groups, gs)
    partial = torch.einsum("ngc,togc->tnog", xg, q).float()  # [k, N, out, G]: the k low-bit matmuls
    steps = term_scales(e.scale, e.term_bits, k, e.series)  # [k, out, G]
    y = torch.einsum("tnog,tog->no", partial, steps)  # the Abelian add over terms and groups
    if e.zero is not None:
        y = y + kernels.zero_term(x.reshape(-1, in_features), e.zero, gs)
    if e.outlier_idx.numel():
        m_sa = kernels.outlier_matrix(e.outlier_idx, e.outlier_val, in_features)
        y = y + kernels.sparse_term(x.reshape(-1, in_features), m_sa)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
