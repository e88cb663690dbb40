"""A bits budget: how many terms each layer keeps (calibration-free, from weight errors only).

Every layer l has candidate expansions with k = 1..T terms, each with a stored size ``bits_l(k)`` (bits,
scales included) and a relative weight error ``err_l(k) = ||M - M_k||_F / ||M||_F``.  ``allocate_terms``
minimizes ``Σ_l err_l(k_l)²`` subject to ``Σ_l bits_l(k_l) <= budget · Σ_l n_l`` greedily: every layer starts
at k = 1 and the step that removes the most squared error per added stored bit is taken while it fits.
The errors fall geometrically with k, so the gains per bit shrink and greedy is the water-filling optimum
up to the last step.  Layers that vLLM fuses into one GEMM (``FUSED``: q/k/v, gate/up) must store the same
number of terms, so they are allocated together (``fused_groups``, ``merge_candidates``): the summed squared
error is the same objective, under that constraint.  Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's fused layers and the projections each one fuses (they share one number of terms)."""


@dataclass(frozen=True)
class LayerCandidates:
    """One layer's options: ``bits[k-1]`` stored bits and ``errors[k-1]`` relative error with k terms."""

    name: str
    n_weights: int
    bits: tuple[int, ...]
    errors: tuple[float, ...]


def allocate_terms(layers: list[LayerCandidates], budget: float) -> dict[str, int]:
    """Terms per layer under ``budget`` bits per weight; ``ValueError`` when even one term each exceeds it."""
    total = sum(c.n_weights for c in layers)
    if not layers or total == 0:
        return {}
    keep = {c.name: 1 for c in layers}
    spent = sum(c.bits[0] for c in layers)
    if spent > budget * total:
        raise ValueError(
            f"bits_budget={budget} is below the {spent / total:.4f} bits per weight of one term in every layer; "
            "allowed: at least that, or a narrower first term (e.g. bits=[2, 2, 2]) or symmetric=True (no zeros)"
        )
    while True:
        best, best_gain = None, 0.0
        for c in layers:
            k = keep[c.name]
            if k >= len(c.bits):
                continue
            extra = c.bits[k] - c.bits[k - 1]
            if spent + extra > budget * total:
                continue
            gain = (c.errors[k - 1] ** 2 - c.errors[k] ** 2) / max(extra, 1)
            if gain > best_gain:
                best, best_gain = c, gain
        if best is None:
            return keep
        spent += best.bits[keep[best.name]] - best.bits[keep[best.name] - 1]
        keep[best.name] += 1


def fused_groups(names: list[str]) -> dict[str, list[str]]:
    """``names`` grouped as vLLM fuses them: ``{"<parent>.qkv_proj": [q, k, v names present], ...}``; every
    other name is its own group (keyed by itself)."""
    piece_of = {p: fused for fused, pieces in FUSED.items() for p in pieces}
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        key = f"{parent}.{piece_of[leaf]}" if leaf in piece_of else name
        groups.setdefault(key, []).append(name)
    return groups


def merge_candidates(name: str, pieces: list[LayerCandidates]) -> LayerCandidates:
    """One candidate for layers that keep the same number of terms: bits summed, squared errors summed."""
    return LayerCandidates(
        name,
        sum(c.n_weights for c in pieces),
        tuple(sum(b) for b in zip(*(c.bits for c in pieces), strict=True)),
        tuple(math.sqrt(sum(e * e for e in es)) for es in zip(*(c.errors for c in pieces), strict=True)),
    )
