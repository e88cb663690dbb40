"""A ``quantization_config`` passed to ``from_pretrained`` for a folder that is already FP=xINT-quantized.

transformers keeps the checkpoint's config and drops the one passed, with a generic warning
(``AutoHfQuantizer.merge_quantization_configs``).  For FP=xINT, ``install_config_merge`` replaces that step:
the run-time fields (``forward_mode``) of the passed config are applied to a copy of the checkpoint's, and every
other field that differs is named in one warning, because the stored tensors fix it.  The passed object is never
modified.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..settings import CONFIG_DEFAULTS
from .config import QUANT_METHOD, FPxINTConfig

logger = logging.getLogger(__name__)

# how the stored layers compute: a loading choice, applied from the passed config
RUNTIME_FIELDS = ("forward_mode",)
# written when quantizing (which layers, their group sizes and terms, the format): never the user's choice
RECORDED_FIELDS = ("quantized_modules", "layer_group_size", "layer_terms", "version")


def ignored_fields(stored: FPxINTConfig, passed: FPxINTConfig) -> dict[str, tuple[Any, Any]]:
    """``field -> (passed value, checkpoint value)`` for every field of ``passed`` that loading cannot apply."""
    skip = set(RUNTIME_FIELDS) | set(RECORDED_FIELDS)
    if passed.compute_dtype is None:  # unset: resolved when quantizing, so the checkpoint always names one
        skip.add("compute_dtype")
    return {
        name: (getattr(passed, name), getattr(stored, name))
        for name in CONFIG_DEFAULTS  # every field of FPxINTConfig
        if name not in skip and getattr(passed, name) != getattr(stored, name)
    }


def merge_with_checkpoint(stored: FPxINTConfig, passed: FPxINTConfig) -> FPxINTConfig:
    """The config to load with: a copy of ``stored`` with ``passed``'s run-time fields; warns once, naming each
    other field of ``passed`` that differs from ``stored`` (those are ignored)."""
    merged = copy.deepcopy(stored)
    for name in RUNTIME_FIELDS:
        setattr(merged, name, getattr(passed, name))
    merged.post_init()
    ignored = ignored_fields(stored, passed)
    if ignored:
        named = ", ".join(f"{k}={mine!r} (checkpoint: {theirs!r})" for k, (mine, theirs) in ignored.items())
        logger.warning(
            "FP=xINT: this folder is already quantized; the quantization_config passed to from_pretrained is used "
            "for %s only. Ignored, because the stored tensors fix them: %s",
            ", ".join(RUNTIME_FIELDS),
            named,
        )
    return merged


def _is_fpxint(config: Any) -> bool:
    if isinstance(config, dict):
        return config.get("quant_method") == QUANT_METHOD
    return isinstance(config, FPxINTConfig)


def install_config_merge(auto_hf_quantizer: type) -> None:
    """Route transformers' merge of a checkpoint's config with a passed ``FPxINTConfig`` through
    :func:`merge_with_checkpoint` (idempotent); every other pair goes to transformers' own merge."""
    current = auto_hf_quantizer.__dict__["merge_quantization_configs"]
    if getattr(current.__func__, "_fpxint_merge", False):
        return
    original = current.__func__

    def merge_quantization_configs(
        cls: type, quantization_config: Any, quantization_config_from_args: Any
    ) -> Any:
        if isinstance(quantization_config_from_args, FPxINTConfig) and _is_fpxint(quantization_config):
            stored = quantization_config
            if isinstance(stored, dict):
                stored = FPxINTConfig.from_dict(dict(stored))
            return merge_with_checkpoint(stored, quantization_config_from_args)
        return original(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs._fpxint_merge = True  # type: ignore[attr-defined]
    auto_hf_quantizer.merge_quantization_configs = classmethod(merge_quantization_configs)  # type: ignore[attr-defined]
