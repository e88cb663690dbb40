"""``act_proxy="probe"``: each linear layer's input statistics, measured on the FP model itself fed random token
ids, with no data, one decoder block in memory at a time.

The first-term fit minimizes ``Σ_j a_j (w_j - ŵ_j)²`` (``fit.py``); with ``a_j = E[x_j²]`` that is the expected
squared error of the layer's output.  ``proxy.py`` guesses ``E[x_j²]`` from neighbouring weights; this module
measures it: the FP checkpoint runs ``PROBE_TOKENS`` uniformly random token ids (seeded; no text, no dataset),
and a hook on every ``nn.Linear`` accumulates its inputs.  What sets ``E[x_j²]`` in a trained decoder is mostly
the model, not the text: its massive-activation channels, the norms' gains, the attention sinks of the first
positions, which random ids trigger as well as prose (docs/method.md).  With ``second_order`` the hook also
accumulates ``H = E[x xᵀ]``, which ``gptq.py`` uses for error feedback.

Streaming (``stream_blocks``): the model is built on the meta device; the random ids' embeddings are read from
the checkpoint row by row; every parameter outside the decoder blocks (final norm, rotary buffers) is loaded;
each block's parameters are read from the safetensors files just before the block runs and dropped after
``on_block`` has seen them.  Peak memory: one block in the load dtype, its ``H`` (one ``[in, in]`` float32 per
distinct input) and the hidden states of the probe tokens, never a second model.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PROBE_TOKENS = 128
"""Random ids per sequence: on SmolLM2 T=1 the KL of the weighting was 0.083 with one sequence of 128 and 0.088
with 4 of 128; Qwen2.5-Coder 0.0545 with 4 against 0.0586 with 1 (docs/benchmarks.md)."""
PROBE_SEQUENCES = 1
"""Sequences of ``PROBE_TOKENS`` for the diagonal ``E[x_j²]``."""
SECOND_ORDER_SEQUENCES = 8
"""Sequences of ``PROBE_TOKENS`` when ``H = E[x xᵀ]`` is measured too (more tokens: ``H`` has ``in²`` entries)."""
PROBE_SEED = 0


class ProbeUnavailable(ValueError):
    """The probe cannot run on this checkpoint (no safetensors files, no list of decoder blocks, weights the model
    names but the files do not hold): raised before any layer is measured, so the caller may fall back."""


@dataclass
class LayerStats:
    """One linear layer of the block the probe just ran: its FP weight and what it measured at its input."""

    weight: torch.Tensor  # [out, in], in the probe's dtype, as the checkpoint holds it
    second_moment: torch.Tensor  # float32 [in]: E[x_j²]
    hessian: (
        torch.Tensor | None
    )  # float32 [in, in]: E[x xᵀ] (second_order only; shared by layers with one input)


BlockCallback = Callable[[int, dict[str, LayerStats]], None]
"""``on_block(index, stats)``: called after block ``index`` ran, its FP parameters still loaded; ``stats`` by the
full module name of each linear layer in the block."""


def probe_ids(
    vocab_size: int, sequences: int, tokens: int = PROBE_TOKENS, seed: int = PROBE_SEED
) -> torch.Tensor:
    """The random token ids (int64 ``[sequences, tokens]``) the probe runs."""
    return torch.randint(0, vocab_size, (sequences, tokens), generator=torch.Generator().manual_seed(seed))


def probe_tokens(text_config: Any) -> int:
    """Ids per probe sequence: ``PROBE_TOKENS``, at most the model's ``max_position_embeddings`` (a learned
    position table, OPT's, has no row beyond them)."""
    return min(PROBE_TOKENS, getattr(text_config, "max_position_embeddings", None) or PROBE_TOKENS)


