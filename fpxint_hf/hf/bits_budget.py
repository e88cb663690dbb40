"""A bits budget on load: every layer quantized with 1..``terms`` terms, then the split of ``budget.allocate_terms``."""

from __future__ import annotations

import logging

import torch

from ..budget import LayerCandidates, allocate_terms, fused_groups, merge_candidates
from ..expansion import NO_OPTIONS, ExpandOptions
from ..linear import FPxINTLinear
from ..model_ops import model_bits_per_weight
from ..series import FPxINTSeries
from .config import FPxINTConfig

logger = logging.getLogger(__name__)


def budget_candidates(full: FPxINTSeries, weight: torch.Tensor, options: ExpandOptions = NO_OPTIONS) -> dict:
    """``{k: (series, relative error, stored bits)}`` for k = 1..terms: each k fitted for exactly k terms (``full``:
    the layer's series of all its terms, fitted from ``weight`` with ``options``).

    The stored bits count every tensor that grows with the layer (``FPxINTSeries.stored_bits``: codes, scales,
    zeros, outliers, the input transforms' column scales and signs), not the per-layer ``terms_used`` counter (32
    bits a layer, the same for every k): so a budget equal to the bits of one term, e.g. ``bits=[3, 2]``,
    ``bits_budget=3.5`` at group 64, is met with one term in every layer."""
    cands = {}
    for k in range(1, full.spec.terms + 1):
        s = (
            full
            if k == full.spec.terms
            else FPxINTSeries.from_weight(weight, full.spec.truncated(k), options)
        )
        cands[k] = (s, s.errors[-1] if s.errors else 0.0, s.stored_bits())
    return cands


def apply_bits_budget(model: torch.nn.Module, cfg: FPxINTConfig, candidates: dict[str, dict]) -> None:
    """Choose each layer's terms under ``cfg.bits_budget`` (``budget.allocate_terms``; the pieces vLLM fuses
    keep one number of terms) from the ``candidates`` of each layer (``budget_candidates``, by module name),
    shrink the layers that keep fewer than ``terms`` and record them in ``cfg.layer_terms``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FPxINTLinear)}
    if any(n not in candidates for n in layers):
        raise ValueError("bits_budget needs every FP=xINT layer quantized on load in this process")
    single = {
        n: LayerCandidates(
            n,
            m.in_features * m.out_features,
            tuple(candidates[n][k][2] for k in sorted(candidates[n])),
            tuple(candidates[n][k][1] for k in sorted(candidates[n])),
        )
        for n, m in layers.items()
    }
    groups = fused_groups(list(layers))  # q/k/v and gate/up keep one number of terms (vLLM fuses them)
    options = [merge_candidates(g, [single[n] for n in names]) for g, names in groups.items()]
    try:
        per_group = allocate_terms(options, float(cfg.bits_budget or 0))
    except ValueError:
        if not cfg.recipe_budget:
            raise
        logger.warning(
            "FP=xINT: one term in every layer already exceeds the default bits_budget=%s (group_size=%s): every "
            "layer keeps one term",
            cfg.bits_budget,
            cfg.group_size,
        )
        per_group = {g: 1 for g in groups}
    keep = {n: per_group[g] for g, names in groups.items() for n in names}
    with torch.no_grad():
        for name, k in keep.items():
            module = layers[name]
            if k < module.terms:
                module.load_series(candidates[name][k][0])
    cfg.layer_terms = {n: k for n, k in keep.items() if k != cfg.terms} or None
    logger.info(
        "FP=xINT bits_budget=%s: %.4f bits per weight stored; terms per layer %s",
        cfg.bits_budget,
        model_bits_per_weight(model),
        {k: list(keep.values()).count(k) for k in sorted(set(keep.values()))},
    )
