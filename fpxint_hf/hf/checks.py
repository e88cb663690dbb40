"""Load checks of FP=xINT checkpoints in transformers: the tensors the config declares, and their values."""

from __future__ import annotations

import torch

from ..layout import check_tensors
from ..linear import FPxINTLinear
from .checkpoint import check_files_complete
from .offloaded import offload_hooked, offloaded_value


def check_checkpoint_keys(model: torch.nn.Module, checkpoint_files: list[str]) -> None:
    """Before loading a pre-quantized checkpoint: every quantized layer's tensors are the ones its config declares.

    transformers would only report a tensor the module does not declare (e.g. ``zero`` when the config says
    ``symmetric=True``) as "unexpected" and drop it, so the model would run without it.  Reads only the
    safetensors headers.
    """
    stored: dict[str, set[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    # one read of each header: a truncated file is named (not safetensors' bare message), the rest are used here
    for header in check_files_complete(checkpoint_files).values():
        for key, entry in header.items():
            if key != "__metadata__":
                module_name, _, tensor_name = key.rpartition(".")
                stored.setdefault(module_name, set()).add(tensor_name)
                shapes[key] = tuple(entry["shape"])
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
        offloaded = offload_hooked(model, name)
        tensors = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
        values = {}
        for t_name, t in tensors.items():
            if t.device.type == "meta":
                read = offloaded_value(model, name, t_name)
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
        problems += check_tensors(
            name,
            values,
            terms=module.terms,
            term_bits=module.term_bits,
            in_features=module.in_features,
            series=module.series,
        )
    _raise_if(problems)


def _raise_if(problems: list[str], layers_shown: int = 2) -> None:
    """One short error: the problems (``"<layer>.<tensor> ..."``) of the first ``layers_shown`` layers (at most 8),
    then how many more in how many more layers (a config edited to another ``bits`` mismatches every layer)."""
    if not problems:
        return
    layer_of = {p: p.split(" ", 1)[0].rsplit(".", 1)[0] for p in problems}
    first = list(dict.fromkeys(layer_of.values()))[:layers_shown]
    shown = [p for p in problems if layer_of[p] in first][:8]
    text = "; ".join(shown)
    if len(shown) < len(problems):
        rest = {layer_of[p] for p in problems if p not in shown} - set(first)
        text += f"; and {len(problems) - len(shown)} more problems" + (
            f" in {len(rest)} more layers" if rest else ""
        )
    raise ValueError(f"FP=xINT checkpoint does not match its quantization_config: {text}")
