"""``FPxINTHfQuantizer``: quantize-on-load, save and reload through transformers v5's quantizer API."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from ..budget import LayerCandidates, allocate_terms
from ..linear import FPxINTLinear
from ..model_ops import model_bits_per_weight
from ..offload import accelerate_hooks
from ..packing import unpack_series
from .checkpoint import check_files_complete, check_skip_names, resolve_compute_dtype
from .config import FPxINTConfig
from .proxy import ActivationProxy
from .replace import modules_to_not_convert, replace_with_fpxint_linear
from .saving import install_atomic_save

logger = logging.getLogger(__name__)


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
        cfg = self.hf_quantizer.quantization_config
        proxy = self.hf_quantizer.proxy
        importance = None if proxy is None else proxy.importance(module_name)
        try:
            e = module.quantize_weight(weight, cfg.clip, cfg.outlier_fraction, cfg.tol, importance)
        except ValueError as err:
            raise ValueError(f"FP=xINT cannot quantize {full_layer_name}: {err}") from err
        state = module.expansion_state(e)
        if cfg.bits_budget is not None:
            module._budget_candidates = budget_candidates(module, weight, cfg, e, state, importance)  # type: ignore[assignment]
        module._parameters.pop("weight", None)  # the full-precision placeholder is not kept
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        self.hf_quantizer.progress_update()
        return {f"{module_name}.{name}": tensor for name, tensor in state.items()}


class FPxINTHfQuantizer(HfQuantizer):
    """transformers quantizer for ``quant_method="fpxint"`` (no calibration data needed)."""

    requires_calibration = False
    quantization_config: FPxINTConfig

    def __init__(self, quantization_config: FPxINTConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._progress = None
        self.proxy: ActivationProxy | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self.quantization_config, FPxINTConfig):
            raise ValueError(f"expected an FPxINTConfig, got {type(self.quantization_config).__name__}")
        self.quantization_config.post_init()  # fields may have been set after construction

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if not self.pre_quantized:
            resolve_compute_dtype(self.quantization_config, dtype)  # the dtype a reload runs in
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
        )
        if self.pre_quantized:
            check_checkpoint_keys(model, kwargs.get("checkpoint_files") or [])
        else:
            from tqdm.auto import tqdm

            cfg = self.quantization_config
            if cfg.act_proxy == "norm" and cfg.series == "nested" and cfg.fit == "optimized":
                kv = getattr(getattr(model, "config", None), "num_key_value_heads", None)
                self.proxy = ActivationProxy(kwargs.get("checkpoint_files") or [], kv)

            self._progress = tqdm(
                total=len(replaced), desc="FP=xINT quantizing", unit="layer", leave=False, disable=None
            )  # disable=None: no bar when stderr is not a terminal (log files, CI)
        return model

    def progress_update(self) -> None:
        if self._progress is not None:
            self._progress.update(1)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.proxy = None
        check_loaded(model)
        if self.quantization_config.bits_budget is not None and not self.pre_quantized:
            apply_bits_budget(model, self.quantization_config)
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


def budget_candidates(
    module: FPxINTLinear, weight: torch.Tensor, cfg: FPxINTConfig, full, full_state, importance=None
) -> dict:
    """``{k: (buffers, relative error, stored bits)}`` for k = 1..terms: each k fitted for exactly k terms."""
    cands = {}
    for k in range(1, module.terms + 1):
        if k == module.terms:
            e, state = full, full_state
        else:
            probe = FPxINTLinear(
                module.in_features,
                module.out_features,
                bias=False,
                bits=module.term_bits[:k],
                terms=k,
                group_size=module.group_size,
                symmetric=module.symmetric,
                outlier_budget=module.outlier_budget,
                series=module.series,
                fit=module.fit,
                device="meta",
            )
            e = probe.quantize_weight(weight, cfg.clip, cfg.outlier_fraction, cfg.tol, importance)
            state = probe.expansion_state(e)
        stored = 8 * sum(t.numel() * t.element_size() for t in state.values())
        cands[k] = (state, e.errors[-1] if e.errors else 0.0, stored)
    return cands


def apply_bits_budget(model: torch.nn.Module, cfg: FPxINTConfig) -> None:
    """Choose each layer's terms under ``cfg.bits_budget`` (``budget.allocate_terms``), shrink the layers that
    keep fewer than ``terms`` and record them in ``cfg.layer_terms``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FPxINTLinear)}
    cands = {n: m.__dict__.pop("_budget_candidates", None) for n, m in layers.items()}
    if any(c is None for c in cands.values()):
        raise ValueError("bits_budget needs every FP=xINT layer quantized on load in this process")
    options = [
        LayerCandidates(
            n,
            m.in_features * m.out_features,
            tuple(cands[n][k][2] for k in sorted(cands[n])),
            tuple(cands[n][k][1] for k in sorted(cands[n])),
        )
        for n, m in layers.items()
    ]
    keep = allocate_terms(options, float(cfg.bits_budget or 0))
    with torch.no_grad():
        for name, k in keep.items():
            module = layers[name]
            if k < module.terms:
                module.truncate_terms(k)
                for t_name, value in cands[name][k][0].items():
                    setattr(module, t_name, value.to(getattr(module, t_name).device))
    cfg.layer_terms = {n: k for n, k in keep.items() if k != cfg.terms} or None
    logger.info(
        "FP=xINT bits_budget=%s: %.4f bits per weight stored; terms per layer %s",
        cfg.bits_budget,
        model_bits_per_weight(model),
        {k: list(keep.values()).count(k) for k in sorted(set(keep.values()))},
    )


