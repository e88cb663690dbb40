"""Serving FP=xINT checkpoints with vLLM: an out-of-tree quantization plugin (``quant_method: "fpxint"``).

Installed as the ``vllm.general_plugins`` entry point ``fpxint`` (see pyproject), so ``vllm serve DIR`` and
``vllm.LLM(DIR)`` load an fpxint checkpoint with no extra flag, also with ``tensor_parallel_size > 1`` (each
rank holds its share of the series, cut as vLLM cuts GPTQ: ``shards.py``, docs/serving-tp.md).  Nothing here
imports vLLM until vLLM calls :func:`register` (in every process it starts); the core package never needs vLLM.

Run-time settings (environment variables, read when the engine loads the model):

- ``FPXINT_VLLM_FORWARD``: overrides the checkpoint's ``forward_mode`` (the field transformers reads).  ``auto``
  (the default) and ``dense`` dequantize once after loading and run vLLM's own GEMM (the speed and memory of an
  unquantized model); ``int4`` keeps the packed codes and runs one CPU int4 kernel per layer (less memory), ``int8``
  (per-channel layers) collapses the terms into one int8 matmul, bfloat16 only; ``reference``/``terms`` run in
  transformers only and are served dense.  A layer the backend cannot run (or a fused layer of several pieces) is
  served dense; each layer records its path and the reason in ``layer.fpxint_path`` (``backends.ForwardPath``).
  See ``eval/results/vllm.md``.
- ``FPXINT_ACTIVE_TERMS``: serve only the first k terms of every layer (one checkpoint, several precisions).
"""

from __future__ import annotations

ENV_FORWARD = "FPXINT_VLLM_FORWARD"
ENV_ACTIVE_TERMS = "FPXINT_ACTIVE_TERMS"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers ``"fpxint"`` with vLLM (idempotent)."""
    from . import method  # noqa: F401  (the decorator registers the config class)
