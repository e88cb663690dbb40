"""Tensor-parallel shards of an FP=xINT layer in vLLM, cut the way vLLM cuts GPTQ/AWQ (``auto_gptq.py``).

- Column-parallel layers (``qkv_proj``, ``gate_up_proj``) split their output rows: every tensor with an output
  dim (``layout.TensorSpec.output_dim``: codes, scale, zero, outliers) is narrowed by vLLM's own loaders, and
  the per-piece tensors (``terms_used``, the input transforms) stay whole, as with ``tensor_parallel_size=1``.
- Row-parallel layers (``o_proj``, ``down_proj``) split their inputs.  Each rank loads the packed codes of its
  inputs and the scale/zero of its groups, so a group must not straddle two ranks (refused when it would); a
  per-channel scale/zero is repeated on every rank, as GPTQ's channel-wise scales
  (``marlin_repeat_scales_on_all_ranks``).  The outliers (``K`` per row) and the input transforms (one row of
  ``in``) are loaded whole and cut to the rank's columns after loading (``cut_inputs``); the rank computes
  ``W[:, shard] · x[shard]`` and vLLM adds the ranks' partial sums.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from vllm.model_executor.parameter import ModelWeightParameter

from ..layout import TensorSpec
from ..packing import packed_size
from ..rotation import hadamard_block

SHARDED = ("codes", "scale", "zero")  # the tensors a row-parallel rank holds only its inputs of


@dataclass(frozen=True)
class InputShard:
    """The inputs of one rank of a (possibly) row-parallel layer: ``count`` ranks of ``size`` columns each."""

    rank: int
    count: int
    in_features: int  # of the whole layer (what the checkpoint stores)
    group_size: int  # of the whole layer, resolved (``in_features``: one group per row)

    @property
    def size(self) -> int:
        return self.in_features // self.count

    @property
    def start(self) -> int:
        return self.rank * self.size

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    @property
    def local_group_size(self) -> int:
        """The group size of this rank's slice (per channel: the whole slice, the same scale on every rank)."""
        return self.size if self.per_channel else self.group_size


def input_shard(
    prefix: str,
    rank: int,
    in_features: int,
    in_per_rank: int,
    group_size: int,
    term_bits: tuple[int, ...],
    rotation: str | None,
) -> InputShard:
    """The ``InputShard`` of a layer whose ``in_features`` inputs vLLM gives ``in_per_rank`` per rank; raises
    ``ValueError`` naming the layer, its in_features, group size and TP size where FP=xINT's tensors cannot be
    cut there (a group, a packed byte or a Hadamard block across two ranks)."""
    count = in_features // in_per_rank if in_per_rank else 0
    if count < 1 or count * in_per_rank != in_features:
        raise ValueError(f"{prefix}: {in_per_rank} inputs per rank do not divide in_features={in_features}")
    shard = InputShard(rank if count > 1 else 0, count, in_features, group_size)
    if count == 1:
        return shard
    where = (
        f"{prefix}: in_features={in_features} split over tensor_parallel_size={count} "
        f"({in_per_rank} inputs per rank)"
    )
    if not shard.per_channel and in_per_rank % group_size:
        raise ValueError(
            f"{where} with group_size={group_size}: a group would straddle two ranks. Serve with a "
            f"tensor_parallel_size that leaves a multiple of {group_size} inputs per rank, or quantize with "
            f"a group size dividing {in_per_rank}"
        )
    for bits in sorted(set(term_bits)):
        if (in_per_rank * bits) % 8 or (bits == 3 and in_per_rank % 8):
            raise ValueError(
                f"{where} with group_size={group_size}: the {bits}-bit codes of one rank do not end on a "
                f"byte boundary (the packed codes cannot be split there)"
            )
        if packed_size(in_per_rank, bits) * count != packed_size(in_features, bits):
            raise ValueError(f"{where}: the packed {bits}-bit codes do not split evenly")
    if rotation is not None and hadamard_block(in_per_rank) != hadamard_block(in_features):
        raise ValueError(
            f"{where} with group_size={group_size}: its Hadamard blocks of {hadamard_block(in_features)} "
            f"inputs would straddle two ranks"
        )
    return shard


def shard_specs(full: dict[str, TensorSpec], local: dict[str, TensorSpec], shard: InputShard) -> dict:
    """What a rank creates: ``full`` (the layer's tensors for all its inputs), with the codes, scale and zero of
    ``local`` (the same layer for the rank's inputs) when its inputs are split.  A per-channel scale/zero is
    repeated on every rank: it keeps its output dim only, so vLLM copies it whole."""
    if shard.count == 1:
        return full
    specs = dict(full)
    for name in SHARDED:
        if name in specs:
            spec = local[name]
            if name != "codes" and shard.per_channel:
                spec = replace(spec, kind="row", input_dim=None)
            specs[name] = spec
    return specs


def cut_inputs(tensors: dict[str, torch.Tensor], shard: InputShard) -> dict[str, torch.Tensor]:
    """The loaded tensors with the outliers and input transforms cut to the rank's columns: an outlier of another
    rank becomes an unused slot (column 0, value 0: ``saturation.sparse_matrix`` adds nothing there)."""
    if shard.count == 1:
        return tensors
    out = dict(tensors)
    lo, hi = shard.start, shard.start + shard.size
    if "outlier_idx" in out:
        idx, val = out["outlier_idx"], out["outlier_val"]
        mine = (idx >= lo) & (idx < hi)
        out["outlier_idx"] = torch.where(mine, idx - lo, torch.zeros_like(idx))
        out["outlier_val"] = torch.where(mine, val, torch.zeros_like(val))
    for name in ("col_scale", "rot_signs"):
        if name in out:
            out[name] = out[name][:, lo:hi]
    return out


class SegmentedCodesParameter(ModelWeightParameter):
    """Mixed-width codes ``[out, Σ_i P_i]`` (``packing.series_shape``): each term's packed row is cut on its own
    in a row-parallel layer (vLLM's ``ModelWeightParameter`` would cut the concatenation as one row)."""

    def __init__(self, segments: tuple[int, ...], **kwargs):
        self._segments = segments  # bytes of each term's packed row, all inputs
        super().__init__(**kwargs)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        parts = []
        for part in torch.split(loaded_weight, list(self._segments), dim=self.input_dim):
            n = part.shape[self.input_dim] // self.tp_size
            parts.append(part.narrow(self.input_dim, self.tp_rank * n, n))
        local = torch.cat(parts, dim=self.input_dim)
        if local.shape != self.data.shape:
            raise ValueError(f"codes shard {tuple(local.shape)} != parameter {tuple(self.data.shape)}")
        self.data.copy_(local)