def check_checkpoint_keys(model: torch.nn.Module, checkpoint_files: list[str]) -> None:
    """Before loading a pre-quantized checkpoint: every quantized layer's tensors are the ones its config declares.

    transformers would only report a tensor the module does not declare (e.g. ``zero`` when the config says
    ``symmetric=True``) as "unexpected" and drop it, so the model would run without it.  Reads only the
    safetensors headers.
    """
    from safetensors import safe_open

    check_files_complete(checkpoint_files)  # a truncated file: named, not safetensors' bare message
    stored: dict[str, set[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in checkpoint_files:
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    module_name, _, tensor_name = key.rpartition(".")
                    stored.setdefault(module_name, set()).add(tensor_name)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    prefix = getattr(model, "base_model_prefix", "") + "."
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, FPxINTLinear):
            continue
        names = stored.get(name, stored.get(name.removeprefix(prefix)))
        if names is None:
            continue  # absent altogether: reported by check_loaded after loading
        declared_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        declared = set(declared_shapes)
        key_of = f"{name}." if f"{name}.codes" in shapes else f"{name.removeprefix(prefix)}."
        for t_name in sorted(names & declared):
            got = shapes.get(key_of + t_name)
            if got is not None and got != declared_shapes[t_name]:
                problems.append(
                    f"{name}.{t_name} has shape {list(got)} in the checkpoint, but the config declares "
                    f"{list(declared_shapes[t_name])} (bits={module.bits}, terms={module.terms}, "
                    f"group_size={module.group_size}, outliers_per_row={module.outlier_budget})"
                )
        for extra in sorted(names - declared):
            problems.append(f"{name}.{extra} (in the checkpoint, but the config declares no such tensor)")
        for missing in sorted(declared - names):
            problems.append(f"{name}.{missing} (missing from the checkpoint)")
    _raise_if(problems)


def check_loaded(model: torch.nn.Module) -> None:
    """Fail loudly when an ``FPxINTLinear`` came out of loading incomplete or with impossible values.

    transformers only warns about missing keys and fills them with uninitialised memory; an
    FP=xINT model with a missing tensor would run with garbage, so this raises instead.  Tensors that
    accelerate offloaded (``device_map`` with ``"disk"``, or ``"cpu"`` next to an accelerator) are on the
    meta device here: they are read back one at a time from accelerate's weights map and checked the same
    way; one absent from that map was never loaded.
    """
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, FPxINTLinear):
            continue
        if "weight" in module._parameters:
            problems.append(
                f"{name}.weight (never quantized: the checkpoint has no full-precision weight for it)"
            )
            continue
        offloaded = _offload_hooked(model, name)
        tensors = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
        values = {}
        for t_name, t in tensors.items():
            if t.device.type == "meta":
                read = _offloaded_value(model, name, t_name)
                if read is None:
                    problems.append(f"{name}.{t_name} (missing: offloaded, but not in the offload index)")
                    continue
                t = read
            # accelerate moves the resident tensors of an offloaded module onto the execution device, which
            # drops transformers' loaded-flag; their presence was checked on the checkpoint headers instead
            elif not offloaded and not getattr(t, "_is_hf_initialized", False):
                problems.append(f"{name}.{t_name} (missing from the checkpoint)")
                continue
            values[t_name] = t
            if t.is_floating_point() and not torch.isfinite(t).all():
                problems.append(f"{name}.{t_name} (holds NaN or Inf)")
        if "terms_used" in values:
            k = int(values["terms_used"].item())
            if not 1 <= k <= module.terms:
                problems.append(f"{name}.terms_used={k} (config allows 1..{module.terms})")
        scale = values.get("scale")
        if scale is not None and scale.numel() and not bool((scale > 0).all()):
            problems.append(f"{name}.scale holds values <= 0 (a step size must be positive)")
        codes = values.get("codes")
        if codes is not None and module.series == "legacy" and module.terms > 1:
            later = unpack_series(codes, module.term_bits, module.in_features)[1:]
            if later.numel() and int(later.min()) < 1:  # legacy residual codes are 1 .. 2^X - 1
                problems.append(
                    f"{name}.codes holds residual code 0, outside the legacy range 1..{2 ** module.term_bits[-1] - 1}"
                )
        idx = values.get("outlier_idx")
        if idx is not None and idx.numel() and (idx.min() < 0 or idx.max() >= module.in_features):
            problems.append(f"{name}.outlier_idx out of [0, {module.in_features})")
    _raise_if(problems)


