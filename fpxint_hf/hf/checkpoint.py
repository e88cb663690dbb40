"""Checks that read only file headers and module names, for errors that name the file or the module:

- ``check_files_complete``: every ``.safetensors`` file has a readable header and holds all the bytes it
  declares (a truncated copy otherwise fails inside safetensors with ``incomplete metadata``, naming nothing);
- ``validate_checkpoint``: an fpxint checkpoint folder is complete (files, index, every tensor the model declares,
  with its shape) without loading any weight; ``fpxint push`` runs it before uploading;
- ``check_skip_names``: every ``modules_to_not_convert`` entry matches a module (closest names otherwise);
- the compute dtype a checkpoint is reloaded in (``compute_dtype`` of the config, written as ``config.json``'s
  ``dtype``, which ``from_pretrained``'s default ``dtype="auto"`` reads; an explicit ``dtype=`` still wins).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from ..settings import COMPUTE_DTYPES
from .config import FPxINTConfig

_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


def _read_header(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(header, None) or (None, what is wrong with the file)."""
    size = os.path.getsize(path)
    if size < 8:
        return None, f"{path} is {size} bytes long, shorter than a safetensors header"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > _HEADER_LIMIT or 8 + n > size:
            return None, f"{path} is truncated: {size} bytes, its header alone declares {8 + n}"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, f"{path} has an unreadable header"
    if not isinstance(header, dict):
        return None, f"{path} has an unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return None, f"{path} is truncated: {size} bytes, its header declares {need}"
    return header, None


def check_files_complete(files: list[str]) -> dict[str, dict[str, Any]]:
    """Raise ``ValueError`` naming every incomplete ``.safetensors`` file; return ``{file: header}``."""
    headers, problems = {}, []
    for path in map(str, files):
        if path.endswith(".safetensors"):
            header, problem = _read_header(path)
            if problem:
                problems.append(problem)
            else:
                headers[path] = header or {}
    if problems:
        raise ValueError(
            f"the checkpoint is incomplete: {'; '.join(problems)} (interrupted copy or download? fetch it again)"
        )
    return headers


def validate_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check an fpxint checkpoint folder without loading a weight: ``ValueError`` naming what is missing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .replace import modules_to_not_convert, replace_with_fpxint_linear

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({str(folder / f) for f in weight_map.values()})
    else:
        weight_map, files = {}, [str(folder / "model.safetensors")]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise ValueError(f"the checkpoint is incomplete: {', '.join(absent)} missing")
    stored: dict[str, list[int]] = {}
    for header in check_files_complete(files).values():
        stored |= {k: t["shape"] for k, t in header.items() if k != "__metadata__"}
    listed = [k for k, f in weight_map.items() if k not in stored]
    config = AutoConfig.from_pretrained(folder)
    cfg = FPxINTConfig.from_dict(dict(config.quantization_config))
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    replace_with_fpxint_linear(model, cfg, modules_to_not_convert(model, cfg), weight_placeholder=False)
    prefix = getattr(model, "base_model_prefix", "") + "."
    groups: dict[int, list[str]] = {}  # tied parameters: one stored name is enough
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    params = {n for names in groups.values() for n in names}
    expected = [[n] for n in model.state_dict() if n not in params] + list(groups.values())
    shapes = model.state_dict()
    missing, wrong = list(listed), []
    for names in expected:
        found = [k for n in names for k in (n, n.removeprefix(prefix)) if k in stored]
        if not found:
            missing.append(names[0])
        elif list(stored[found[0]]) != list(shapes[names[0]].shape):
            wrong.append(f"{found[0]} {stored[found[0]]} (expected {list(shapes[names[0]].shape)})")
    if missing or wrong:
        shown = [f"missing {', '.join(missing[:6])}"] if missing else []
        shown += [f"mis-shaped {', '.join(wrong[:6])}"] if wrong else []
        raise ValueError(f"the checkpoint {folder} is incomplete: {'; '.join(shown)}")


def check_skip_names(model: nn.Module, skip: list[str] | None) -> None:
    """Every ``modules_to_not_convert`` entry must match some module (else ``ValueError`` with the closest)."""
    names = [n for n, _ in model.named_modules() if n]
    for key in skip or []:
        if all(should_convert_module(n, [key]) for n in names):
            pool = sorted(set(names) | {n.rpartition(".")[2] for n in names})
            close = difflib.get_close_matches(key, pool, n=3, cutoff=0.3) or pool[:3]
            raise ValueError(
                f"FPxINTConfig.modules_to_not_convert: {key!r} matches no module of {type(model).__name__}; "
                f"closest module names: {', '.join(close)}"
            )


def resolve_compute_dtype(cfg: FPxINTConfig, load_dtype: torch.dtype) -> None:
    """When quantizing: record the dtype the checkpoint will run in on reload, unless the config sets one.

    float16 stays float16; anything else runs in bfloat16, the dtype of the fast paths (packed int4/int8 kernels
    on CPU) and of the weights' own precision: the codes are exact in it, and float32 activations gain little."""
    if cfg.compute_dtype is None:
        cfg.compute_dtype = "float16" if load_dtype == torch.float16 else "bfloat16"


def record_compute_dtype(folder: str, model: nn.Module) -> None:
    """Write the config's ``compute_dtype`` as ``config.json``'s ``dtype`` (what ``dtype="auto"`` loads in)."""
    cfg = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    dtype = getattr(cfg, "compute_dtype", None)
    path = os.path.join(folder, "config.json")
    if dtype not in COMPUTE_DTYPES or not os.path.isfile(path):
        return
    data = json.loads(Path(path).read_text())
    data["dtype"] = dtype
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
