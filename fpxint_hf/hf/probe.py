"""``act_proxy="probe"``: each linear layer's input energy ``E[x_j²]``, measured on the FP model itself fed random
token ids, with no data.

The first-term fit minimizes ``Σ_j a_j (w_j - ŵ_j)²`` (``fit.py``); with ``a_j = E[x_j²]`` that is the expected
squared error of the layer's output.  ``proxy.py`` guesses ``E[x_j²]`` from neighbouring weights; this module
measures it: the FP checkpoint runs ``tokens`` uniformly random token ids (``seed``; no text, no dataset), and a
hook on every ``nn.Linear`` accumulates the squared inputs.  What sets ``E[x_j²]`` in a trained decoder is mostly
the model, not the text: its massive-activation channels, the norms' gains, the attention sinks of the first
positions, which random ids trigger as well as prose (eval/results/qwen_diagnosis.md: on SmolLM2 the probe's
weighting gives the KL of an in-sample oracle measured on the benchmark text itself).

Cost: the FP model is built once more, on the CPU in the load dtype, before the quantized model loads (peak
memory: one FP copy), and runs ``tokens`` tokens; it is freed before the weights stream in.
"""

from __future__ import annotations

import copy
import gc
import logging

import torch

logger = logging.getLogger(__name__)

PROBE_TOKENS = 128
"""Random ids in one sequence.  SmolLM2 T=1: KL 0.083 with 128 (eval/results/qwen_diagnosis.md); a trial with 4
sequences of 128 gave 0.088, no better, and Qwen2.5-Coder 0.0545 against 0.0586 with 128."""
PROBE_SEED = 0


def _fp_model(config, checkpoint_files: list[str], dtype: torch.dtype) -> torch.nn.Module:
    """The FP model of ``config`` with the weights of the safetensors ``checkpoint_files`` (no quantization)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # parameters on meta (the files fill them), buffers (rotary inv_freq) computed
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
    model.load_state_dict(state, strict=False, assign=True)
    del state
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(cfg, "tie_word_embeddings", False) or getattr(
        cfg.get_text_config(), "tie_word_embeddings", False
    )
    if tied and out_emb is not None and out_emb.weight.is_meta:  # a tied lm_head is not in the file
        out_emb.weight = in_emb.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(
            f"act_proxy='probe' needs every weight of the FP model in its safetensors files; missing: "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )
    return model.eval()


@torch.no_grad()
def probe_second_moments(
    config,
    checkpoint_files: list[str],
    dtype: torch.dtype = torch.float32,
    tokens: int = PROBE_TOKENS,
    seed: int = PROBE_SEED,
) -> dict[str, torch.Tensor]:
    """``E[x_j²]`` (float32 ``[in_features]``) of the input of every ``nn.Linear`` but ``lm_head``, by module
    name, from one forward of the FP model over ``tokens`` random token ids (``torch.Generator`` seeded)."""
    files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
    if not files:
        raise ValueError("act_proxy='probe' needs the FP checkpoint as safetensors files; none were given")
    # transformers calls the quantizer inside its meta-device context: every tensor the probe creates, the
    # forward's own position ids and masks included, must be a real CPU tensor
    with torch.device("cpu"):
        return _probe(config, files, dtype, tokens, seed)


def _probe(config, files: list[str], dtype: torch.dtype, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    logger.info("act_proxy='probe': building the FP model (%s) from %d file(s)", dtype, len(files))
    model = _fp_model(config, files, dtype)
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)

        return add

    handles = [
        m.register_forward_pre_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    try:
        model(input_ids=ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        del model
        gc.collect()
    logger.info("act_proxy='probe': %d layers measured on %d random token ids", len(sums), tokens)
    return {name: s / tokens for name, s in sums.items()}


class ProbeProxy:
    """``importance(module_name)``: the probed ``E[x_j²]`` of that layer (``None`` for a layer not measured)."""

    def __init__(self, second_moments: dict[str, torch.Tensor]):
        self.second_moments = second_moments

    def importance(self, module_name: str) -> torch.Tensor | None:
        return self.second_moments.get(module_name)
