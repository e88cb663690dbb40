"""The tensors of one FP=xINT layer, declared once: their names, shapes, dtypes and which dimension holds the
output rows (``layer_tensors``), and the one check of their loaded values (``check_tensors``).

``FPxINTLinear`` registers its buffers from ``layer_tensors`` (and casts an ``Expansion`` to it on save), the vLLM
plugin creates its parameters from it (the ``kind`` picks vLLM's parameter class: how it shards and fuses), and
both load paths (transformers' ``hf.checks.check_loaded``, vLLM's ``process_weights_after_loading``) validate
the values with ``check_tensors``.  A new tensor is one more entry here.  Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .packing import series_shape, unpack_series
from .saturation import outlier_index_dtype
from .settings import ExpansionSettings

KINDS = ("codes", "group", "row", "piece")  # codes; one per (row, group); one per row; one per fused piece


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: ``shape``, ``dtype``, ``kind`` (see ``KINDS``), the dims of output rows and inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    output_dim: int | None
    input_dim: int | None = None


def layer_tensors(
    settings: ExpansionSettings,
    out_features: int,
    in_features: int,
    group_size: int,
    outlier_budget: int,
    pieces: int = 1,
) -> dict[str, TensorSpec]:
    """The tensors of a layer stored with ``settings`` (its ``group_size`` and ``outlier_budget`` resolved for the
    layer: ``series.SeriesSpec``; ``pieces`` fused layers in vLLM: one ``terms_used`` entry each, and one row of
    each input transform: a saved layer stores ``[1, in]``), in order."""
    term_bits, symmetric = settings.term_bits, settings.symmetric
    zero_bits = 16 if symmetric else settings.zero_bits
    groups = in_features // group_size
    shape = series_shape(term_bits, out_features, in_features)
    uniform = len(shape) == 3
    specs = {
        # [T, out, ceil(in·X/8)] packed codes Q_i + 2^(X-1), term-major; mixed widths: [out, Σ_i ceil(in·X_i/8)]
        "codes": TensorSpec(shape, torch.uint8, "codes", 1 if uniform else 0, 2 if uniform else 1),
        # [out, G] scale_1 per group; scale_i = scale_{i-1} / 2^(X_i) (nested) or / (2^X - 2) (legacy)
        "scale": TensorSpec((out_features, groups), torch.float16, "group", 0, 1),
    }
    if not symmetric:
        # [out, G] bias (zero point) per group: float16, or with zero_bits=8 its int8 code (bias.py, Eq. Z)
        zero_dtype = torch.float16 if zero_bits == 16 else torch.int8
        specs["zero"] = TensorSpec((out_features, groups), zero_dtype, "group", 0, 1)
    if outlier_budget:
        # [out, K] column of each saturated value kept in M_sa
        specs["outlier_idx"] = TensorSpec(
            (out_features, outlier_budget), outlier_index_dtype(in_features), "row", 0
        )
        # [out, K] value of M_sa at that column (0 in unused slots)
        specs["outlier_val"] = TensorSpec((out_features, outlier_budget), torch.float16, "row", 0)
    # [pieces] number of terms actually computed (< terms when the residual fell below tol)
    specs["terms_used"] = TensorSpec((pieces,), torch.int32, "piece", None)
    if settings.dual_scale:
        # [pieces, in] column scales t (transform.py): the series holds W/t, the input is multiplied by t
        specs["col_scale"] = TensorSpec((pieces, in_features), torch.float16, "piece", None)
    if settings.rotation is not None:
        # [pieces, in] ±1 signs D of the block Hadamard rotation of the inputs (rotation.py)
        specs["rot_signs"] = TensorSpec((pieces, in_features), torch.int8, "piece", None)
    return specs


def check_tensors(
    name: str,
    values: Mapping[str, torch.Tensor],
    *,
    terms: int,
    term_bits: tuple[int, ...],
    in_features: int,
    series: str,
) -> list[str]:
    """What is impossible in a loaded layer ``name``'s tensors (``values``, any subset of ``layer_tensors``):
    NaN/Inf, ``terms_used`` outside 1..``terms``, a step or column scale <= 0, a rotation sign not ±1, a legacy
    residual code 0, an outlier column out of range.  One problem per line, ``"<name>.<tensor> ..."``; empty when
    all is well."""
    problems = [
        f"{name}.{t_name} (holds NaN or Inf)"
        for t_name, t in values.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    used = values.get("terms_used")
    if used is not None:
        for k in used.reshape(-1).tolist():
            if not 1 <= k <= terms:
                problems.append(f"{name}.terms_used={k} (config allows 1..{terms})")
    scale = values.get("scale")
    if scale is not None and scale.numel() and not bool((scale > 0).all()):
        problems.append(f"{name}.scale holds values <= 0 (a step size must be positive)")
    codes = values.get("codes")
    if codes is not None and series == "legacy" and terms > 1:
        later = unpack_series(codes, term_bits, in_features)[1:]
        if later.numel() and int(later.min()) < 1:  # legacy residual codes are 1 .. 2^X - 1
            problems.append(
                f"{name}.codes holds residual code 0, outside the legacy range 1..{2 ** term_bits[-1] - 1}"
            )
    t = values.get("col_scale")
    if t is not None and t.numel() and not bool((t > 0).all()):
        problems.append(f"{name}.col_scale holds values <= 0 (a column scale must be positive)")
    signs = values.get("rot_signs")
    if signs is not None and signs.numel() and not bool((signs.abs() == 1).all()):
        problems.append(f"{name}.rot_signs holds values other than -1 and +1")
    idx = values.get("outlier_idx")
    if idx is not None and idx.numel() and (idx.min() < 0 or idx.max() >= in_features):
        problems.append(f"{name}.outlier_idx out of [0, {in_features})")
    return problems
