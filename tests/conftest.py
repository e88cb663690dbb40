"""Shared fixtures: tiny seeded LLaMA / Qwen2 models built from a config (never downloaded).

Every model is small enough (hidden 64, 2 layers, vocab 128) that quantize-on-load, save and reload
take a fraction of a second on CPU, so the transformers integration can be tested end to end.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import fpxint_hf

# "llama": tied input/output embeddings; "llama_untied": separate lm_head; "qwen2": q/k/v biases, untied.
ARCHS = ("llama", "llama_untied", "qwen2")
VOCAB = 128


def tiny_config(arch: str, intermediate_size: int = 128):
    common = dict(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "llama_untied":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny arch {arch!r}")


def build_tiny_model(arch: str, seed: int = 0, intermediate_size: int = 128) -> nn.Module:
    """A seeded float32 model; linear biases (Qwen2's q/k/v) are made non-zero so they matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, intermediate_size))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _single_intra_op_thread():
    """Run torch ops single-threaded: on these tiny tensors OpenMP start-up/spin-wait dominates on a
    busy 2-core machine (``expand`` of a 128x64 weight: ~20 ms with 2 threads vs ~0.5 ms with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_fp_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: save a seeded tiny FP (float32) model under ``tmp_path`` and return its directory."""

    def make(arch: str, seed: int = 0, intermediate_size: int = 128) -> Path:
        out = tmp_path / f"fp-{arch}-{seed}-{intermediate_size}"
        if not out.exists():
            build_tiny_model(arch, seed, intermediate_size).save_pretrained(out)
        return out

    return make


@pytest.fixture(params=["llama", "qwen2"])
def fp_model_dir(request, make_fp_dir) -> Path:
    """A saved seeded tiny FP model (LLaMA with tied embeddings, or Qwen2 with q/k/v biases)."""
    return make_fp_dir(request.param)


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (2, 24), generator=g)


@pytest.fixture
def logits_of(input_ids) -> Callable[[nn.Module], torch.Tensor]:
    """``logits_of(model)``: the model's logits on a fixed batch of token ids."""

    @torch.no_grad()
    def run(model: nn.Module) -> torch.Tensor:
        return model(input_ids.to(model.device)).logits

    return run


@pytest.fixture
def load_fp() -> Callable[..., nn.Module]:
    def load(path, **kwargs) -> nn.Module:
        # float32 unless asked: a saved FP=xINT checkpoint would otherwise reload in its compute_dtype
        kwargs.setdefault("dtype", torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()

    return load


@pytest.fixture
def load_quantized() -> Callable[..., nn.Module]:
    """``load_quantized(dir, dtype=None, device_map=None, **config)``: quantize-on-load of an FP checkpoint."""

    def load(path, dtype=None, device_map=None, **config) -> nn.Module:
        kwargs = {"quantization_config": fpxint_hf.FPxINTConfig(**config)}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()

    return load


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def transformers_log():
    """Everything logged under the ``transformers`` logger during the test (its load reports included).

    transformers sets ``propagate = False`` on its root logger, so ``caplog`` (a root handler) misses it;
    this attaches a handler to that logger directly.
    """
    logger = logging.getLogger("transformers")
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


EVAL_DIR = Path(__file__).resolve().parents[1] / "eval"


@pytest.fixture(scope="session")
def eval_module() -> Callable[[str], ModuleType]:
    """``eval_module(name)``: import a module of ``eval/`` (the benchmark scripts live outside the package, so
    ``eval/`` is on ``sys.path`` only while it imports)."""

    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(EVAL_DIR))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(EVAL_DIR))

    return load
