"""What accelerate's ``device_map`` offloading did to the FP=xINT layers of a loaded model."""

from __future__ import annotations

import warnings

import torch

from ..linear import FPxINTLinear
from ..offload import accelerate_hooks


def warn_resident_offloaded_buffers(model: torch.nn.Module) -> None:
    """Warn when layers that ``device_map`` offloads keep their FP=xINT weights on the execution device.

    The weights are buffers, and accelerate offloads only parameters unless ``from_pretrained(...,
    offload_buffers=True)``: without it an offloaded FP=xINT layer keeps its codes and scales where the model
    runs (only its bias is offloaded), although ``device_map="auto"`` counted them as offloaded.
    """
    layers, size, devices = 0, 0, set()
    for name, module in model.named_modules():
        if isinstance(module, FPxINTLinear) and offload_hooked(model, name):
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


def offload_hooks(model: torch.nn.Module, module_name: str):
    """``(path below the hooked module, hook)`` for every accelerate hook on ``module_name`` and its parents."""
    parts = module_name.split(".") if module_name else []
    for i in range(len(parts), -1, -1):
        for h in accelerate_hooks(model.get_submodule(".".join(parts[:i]))):
            yield parts[i:], h


def offload_hooked(model: torch.nn.Module, module_name: str) -> bool:
    return any(getattr(h, "offload", False) for _, h in offload_hooks(model, module_name))


def offloaded_value(model: torch.nn.Module, module_name: str, tensor_name: str) -> torch.Tensor | None:
    """An offloaded tensor read back from accelerate's weights map (disk or CPU), ``None`` if it has none."""
    for below, hook in offload_hooks(model, module_name):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None:
            try:
                return weights_map[".".join([*below, tensor_name])]
            except KeyError:
                return None
    return None