def checkpoint_index(checkpoint_files: list[str] | None) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of the checkpoint; refuses a checkpoint without safetensors files."""
    from safetensors import safe_open

    files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
    if not files:
        raise ProbeUnavailable(
            "act_proxy='probe' needs the FP checkpoint as safetensors files; none were given"
        )
    index: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), path))
    return index


class _Reader:
    """Reads named tensors of the checkpoint in ``dtype`` (floating point) and fills meta parameters with them."""

    def __init__(self, index: dict[str, str], dtype: torch.dtype):
        self.index, self.dtype = index, dtype

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.index[name], framework="pt") as f:
            t = f.get_tensor(name)
        return t.to(self.dtype, copy=True) if t.is_floating_point() else t.clone()

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a 2-D tensor (the embedding), read without loading the whole table."""
        from safetensors import safe_open

        with safe_open(self.index[name], framework="pt") as f:
            table = f.get_slice(name)
            rows = [table[int(i) : int(i) + 1] for i in ids.reshape(-1)]
        return torch.cat(rows).to(self.dtype).reshape(*ids.shape, -1)

    def check(self, module: nn.Module, prefix: str) -> None:
        """``ProbeUnavailable`` unless the checkpoint holds every parameter of ``module`` (named ``prefix`` + its
        name); a model whose weights transformers converts on load (fused MoE experts) fails here."""
        missing = [prefix + n for n, _ in module.named_parameters() if prefix + n not in self.index]
        if missing:
            raise ProbeUnavailable(
                f"act_proxy='probe' needs every weight of the FP model in its safetensors files under the model's "
                f"own names; missing: {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            )

    def fill(self, module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Load every meta parameter of ``module`` (named ``prefix`` + its name) from the checkpoint, except those
        whose name in ``module`` starts with one of ``skip``."""
        for name, p in list(module.named_parameters()):
            if p.is_meta and not name.startswith(skip):
                owner, _, leaf = name.rpartition(".")
                sub = module.get_submodule(owner) if owner else module
                sub._parameters[leaf] = nn.Parameter(self.tensor(prefix + name), requires_grad=False)


def _drop(module: nn.Module) -> None:
    """Put ``module``'s parameters back on the meta device (frees the block) and hand freed heap memory back to
    the system: glibc keeps freed blocks of a few MB in its heap, which made the peak grow block by block."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    _trim_heap()


def _trim_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The FP model of ``config`` with its parameters on the meta device and its buffers (rotary) computed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def decoder_blocks(base: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks of a base model: the first, outermost one with ``num_hidden_layers``
    entries (``layers`` in LLaMA/Qwen, ``decoder.layers`` in OPT), and its name in ``base``."""
    for name, child in base.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return name, child
    raise ProbeUnavailable(
        f"act_proxy='probe' found no list of {num_layers} decoder blocks in {type(base).__name__}"
    )


@torch.no_grad()
def stream_blocks(
    config,
    checkpoint_files: list[str] | None,
    on_block: BlockCallback,
    dtype: torch.dtype = torch.float32,
    sequences: int = PROBE_SEQUENCES,
    second_order: bool = False,
) -> None:
    """Run the probe's random ids through the FP checkpoint one decoder block at a time, calling ``on_block``
    after each block with the statistics of its linear layers (see the module docstring)."""
    index = checkpoint_index(checkpoint_files)
    # transformers calls the quantizer inside its meta-device context: every tensor made here, the forward's
    # own position ids and masks included, must be a real CPU tensor
    with torch.device("cpu"):
        _stream(config, _Reader(index, dtype), on_block, dtype, sequences, second_order)


def _stream(
    config, reader: _Reader, on_block: BlockCallback, dtype, sequences: int, second_order: bool
) -> None:
    model = _skeleton(config, dtype)
    prefix = model.base_model_prefix
    base: Any = model.base_model
    text = config.get_text_config()
    list_name, blocks = decoder_blocks(base, text.num_hidden_layers)
    block_prefix = f"{prefix}.{list_name}."
    embed = base.get_input_embeddings()
    embed_weight = next(f"{n}.weight" for n, m in base.named_modules() if m is embed)
    embed_name = f"{prefix}.{embed_weight}"
    reader.check(base, f"{prefix}.")  # before any block runs: a caller may still fall back
    # final norm, rotary or learned positions etc.: everything but the blocks and the embedding
    reader.fill(base, f"{prefix}.", skip=(f"{list_name}.", embed_weight))
    ids = probe_ids(text.vocab_size, sequences, probe_tokens(text))
    logger.info(
        "act_proxy='probe': %d x %d random ids through %d blocks (%s)", *ids.shape, len(blocks), dtype
    )
    sums: dict[str, list] = {}  # module name -> [Σx², Σxxᵀ or None, count] (each hook runs once)

    def record(name: str, shared: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acc = sums.setdefault(name, [0, None, 0])
            acc[0], acc[2] = acc[0] + x.pow(2).sum(0), acc[2] + x.shape[0]
            if second_order:  # layers that read the same input (q/k/v, gate/up) share one H
                key = args[0].data_ptr()  # the input is kept alive below, so its address is not reused
                if key not in shared:
                    shared[key] = (args[0], x.T @ x)
                acc[1] = shared[key][1]

        return hook

    def load(i: int):
        def pre(block, _args, _kwargs):
            reader.fill(block, f"{block_prefix}{i}.")

        return pre

    def done(i: int, linears: dict[str, nn.Linear]):
        def post(block, _args, _kwargs, _output):
            stats = {
                name: LayerStats(linears[name].weight, s[0] / s[2], None if s[1] is None else s[1] / s[2])
                for name, s in ((n, sums.pop(n)) for n in linears)
            }
            shared_h.clear()
            on_block(i, stats)
            _drop(block)

        return post

    shared_h: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(blocks):
        linears = {f"{block_prefix}{i}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        handles += [m.register_forward_pre_hook(record(n, shared_h)) for n, m in linears.items()]
        handles.append(block.register_forward_pre_hook(load(i), with_kwargs=True))
        handles.append(block.register_forward_hook(done(i, linears), with_kwargs=True))
    try:  # all sequences in one batch: every block is read once
        base(inputs_embeds=reader.rows(embed_name, ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        del model
        gc.collect()


def probe_second_moments(
    config,
    checkpoint_files: list[str] | None,
    dtype: torch.dtype = torch.float32,
    sequences: int = PROBE_SEQUENCES,
) -> dict[str, torch.Tensor]:
    """``E[x_j²]`` (float32 ``[in_features]``) of the input of every linear layer of the decoder blocks, by
    module name (``stream_blocks`` without ``H``)."""
    out: dict[str, torch.Tensor] = {}

    def keep(_i: int, stats: dict[str, LayerStats]) -> None:
        out.update({name: s.second_moment for name, s in stats.items()})

    stream_blocks(config, checkpoint_files, keep, dtype, sequences)
    logger.info("act_proxy='probe': %d layers measured", len(out))
    return out