def warn_resident_offloaded_buffers(model: torch.nn.Module) -> None:
    """Warn when layers that ``device_map`` offloads keep their FP=xINT weights on the execution device.

    The weights are buffers, and accelerate offloads only parameters unless ``from_pretrained(...,
    offload_buffers=True)``: without it an offloaded FP=xINT layer keeps its codes and scales where the model
    runs (only its bias is offloaded), although ``device_map="auto"`` counted them as offloaded.
    """
    layers, size, devices = 0, 0, set()
    for name, module in model.named_modules():
        if isinstance(module, FPxINTLinear) and _offload_hooked(model, name):
            resident = [b for b in module.buffers(recurse=False) if b.device.type != "meta"]
            if resident:
                layers += 1
                size += sum(b.numel() * b.element_size() for b in resident)
                devices |= {str(b.device) for b in resident}
    if layers:
        warnings.warn(
            f"{layers} FP=xINT layers are offloaded by device_map, but their quantized weights ({size / 1e6:.3g} "
            f"MB, held in buffers) stay on {', '.join(sorted(devices))}: accelerate offloads buffers only with "
            "from_pretrained(..., offload_buffers=True)",
            UserWarning,
            stacklevel=2,
        )


def _offload_hooks(model: torch.nn.Module, module_name: str):
    """``(path below the hooked module, hook)`` for every accelerate hook on ``module_name`` and its parents."""
    parts = module_name.split(".") if module_name else []
    for i in range(len(parts), -1, -1):
        for h in accelerate_hooks(model.get_submodule(".".join(parts[:i]))):
            yield parts[i:], h


def _offload_hooked(model: torch.nn.Module, module_name: str) -> bool:
    return any(getattr(h, "offload", False) for _, h in _offload_hooks(model, module_name))


def _offloaded_value(model: torch.nn.Module, module_name: str, tensor_name: str) -> torch.Tensor | None:
    """An offloaded tensor read back from accelerate's weights map (disk or CPU), ``None`` if it has none."""
    for below, hook in _offload_hooks(model, module_name):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None:
            try:
                return weights_map[".".join([*below, tensor_name])]
            except KeyError:
                return None
    return None


def _raise_if(problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"FP=xINT checkpoint does not match its quantization_config: {shown}")
