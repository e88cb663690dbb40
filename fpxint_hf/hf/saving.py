"""Crash-safe ``save_pretrained`` for FP=xINT models: the target directory is replaced as a whole, or not at all.

transformers writes config.json, then the weight files, straight into the target directory.  A save that
fails or is killed half-way leaves a directory with a new config.json and missing, truncated or (when it
overwrites an older sharded checkpoint) a mix of new and stale weight files, and a previous good checkpoint
there is destroyed.  ``install_atomic_save`` (called by the quantizer on every model it loads) gives that model
a ``save_pretrained`` that writes everything into a fresh sibling directory ``.<name>.fpxint-tmp-*`` and only
then moves it into place:

- no directory at the target yet: one ``rename`` (atomic on POSIX);
- a directory there: the files it holds that this save does not write (a tokenizer, a README, ...) are
  hard-linked (else copied) into the new directory, except the model weight files and indexes it supersedes
  (``model*.safetensors``, ``pytorch_model*.bin`` and their index of the same variant), then the old one is renamed
  aside, the new one renamed into place and the old one deleted.  A crash between those two renames leaves no
  directory at the target and the complete old one at ``.<name>.old-*`` (never a mixed one; ``atomic.py``).

A failed save deletes its temporary directory and re-raises; the target is untouched.  ``push_to_hub`` (which
saves into a temporary directory and uploads it) and ``save_pretrained(..., push_to_hub=True)`` keep working
(the repository name still defaults to the target's name).  Saves that are not atomic here fall through to
transformers unchanged: a non-main process or an initialised ``torch.distributed`` group (each rank would swap
its own directory), ``distributed_checkpoint=True``, or a target that is an existing file.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from ..atomic import fresh_dir, replace_dir
from .checkpoint import record_compute_dtype
from .config import QUANT_METHOD

logger = logging.getLogger(__name__)

# model weight files and indexes, with their variant (``save_pretrained(..., variant="fp16")``)
WEIGHT_FILE = re.compile(
    r"(?:model|pytorch_model)(?:\.(?P<v1>[\w-]+?))?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"(?:\.index(?:\.(?P<v2>[\w-]+))?\.json)?"
)
MARK = "_fpxint_atomic_save"


def install_atomic_save(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained`` crash-safe (idempotent); only this FP=xINT model is affected.

    The instance's class is swapped for a subclass (one per original class, same name and module) whose
    ``save_pretrained`` writes atomically: no process-wide patch of ``LlamaForCausalLM`` etc., and no
    instance attribute referencing the model (a reference cycle would keep a deleted model's memory until the
    garbage collector runs; a weak reference would break ``from_pretrained(...).save_pretrained(...)``).
    """
    if not getattr(type(model), MARK, False):
        model.__class__ = _atomic_class(type(model))  # type: ignore[arg-type]  # classes are hashable


@functools.cache
def _atomic_class(cls: Any) -> type:
    original = cls.save_pretrained

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_fpxint(self):
            return original(self, save_directory, *args, **kwargs)
        return atomic_save_pretrained(self, original, save_directory, *args, **kwargs)

    attrs = {
        "save_pretrained": save_pretrained,
        MARK: True,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    return type(cls.__name__, (cls,), attrs)


def _is_fpxint(model: torch.nn.Module) -> bool:
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return getattr(config, "quant_method", None) == QUANT_METHOD


def atomic_save_pretrained(model, original, save_directory, *args, **kwargs):
    """``original(model, save_directory, ...)`` written into a temporary sibling directory, then moved into place."""
    try:
        bound = inspect.signature(original).bind(model, save_directory, *args, **kwargs)
    except TypeError:
        return original(model, save_directory, *args, **kwargs)  # let transformers report the bad call
    options = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    if (
        not options.get("is_main_process", True)
        or options.get("distributed_checkpoint", False)
        or (torch.distributed.is_available() and torch.distributed.is_initialized())
        or os.path.isfile(save_directory)
    ):
        return original(model, save_directory, *args, **kwargs)

    target = os.path.realpath(os.fspath(save_directory))
    parent, name = os.path.split(target)
    if options.get("push_to_hub", False) and "repo_id" not in kwargs:
        # transformers' default: the name of the directory it is given (here the temporary one)
        kwargs["repo_id"] = os.path.basename(os.path.normpath(os.fspath(save_directory)))
    os.makedirs(parent, exist_ok=True)
    tmp = fresh_dir(parent, f".{name}.fpxint-tmp-")  # permissions as os.makedirs would give
    try:
        if os.path.isdir(target):
            shutil.copymode(target, tmp)
        with _dtype_recorded_before_upload(model):
            result = original(model, tmp, *args, **kwargs)
        record_compute_dtype(tmp, model)
        if os.path.isdir(target):
            _carry_over(target, tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


@contextlib.contextmanager
def _dtype_recorded_before_upload(model) -> Iterator[None]:
    """``save_pretrained(push_to_hub=True)`` uploads from inside transformers' save: write ``compute_dtype`` into
    the folder's config.json just before that upload, so the hub copy reloads in the same dtype as the local one."""
    upload = getattr(model, "_upload_modified_files", None)  # transformers' PushToHubMixin step
    if upload is None:
        yield
        return

    def recorded_then_upload(working_dir, *args, **kwargs):
        record_compute_dtype(working_dir, model)
        return upload(working_dir, *args, **kwargs)

    model._upload_modified_files = recorded_then_upload
    try:
        yield
    finally:
        del model._upload_modified_files


def _weights_variant(entry: str) -> tuple[bool, str | None]:
    """(is a model weight file or index, its variant)."""
    m = WEIGHT_FILE.fullmatch(entry)
    return (False, None) if m is None else (True, m["v1"] or m["v2"])


def _carry_over(old: str, new: str) -> None:
    """Link (or copy) into ``new`` every entry of ``old`` that ``new`` lacks, except the model weight files and
    indexes this save supersedes (those of the variant it wrote; transformers itself only deletes stale shards).
    A save that wrote no model weights (adapters only) supersedes none."""
    written = set(os.listdir(new))
    variants = {v for is_weights, v in map(_weights_variant, written) if is_weights}
    for entry in os.listdir(old):
        is_weights, variant = _weights_variant(entry)
        if entry in written or (is_weights and variant in variants):
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
