"""``FPxINTHfQuantizer``: quantize-on-load, save and reload through transformers v5's quantizer API.

The pieces it drives: ``convert`` (the quantize op), ``bits_budget``, ``checks`` (load checks), ``offloaded``
(``device_map`` offloading), ``replace`` (which layers become ``FPxINTLinear``) and ``saving`` (atomic saves).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from ..gptq import compensation_span
from ..linear import FPxINTLinear
from .bits_budget import BudgetCandidates, apply_bits_budget
from .checkpoint import check_skip_names, resolve_compute_dtype
from .checks import check_checkpoint_keys, check_loaded
from .config import FPxINTConfig
from .convert import FPxINTQuantize, quantize_module
from .offloaded import warn_resident_offloaded_buffers
from .probe import PROBE_SEQUENCES, SECOND_ORDER_SEQUENCES, LayerStats, ProbeUnavailable, stream_blocks
from .proxy import ActivationProxy
from .replace import modules_to_not_convert, record_layers, replace_with_fpxint_linear
from .saving import install_atomic_save

logger = logging.getLogger(__name__)


class FPxINTHfQuantizer(HfQuantizer):
    """transformers quantizer for ``quant_method="fpxint"`` (no calibration data needed)."""

    requires_calibration = False
    quantization_config: FPxINTConfig

    def __init__(self, quantization_config: FPxINTConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._progress = None
        self.proxy: ActivationProxy | None = None
        # the dtype from_pretrained loads in (the probe's FP model runs in it)
        self.load_dtype = torch.float32
        # each layer's options under a bits budget (those of fewer terms spilled to disk)
        self.budget_candidates = BudgetCandidates()
        self.prepared: dict[
            str, dict[str, torch.Tensor]
        ] = {}  # module name -> buffers quantized by the probe

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self.quantization_config, FPxINTConfig):
            raise ValueError(f"expected an FPxINTConfig, got {type(self.quantization_config).__name__}")
        self.quantization_config.post_init()  # fields may have been set after construction

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if not self.pre_quantized:
            resolve_compute_dtype(self.quantization_config, dtype)  # the dtype a reload runs in
            self.load_dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        return dtype

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if self.pre_quantized or tensor_name != "weight":
            return False
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, FPxINTLinear) and "weight" in module._parameters

    def param_element_size(self, model: Any, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element for ``device_map="auto"``: 0 for the full-precision placeholder of a layer quantized
        on load (dropped once quantized; the module's buffers already count the quantized size)."""
        if self.param_needs_quantization(model, param_name):
            return 0
        return super().param_element_size(model, param_name, param)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs: Any):
        if not self.pre_quantized:
            check_skip_names(model, self.quantization_config.modules_to_not_convert)
        self.modules_to_not_convert = modules_to_not_convert(model, self.quantization_config)
        replaced = replace_with_fpxint_linear(
            model,
            self.quantization_config,
            self.modules_to_not_convert,
            weight_placeholder=not self.pre_quantized,
            names=self.quantization_config.quantized_modules if self.pre_quantized else None,
        )
        record_layers(model, self.quantization_config, replaced)
        if self.pre_quantized:
            check_checkpoint_keys(model, kwargs.get("checkpoint_files") or [])
        else:
            from tqdm.auto import tqdm

            cfg = self.quantization_config
            files = kwargs.get("checkpoint_files") or []
            weighted = cfg.series == "nested" and cfg.fit == "optimized"  # the fits that take an importance
            proxy = cfg.act_proxy
            if weighted and proxy == "probe":
                try:
                    self._quantize_in_probe(model, files)
                except ProbeUnavailable as err:  # raised before any layer was quantized
                    logger.warning("FP=xINT: %s: using act_proxy='norm' instead", err)
                    proxy = "norm"
            if weighted and proxy == "norm":
                kv = getattr(getattr(model, "config", None), "num_key_value_heads", None)
                self.proxy = ActivationProxy(files, kv)

            self._progress = tqdm(
                total=len(replaced), desc="FP=xINT quantizing", unit="layer", leave=False, disable=None
            )  # disable=None: no bar when stderr is not a terminal (log files, CI)
        return model

    def _quantize_in_probe(self, model: torch.nn.Module, files: list[str]) -> None:
        """``act_proxy="probe"``: quantize every converted layer of the decoder blocks while the streaming probe
        holds its block (``probe.stream_blocks``), with the measured ``E[x_j²]`` (and ``H`` with
        ``second_order``); ``convert`` then stores the prepared buffers."""
        cfg = self.quantization_config
        layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, FPxINTLinear) and "weight" in m._parameters
        }

        def on_block(_index: int, stats: dict[str, LayerStats]) -> None:
            for name, s in stats.items():
                if name in layers:
                    self.prepared[name] = quantize_module(
                        self,
                        name,
                        layers[name],
                        s.weight,
                        s.second_moment,
                        s.hessian,
                        compensation_span(s.weight.shape[1]),
                    )

        stream_blocks(
            model.config,
            files,
            on_block,
            self.load_dtype,
            SECOND_ORDER_SEQUENCES if cfg.second_order else PROBE_SEQUENCES,
            cfg.second_order,
        )

    def progress_update(self) -> None:
        if self._progress is not None:
            self._progress.update(1)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.proxy = None
        if self.prepared:
            raise ValueError(
                f"act_proxy='probe' quantized layers the checkpoint never loaded: {sorted(self.prepared)[:3]}"
            )
        check_loaded(model)
        if self.quantization_config.bits_budget is not None and not self.pre_quantized:
            try:
                apply_bits_budget(model, self.quantization_config, self.budget_candidates)
            finally:
                self.budget_candidates.close()
        self.budget_candidates = BudgetCandidates()
        warn_resident_offloaded_buffers(model)
        install_atomic_save(model)
        return model

    def get_quantize_ops(self) -> FPxINTQuantize:
        return FPxINTQuantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True
