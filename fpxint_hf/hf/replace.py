"""Swap ``nn.Linear`` modules of a (meta-device) transformers model for ``FPxINTLinear``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from ..linear import FPxINTLinear
from .config import FPxINTConfig

logger = logging.getLogger(__name__)


def make_fpxint_linear(
    linear: nn.Linear, config: FPxINTConfig, weight_placeholder: bool, name: str = ""
) -> FPxINTLinear:
    """An empty (meta) ``FPxINTLinear`` shaped like ``linear`` (module ``name``) under ``config``.

    With ``weight_placeholder`` the module also gets a meta ``weight`` parameter, so transformers'
    quantize-on-load finds the full-precision key and hands it to the quantize op, which drops it.
    """
    dtype = linear.weight.dtype
    settings = config.settings()
    terms = config.terms_of(name)
    if terms != settings.terms:  # a bits budget kept fewer terms in this layer
        settings = dataclasses.replace(settings, terms=terms, bits=settings.term_bits[:terms])
    with torch.device("meta"):
        module = FPxINTLinear.for_settings(
            linear.in_features, linear.out_features, settings, bias=linear.bias is not None, dtype=dtype
        )
        if weight_placeholder:
            module.weight = nn.Parameter(
                torch.empty(linear.out_features, linear.in_features, dtype=dtype), requires_grad=False
            )
    module.forward_mode = config.forward_mode
    return module


def modules_to_not_convert(model: Any, config: FPxINTConfig) -> list[str]:
    """What stays in full precision: ``config.modules_to_not_convert``, the model's fp32 modules and transformers'
    default skips (the output embedding, tied weights)."""
    from transformers.quantizers.base import HfQuantizer

    return HfQuantizer.get_modules_to_not_convert(
        model,
        config.modules_to_not_convert,
        getattr(model, "_keep_in_fp32_modules", None),
        add_default_skips=True,
    )


def linears_to_quantize(model: nn.Module, skip: list[str] | None) -> list[tuple[str, nn.Linear]]:
    """The one rule for which layers FP=xINT converts: every ``nn.Linear`` not matched by ``skip``."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and should_convert_module(name, skip)
    ]


def replace_with_fpxint_linear(
    model: nn.Module,
    config: FPxINTConfig,
    modules_to_not_convert: list[str] | None = None,
    weight_placeholder: bool = True,
) -> list[str]:
    """Replace every ``nn.Linear`` not matched by ``modules_to_not_convert``; return the replaced names.

    Raises ``ValueError`` when nothing can be replaced (no ``nn.Linear`` at all, e.g. GPT-2's ``Conv1D``).
    """
    replaced = []
    for name, module in linears_to_quantize(model, modules_to_not_convert):
        model.set_submodule(name, make_fpxint_linear(module, config, weight_placeholder, name))
        replaced.append(name)
    if not replaced:
        kinds = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise ValueError(
            f"FP=xINT found no nn.Linear to quantize in {type(model).__name__} (modules_to_not_convert="
            f"{modules_to_not_convert}); module types present: {kinds[:12]}"
        )
    logger.info("FP=xINT: replaced %d linear layers", len(replaced))
    return replaced
