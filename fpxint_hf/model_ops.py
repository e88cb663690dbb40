"""Model-level operations on the ``FPxINTLinear`` layers of a model: bits per weight, run-time truncation, forward
mode and the path each layer runs."""

from __future__ import annotations

import torch
from torch import nn

from .backends import ForwardPath
from .linear import FORWARD_MODES, FPxINTLinear
from .packing import term_bytes


def model_bits_per_weight(model: nn.Module, terms: int | None = None) -> float:
    """Bits per weight of all ``FPxINTLinear`` layers of ``model`` from their stored bytes, as if saved with
    ``terms`` terms (``None``: as stored); ``ValueError`` when the model has none."""
    stored = n = 0
    for m in model.modules():
        if isinstance(m, FPxINTLinear):
            unused = sum(term_bytes(m.term_bits, m.out_features, m.in_features)[terms or m.terms :])
            stored += 8 * (m.stored_bytes() - unused)
            n += m.in_features * m.out_features
    if n == 0:
        raise ValueError(f"{type(model).__name__} holds no FPxINTLinear layer")
    return stored / n


def set_active_terms(model: nn.Module, k: int | None) -> nn.Module:
    """Truncate every ``FPxINTLinear`` of ``model`` to its first ``k`` terms (``None``: all stored)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"active terms k={k!r} must be an int >= 1 or None")
    layers = _fpxint_layers(model)
    most = max((m.terms for m in layers), default=0)
    if k is not None and layers and k > most:
        raise ValueError(f"active terms k={k} exceeds the {most} terms stored (allowed: 1..{most} or None)")
    for m in layers:
        m.active_terms = k
    return model


def set_forward_mode(model: nn.Module, mode: str) -> nn.Module:
    """Select the forward path of every ``FPxINTLinear``: one of ``FORWARD_MODES``."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"forward mode={mode!r} is not supported; allowed: {FORWARD_MODES}")
    for m in _fpxint_layers(model):
        m.forward_mode = mode
    return model


def forward_paths(
    model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> dict[str, ForwardPath]:
    """The forward path of every ``FPxINTLinear`` of ``model`` by module name (``FPxINTLinear.forward_path``): the
    backend or module mode it runs for activations of ``dtype`` (default: the model's dtype) on ``device``
    (default: the layer's), why, and why the others were refused."""
    paths = {}
    for name, m in model.named_modules():
        if isinstance(m, FPxINTLinear):
            dt = dtype or getattr(model, "dtype", None) or torch.float32
            paths[name] = m.forward_path(dt, device or m.scale.device)
    return paths


def quant_method_of(config) -> str | None:
    """``quant_method`` of a model config's ``quantization_config`` (a dict or a config object), or ``None``."""
    qcfg = getattr(config, "quantization_config", None)
    return qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)


def _fpxint_layers(model: nn.Module) -> list[FPxINTLinear]:
    """The ``FPxINTLinear`` modules of ``model``; ``ValueError`` when there are none although its config says
    ``quant_method="fpxint"``: it was loaded while the plugin was not registered (transformers then only warns
    "Unknown quantization type" and initialises the linear layers at random)."""
    layers = [m for m in model.modules() if isinstance(m, FPxINTLinear)]
    if not layers and quant_method_of(getattr(model, "config", None)) == "fpxint":
        raise ValueError(
            f"{type(model).__name__} comes from an FP=xINT checkpoint (quant_method='fpxint') but holds no "
            "FPxINTLinear: it was loaded before quant_method 'fpxint' was registered, and its linear layers are "
            "randomly initialised. `import fpxint_hf` (or install it so that its start-up hook registers it) "
            "before from_pretrained, and load it again"
        )
    return layers
