"""LoRA adapters (PEFT) on a frozen FP=xINT model: QLoRA-style fine-tuning, saving and reloading.

PEFT picks the LoRA layer class from the type of the layer it wraps and knows no ``FPxINTLinear``; its
extension point for other layer types is ``LoraConfig._register_custom_module`` (documented as experimental,
https://huggingface.co/docs/peft/developer_guides/custom_models).  ``lora_config`` / ``register_lora`` put
``FPxINTLoraLinear`` there; the registration is not written to ``adapter_config.json``, so reloading an
adapter goes through ``load_lora_adapter`` (or ``PeftModel.from_pretrained(..., config=register_lora(...))``)::

    from fpxint_hf.hf.lora import lora_config, load_lora_adapter
    from peft import get_peft_model

    model = get_peft_model(quantized_model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    ...  # train: only the adapters have requires_grad
    model.save_pretrained("adapter")  # adapter weights and adapter_config.json only
    model = load_lora_adapter(AutoModelForCausalLM.from_pretrained("quantized-checkpoint"), "adapter")

The quantized weights stay frozen buffers.  The base layer's forward runs as configured; ``"auto"`` takes the
``dense`` backend (the dequantized weight, cached) whenever its input needs a gradient, and every other forward
mode is differentiable too: the packed ``int4``/``int8`` kernels run inside ``backends.KernelLinearFunction``,
whose backward uses the dequantized weight.  Merging an adapter into the quantized weights is not supported (it would need
re-quantization); ``unload()`` returns the untouched quantized model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

from ..linear import FPxINTLinear

# init_lora_weights values that need nothing but the shapes (the others read the base layer's dense weight)
SUPPORTED_INITS = (True, False, "gaussian")


class FPxINTLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` around an ``FPxINTLinear``: ``y = base(x) + scaling · B(A(dropout(x)))``.

    Plain LoRA only: variants that read or rewrite the dense base weight (DoRA, PiSSA/OLoRA/LoftQ/CorDA
    initialisations) and merging raise ``ValueError`` / ``NotImplementedError``.
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        if config.init_lora_weights not in SUPPORTED_INITS:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} needs the dense weight of the base layer, which an "
                f"FP=xINT layer does not hold; use one of {SUPPORTED_INITS}"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(
        self,
    ):  # vanilla LoRA only; a requested variant raises "unsupported variant combination"
        return {(): None}

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "merging a LoRA adapter into FP=xINT weights is not supported (it would need re-quantization): keep "
            "the adapter separate, or merge it into the full-precision model and quantize the result"
        )


def register_lora(config: LoraConfig) -> LoraConfig:
    """Let ``config`` wrap ``FPxINTLinear`` layers with ``FPxINTLoraLinear``; returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({FPxINTLinear: FPxINTLoraLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` that can target FP=xINT layers."""
    return register_lora(LoraConfig(**kwargs))


def load_lora_adapter(
    model: torch.nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False, **kwargs: Any
) -> PeftModel:
    """``PeftModel.from_pretrained`` for an adapter trained on an FP=xINT model (its saved config re-registered)."""
    config = register_lora(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable, config=config, **kwargs)
