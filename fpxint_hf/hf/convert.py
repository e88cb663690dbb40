"""``FPxINTQuantize``: transformers' conversion op that quantizes one full-precision weight on load."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.core_model_loading import ConversionOps

from ..expansion import ExpandOptions
from ..linear import FPxINTLinear
from ..series import FPxINTSeries

if TYPE_CHECKING:
    from .quantizer import FPxINTHfQuantizer


@torch.no_grad()
def quantize_module(
    hf_quantizer: FPxINTHfQuantizer,
    module_name: str,
    module: FPxINTLinear,
    weight: torch.Tensor,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    hessian_span: int | None = None,
) -> dict[str, torch.Tensor]:
    """The buffers of ``module`` for the full-precision ``weight`` (and its bits-budget candidates, kept on the
    quantizer); ``importance``/``hessian``: the layer's input statistics (``expansion.expand``)."""
    options = ExpandOptions(importance, hessian, hessian_span)
    try:
        series = FPxINTSeries.from_weight(weight, module.spec, options)
    except ValueError as err:
        raise ValueError(f"FP=xINT cannot quantize {module_name}.weight: {err}") from err
    if hf_quantizer.quantization_config.bits_budget is not None:
        hf_quantizer.budget_candidates.add(module_name, series, weight, options)
    return series.state()


class FPxINTQuantize(ConversionOps):
    """Turns one full-precision ``*.weight`` into the FP=xINT buffers of its module (tensor by tensor)."""

    def __init__(self, hf_quantizer: FPxINTHfQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(  # type: ignore[override]  # transformers' signature, with the arguments it passes named
        self,
        input_dict: dict[str, Any],
        model: torch.nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        (value,) = input_dict.values()
        weight = value[0] if isinstance(value, list) else value
        if model is None or full_layer_name is None:
            raise ValueError("FP=xINT's quantize op needs the model and the layer name from transformers")
        module_name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if not isinstance(module, FPxINTLinear):
            raise ValueError(f"{module_name} is not an FPxINTLinear ({type(module).__name__})")
        state = self.hf_quantizer.prepared.pop(module_name, None)  # quantized in the probe's pass
        if state is None:
            proxy = self.hf_quantizer.proxy
            importance = None if proxy is None else proxy.importance(module_name)
            state = quantize_module(self.hf_quantizer, module_name, module, weight, importance)
        module._parameters.pop("weight", None)  # the full-precision placeholder is not kept
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        self.hf_quantizer.progress_update()
        return {f"{module_name}.{name}": tensor for name, tensor in state.items()}
