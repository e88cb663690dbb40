"""Offline stand-ins for tests: a tiny byte-level BPE tokenizer and a tiny random LLaMA (no hub access)."""

from __future__ import annotations

import functools
from typing import Any

_CORPUS = (
    "The following are multiple choice questions (with answers) about abstract algebra.",
    "Question: What is the order of the group? A. 1 B. 2 C. 3 D. 4 Answer:",
    "def f(x):\n    return x * 2  # Python functions, classes, modules and the import system",
    "Anatomy studies the structure of the human body; history studies the past.",
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    return tok.to_str()


def tiny_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ~320 tokens) that encodes any text, built offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )


def tiny_llama(
    vocab_size: int,
    seed: int = 0,
    max_positions: int = 1024,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = True,
    init_std: float | None = 0.3,
    **token_ids: Any,
) -> Any:
    """A randomly initialised 2-layer ``LlamaForCausalLM`` (default: hidden 32, tied embeddings), float32, eval
    mode.  vLLM's CPU attention needs head_dim 64 (e.g. hidden 192 with 3 heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        **{"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0, **token_ids},
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    if init_std is None:  # transformers' own initialisation
        return model
    # The default init (std 0.02) gives near-uniform predictions; widen it so argmaxes are well defined.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    return model
