"""A bits budget on load: every layer quantized with 1..``terms`` terms, then the split of ``budget.allocate_terms``
(the options of fewer terms wait on disk, so memory holds one series per layer)."""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from ..budget import LayerCandidates, allocate_terms, fused_groups, merge_candidates
from ..expansion import NO_OPTIONS, ExpandOptions
from ..linear import FPxINTLinear
from ..model_ops import model_bits_per_weight
from ..series import FPxINTSeries, SeriesSpec
from .config import FPxINTConfig

logger = logging.getLogger(__name__)


class BudgetCandidates:
    """Each layer's options for a bits budget, k = 1..terms terms, each fitted for exactly k terms.

    The relative error and stored bits of every option stay in memory (``summary``); the series of every k below
    the layer's full ``terms`` is written to a temporary folder (``spill_dir``, under ``$TMPDIR``) and read back
    only for the layers the split shrinks, so the load holds one series per layer, not two: on LLaMA-3-8B the
    one-term options would otherwise add about 3.9 GB to the quantizing process.

    The stored bits count every tensor that grows with the layer (``FPxINTSeries.stored_bits``: codes, scales,
    zeros, outliers, the input transforms' column scales and signs), not the per-layer ``terms_used`` counter (32
    bits a layer, the same for every k): so a budget equal to the bits of one term, e.g. ``bits=[3, 2]``,
    ``bits_budget=3.5`` at group 64, is met with one term in every layer."""

    def __init__(self, spill_dir: str | None = None) -> None:
        # layer name -> {k: (relative error, stored bits)}
        self.summary: dict[str, dict[int, tuple[float, int]]] = {}
        self._spill_dir = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._files: dict[tuple[str, int], str] = {}
        self._specs: dict[str, SeriesSpec] = {}

    def add(
        self, name: str, full: FPxINTSeries, weight: torch.Tensor, options: ExpandOptions = NO_OPTIONS
    ) -> None:
        """Record layer ``name``: ``full`` is its series of all its terms, fitted from ``weight`` with ``options``;
        the series of fewer terms are fitted here and spilled to disk one by one."""
        self._specs[name] = full.spec
        options_k = {full.spec.terms: (full.errors[-1] if full.errors else 0.0, full.stored_bits())}
        for k in range(1, full.spec.terms):
            s = FPxINTSeries.from_weight(weight, full.spec.truncated(k), options)
            options_k[k] = (s.errors[-1] if s.errors else 0.0, s.stored_bits())
            path = os.path.join(self._folder(), f"{len(self._files)}.pt")
            try:
                torch.save({n: t.detach().cpu() for n, t in s.state().items()}, path)
            except OSError as err:
                raise OSError(
                    f"FP=xINT bits budget: cannot write {name}'s {k}-term candidate to {path} ({err}); the "
                    f"candidates need about {s.stored_bits() // 8} bytes per layer this size: point TMPDIR at a "
                    "folder with room for them"
                ) from err
            self._files[(name, k)] = path
            del s
        self.summary[name] = options_k

    def series(self, name: str, k: int) -> FPxINTSeries:
        """Layer ``name``'s option of ``k`` terms (read back from disk below its full terms)."""
        spec = self._specs[name]
        if k == spec.terms:
            raise ValueError(f"{name}: the series of all {k} terms is the module's own, not a spilled option")
        state = torch.load(self._files[(name, k)], weights_only=True)
        return FPxINTSeries.from_state(spec.truncated(k), state)

    def close(self) -> None:
        """Delete the spilled series (also done when the object is garbage collected)."""
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp, self._files = None, {}

    def _folder(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fpxint-budget-", dir=self._spill_dir)
        return self._tmp.name


def apply_bits_budget(model: torch.nn.Module, cfg: FPxINTConfig, candidates: BudgetCandidates) -> None:
    """Choose each layer's terms under ``cfg.bits_budget`` (``budget.allocate_terms``; the pieces vLLM fuses
    keep one number of terms) from the ``candidates`` of each layer (by module name), shrink the layers that
    keep fewer than ``terms`` and record them in ``cfg.layer_terms``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FPxINTLinear)}
    summary = candidates.summary
    if any(n not in summary for n in layers):
        raise ValueError("bits_budget needs every FP=xINT layer quantized on load in this process")
    single = {
        n: LayerCandidates(
            n,
            m.in_features * m.out_features,
            tuple(summary[n][k][1] for k in sorted(summary[n])),
            tuple(summary[n][k][0] for k in sorted(summary[n])),
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
                module.load_series(candidates.series(name, k))
    cfg.layer_terms = {n: k for n, k in keep.items() if k != cfg.terms} or None
    logger.info(
        "FP=xINT bits_budget=%s: %.4f bits per weight stored; terms per layer %s",
        cfg.bits_budget,
        model_bits_per_weight(model),
        {k: list(keep.values()).count(k) for k in sorted(set(keep.values()))},
    )
