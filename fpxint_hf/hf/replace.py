"""Swap ``nn.Linear`` modules of a (meta-device) transformers model for ``FPxINTLinear``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from ..linear import FPxINTLinear
from ..settings import CONFIG_VERSION
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
    recorded = (config.layer_group_size or {}).get(name)  # else resolved from group_size, once, here
    with torch.device("meta"):
        module = FPxINTLinear.for_settings(
            linear.in_features,
            linear.out_features,
            settings,
            bias=linear.bias is not None,
            group_size=recorded,
            dtype=dtype,
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


def linears_to_quantize(
    model: nn.Module, skip: list[str] | None, names: list[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """The one rule for which layers FP=xINT converts: with ``names`` (a checkpoint's ``quantized_modules``) the
    ``nn.Linear`` modules so named (with or without the model's ``base_model_prefix``), else every ``nn.Linear``
    not matched by ``skip`` (transformers' ``should_convert_module``, as the vLLM plugin for old checkpoints)."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if names is None:
        return [(name, m) for name, m in linears if should_convert_module(name, skip)]
    prefix = getattr(model, "base_model_prefix", "")
    wanted = set(names)
    chosen = [(name, m) for name, m in linears if name in wanted or f"{prefix}.{name}" in wanted]
    found = {n for n, _ in chosen} | {f"{prefix}.{n}" for n, _ in chosen}
    absent = sorted(wanted - found)
    if absent:
        logger.warning(
            "FP=xINT: %d layers named in quantized_modules are no nn.Linear of %s (e.g. %s); they stay as they are",
            len(absent),
            type(model).__name__,
            absent[:3],
        )
    return chosen


def replace_with_fpxint_linear(
    model: nn.Module,
    config: FPxINTConfig,
    modules_to_not_convert: list[str] | None = None,
    weight_placeholder: bool = True,
    names: list[str] | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` named in ``names``, else every one not matched by ``modules_to_not_convert``;
    return the replaced names.

    Raises ``ValueError`` when nothing can be replaced (no ``nn.Linear`` at all, e.g. GPT-2's ``Conv1D``).
    """
    chosen = linears_to_quantize(model, modules_to_not_convert, names)
    recorded = config.layer_group_size or {}
    derived = [m.in_features for name, m in chosen if name not in recorded]  # group size not read back
    if weight_placeholder and names is None:  # quantizing: refuse a group size that fits no layer
        check_group_size(config.group_size, derived)
    replaced, used = [], {}
    with quiet_group_fallback():
        for name, module in chosen:
            new = make_fpxint_linear(module, config, weight_placeholder, name)
            model.set_submodule(name, new)
            replaced.append(name)
            if name not in recorded:
                used[new.in_features] = new.group_size  # resolved once, by SeriesSpec.for_layer
    warn_group_fallback(config.group_size, derived, used)
    if not replaced:
        kinds = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise ValueError(
            f"FP=xINT found no nn.Linear to quantize in {type(model).__name__} (modules_to_not_convert="
            f"{modules_to_not_convert}); module types present: {kinds[:12]}"
        )
    logger.info("FP=xINT: replaced %d linear layers", len(replaced))
    return replaced


def _fits(group_size: int, in_features: int) -> bool:
    return group_size >= in_features or in_features % group_size == 0


def check_group_size(group_size: int | None, in_features: list[int]) -> None:
    """Refuse a ``group_size`` that divides the inputs of none of the layers (``in_features``, one per layer):
    every layer would fall back to another size (``expansion.resolve_group_size``) than the one asked for."""
    if group_size is None or not in_features or any(_fits(group_size, n) for n in in_features):
        return
    sizes = sorted(set(in_features))
    common = math.gcd(*sizes)
    g = 1 << (group_size.bit_length() - 1)
    while g >= 16 and common % g:
        g //= 2
    hint = f"e.g. {g}, " if g >= 16 else ""
    raise ValueError(
        f"FPxINTConfig.group_size={group_size} divides the inputs of none of the {len(in_features)} layers to "
        f"quantize (in_features {', '.join(map(str, sizes))}); choose a group size that divides them ({hint}or "
        "None: one group per output channel)"
    )


def warn_group_fallback(group_size: int | None, in_features: list[int], used: dict[int, int]) -> None:
    """One warning for the layers whose ``in_features`` ``group_size`` does not divide, naming the size each uses
    (``used``: the group size the layers of each ``in_features`` were given; recorded in ``layer_group_size``)."""
    if group_size is None:
        return
    fell = sorted({n for n in in_features if not _fits(group_size, n)})
    if not fell:
        return
    what = "; ".join(
        f"{n} inputs: {'one group per output channel' if used[n] == n else f'groups of {used[n]}'}"
        for n in fell
    )
    count = sum(n in fell for n in in_features)
    logger.warning(
        "FP=xINT: group_size=%d does not divide the inputs of %d of %d layers, which use another group size "
        "(recorded per layer in layer_group_size): %s",
        group_size,
        count,
        len(in_features),
        what,
    )


@contextlib.contextmanager
def quiet_group_fallback() -> Iterator[None]:
    """Hide ``resolve_group_size``'s per-layer warning while the block runs (``warn_group_fallback`` sums up)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"group_size=\d+ does not divide in_features", category=UserWarning
        )
        yield


def record_layers(model: nn.Module, config: FPxINTConfig, replaced: list[str]) -> None:
    """Write the converted layers' names and the group sizes that differ from ``group_size`` into ``config``
    (format 2: a checkpoint saved from ``model`` is then loaded by name, in transformers and in vLLM)."""
    sizes = {}
    for name in replaced:
        m = model.get_submodule(name)
        if isinstance(m, FPxINTLinear) and m.group_size != (config.group_size or m.in_features):
            sizes[name] = m.group_size
    config.quantized_modules = list(replaced)
    config.layer_group_size = sizes or None
    config.version = CONFIG_VERSION
