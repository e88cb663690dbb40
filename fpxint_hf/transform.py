"""The data-free input transforms applied before the series: ``rotation`` then ``dual_scale``.

With both, the layer computes ``y = W x = V·(t ⊙ Rᵀx)``: the series approximates ``V = (W R) / t`` (columns
divided by ``t``), ``R`` is the block Hadamard rotation of ``rotation.py`` and ``t`` the Sinkhorn column scales of
``dual_scale.py`` (computed on ``W R``).  At run time the layer's input goes through ``transform_input`` once,
then every forward path multiplies it by the stored series as usual; ``fold_weight`` turns a series weight back
into the original basis (``FPxINTLinear.dequantize``, vLLM's dense path).

The activation proxy (``importance``, an estimate of ``E[x_j²]``) follows the rotation, which averages it over
each block (``rotation.block_mean``); the fit then weighs the error of ``V`` by it, *not* by ``t²·E[x²]`` (the
error of ``W`` itself, what the output error would call for): measured on SmolLM2 at group 64 with T=1
(``eval/bench_options.py``, 2,048 tokens; the ``t²`` rule is this file before commit ae1797b), the ``t²``
weighting gave KL 1.32 at 3 bits and 0.145 at 4 bits, the proxy alone 0.82 and 0.109 (a plain min-max grid on
``V``: 1.02 and 0.19).  Sinkhorn's ``t`` has already evened
out the columns; multiplying the fit weights by ``t²`` again undoes that balance and lets the fit clip the
columns it shrank.
Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import torch

from .dual_scale import sinkhorn_column_scales
from .rotation import block_mean, hadamard_block, random_signs, rotate_input, rotate_weight, unrotate_weight


def fit_input_transform(
    w: torch.Tensor, dual_scale: bool, rotation: str | None, group_size: int, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(V, importance of V's columns, t as float16 [in] or None, rotation signs int8 [in] or None)`` for a
    float32 ``[out, in]`` weight ``w``."""
    signs = col_scale = None
    if rotation == "hadamard":
        signs = random_signs(w.shape[1], device=w.device)
        w = rotate_weight(w, signs)
        if importance is not None:
            importance = block_mean(importance.to(w.device), hadamard_block(w.shape[1]))
    elif rotation is not None:
        raise ValueError(f"rotation={rotation!r} is not supported; allowed: None or 'hadamard'")
    if dual_scale:
        t = sinkhorn_column_scales(w, group_size)
        col_scale = t.clamp(2.0**-14, 2.0**15).to(torch.float16)  # stored; V uses the stored values
        t = col_scale.float()
        w = w / t  # the fit weighs V's error by the proxy alone (see the module docstring)
    return w, importance, col_scale, signs


def transform_input(
    x: torch.Tensor, col_scale: torch.Tensor | None, rot_signs: torch.Tensor | None
) -> torch.Tensor:
    """``t ⊙ Rᵀx`` along the last dim of ``x`` (computed in float32, returned in ``x.dtype``); ``x`` itself when
    neither transform is set.  ``col_scale``/``rot_signs``: ``[in]`` or ``[1, in]``."""
    if col_scale is None and rot_signs is None:
        return x
    y = x.float()
    if rot_signs is not None:
        y = rotate_input(y, rot_signs.reshape(-1))
    if col_scale is not None:
        y = y * col_scale.reshape(-1).float()
    return y.to(x.dtype)


def transform_hessian(
    h: torch.Tensor, col_scale: torch.Tensor | None, rot_signs: torch.Tensor | None
) -> torch.Tensor:
    """``E[x' x'ᵀ]`` of the transformed input ``x' = t ⊙ Rᵀx`` from ``h = E[x xᵀ]`` ``[in, in]`` (float32)."""
    out = h.float()
    if rot_signs is not None:
        signs = rot_signs.reshape(-1)
        out = rotate_input(rotate_input(out, signs).T.contiguous(), signs)
    if col_scale is not None:
        t = col_scale.reshape(-1).float()
        out = out * t.unsqueeze(0) * t.unsqueeze(1)
    return out


def fold_weight(
    v: torch.Tensor, col_scale: torch.Tensor | None, rot_signs: torch.Tensor | None
) -> torch.Tensor:
    """The float32 weight ``W`` in the original input basis from a series weight ``V`` ``[out, in]``."""
    w = v.float()
    if col_scale is not None:
        w = w * col_scale.reshape(-1).float()
    if rot_signs is not None:
        w = unrotate_weight(w, rot_signs.reshape(-1))
    return w
