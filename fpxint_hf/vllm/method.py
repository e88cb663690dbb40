"""vLLM ``QuantizationConfig`` and ``LinearMethodBase`` for FP=xINT checkpoints (imported by ``register``).

The layer holds the checkpoint's tensors under their own names as vLLM parameters, so vLLM's loaders shard and
fuse them (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) like any weight:

- ``codes`` ``[T, out, P]`` (``[out, ΣP_i]`` for mixed widths): output rows on dim 1 (dim 0);
- ``scale``/``zero`` ``[out, G]``, ``outlier_idx``/``outlier_val`` ``[out, K]``: output rows on dim 0;
- ``terms_used``: one entry per fused piece.

With ``tensor_parallel_size > 1`` each rank creates only its share (``shards.py``: output rows of column-parallel
layers, whole groups of inputs of row-parallel ones) and rebuilds the ``Expansion`` of that share.

After loading, every piece is turned back into an ``Expansion`` with ``fpxint_hf``'s own code (the same group-size
rule, the same series rule) and either dequantized once (``dense``; input transforms folded into the weight) or
re-packed for the int4/int8 kernel (``col_scale``/``rot_signs`` then transform the input first, as in
``FPxINTLinear.input_transform``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)
from vllm.platforms import current_platform

from .. import backends
from ..bias import bias_of
from ..budget import FUSED
from ..expansion import (
    Expansion,
    normalize_bits,
    original_weight,
    outlier_budget,
    resolve_group_size,
)
from ..layout import TensorSpec, check_tensors, layer_tensors
from ..packing import packed_size, unpack_series
from ..settings import check_quantization_config, read_quantization_config
from ..transform import transform_input
from . import ENV_ACTIVE_TERMS, ENV_FORWARD
from .shards import InputShard, SegmentedCodesParameter, cut_inputs, input_shard, shard_specs

FORWARDS = backends.KERNEL_MODES  # dense runs on vLLM's own GEMM; the others on the backends registry


@register_quantization_config("fpxint")
class FPxINTvLLMConfig(QuantizationConfig):
    """The ``quantization_config`` of an fpxint checkpoint, as vLLM sees it."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        fields = read_quantization_config(config)  # the same reader (and format defaults) as FPxINTConfig
        check_quantization_config("quantization_config", fields)  # and the same check
        if fields["act_bits"] is not None:
            raise ValueError(
                f"quantization_config.act_bits={fields['act_bits']!r} is not supported by the FP=xINT vLLM plugin: "
                "it serves weight-only (A16) checkpoints; the activation series runs in transformers only. The "
                "stored weights do not depend on it: set act_bits to null in config.json to serve them as A16"
            )
        self.terms = int(fields["terms"])
        self.term_bits = normalize_bits(fields["bits"], self.terms)
        self.group_size = fields["group_size"]
        self.symmetric = bool(fields["symmetric"])
        self.outlier_fraction = float(fields["outlier_fraction"])
        self.series = fields["series"]
        self.dual_scale, self.rotation = bool(fields["dual_scale"]), fields["rotation"]  # absent: off
        self.zero_bits = int(fields["zero_bits"])  # absent: 16 (a float16 bias)
        self.layer_terms = fields["layer_terms"] or {}
        self.layer_group_size = fields["layer_group_size"] or {}
        names = fields["quantized_modules"]
        self.quantized = None if names is None else set(names)  # format 2: converted layers by name
        self.skip = list(fields["modules_to_not_convert"] or [])
        self.forward = os.environ.get(ENV_FORWARD, "dense")
        if self.forward not in FORWARDS:
            raise ValueError(f"{ENV_FORWARD}={self.forward!r} is not one of {FORWARDS}")
        active = os.environ.get(ENV_ACTIVE_TERMS, "")
        self.active_terms = int(active) if active else None
        if self.active_terms is not None and not 1 <= self.active_terms <= self.terms:
            raise ValueError(f"{ENV_ACTIVE_TERMS}={active} is outside 1..{self.terms} (the terms stored)")

    def get_name(self) -> str:
        return "fpxint"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # no GPU capability needed (CPU)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FPxINTvLLMConfig:
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase) or prefix.endswith("lm_head"):
            return None
        leaf = prefix.rpartition(".")[2]
        pieces = [prefix[: -len(leaf)] + p for p in FUSED.get(leaf, (leaf,))]
        skipped = [p for p in pieces if not self.converted(p)]
        if skipped and len(skipped) < len(pieces):
            raise ValueError(
                f"{prefix}: {skipped} are kept in full precision but fused with quantized pieces"
            )
        if skipped:
            return UnquantizedLinearMethod()
        terms = {self.layer_terms.get(p, self.terms) for p in pieces}
        if len(terms) > 1:
            raise ValueError(
                f"{prefix}: its fused pieces {pieces} store different numbers of terms {sorted(terms)}"
            )
        sizes = {self.layer_group_size.get(p) for p in pieces}
        if len(sizes) > 1:
            raise ValueError(
                f"{prefix}: its fused pieces {pieces} have different group sizes {sorted(map(str, sizes))}"
            )
        return FPxINTvLLMLinearMethod(self, prefix, terms.pop(), sizes.pop())

    def converted(self, name: str) -> bool:
        """Whether layer ``name`` holds FP=xINT tensors: listed in ``quantized_modules`` (format 2), else not
        matched by ``modules_to_not_convert`` under transformers' own rule (what converted it when quantizing)."""
        if self.quantized is not None:
            return name in self.quantized
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, self.skip)


@register_weight_loader_v2_supported_method
class FPxINTvLLMLinearMethod(LinearMethodBase):
    """Creates the FP=xINT tensors of one (possibly fused) linear layer and computes it."""

    def __init__(self, config: FPxINTvLLMConfig, prefix: str, terms: int, group_size: int | None = None):
        self.config, self.prefix, self.terms = config, prefix, terms
        self.group_size = config.group_size if group_size is None else group_size  # as saved, else resolved
        self.term_bits = config.term_bits[:terms]

    def create_weights(
        self,
        layer: Any,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        loader = extra_weight_attrs["weight_loader"]
        out, n_in = sum(output_partition_sizes), input_size  # output rows of this rank, inputs of the layer
        gs = resolve_group_size(n_in, self.group_size)
        shard = input_shard(
            self.prefix,
            getattr(layer, "tp_rank", 0),
            n_in,
            input_size_per_partition,
            gs,
            self.term_bits,
            self.config.rotation,
        )
        k = outlier_budget(n_in, self.config.outlier_fraction)
        pieces = len(output_partition_sizes)
        full = self.layout(out, n_in, gs, k, pieces)
        local = self.layout(out, shard.size, shard.local_group_size, k, pieces) if shard.count > 1 else full
        # the tensors FPxINTLinear stores, as vLLM parameters of their kind (this rank's share: shards.py)
        for name, spec in shard_specs(full, local, shard).items():
            data = torch.empty(spec.shape, dtype=spec.dtype)
            layer.register_parameter(name, _parameter(spec, data, loader, self.segments(name, shard)))
        layer.fpxint_layout = (tuple(output_partition_sizes), shard, params_dtype)

    def layout(self, out: int, n_in: int, gs: int, k: int, pieces: int) -> dict[str, TensorSpec]:
        """The tensors of this (fused) layer: ``layout.layer_tensors`` with the config's input transforms."""
        c = self.config
        return layer_tensors(
            self.term_bits,
            out,
            n_in,
            gs,
            c.symmetric,
            k,
            pieces,
            dual_scale=c.dual_scale,
            rotation=c.rotation,
            zero_bits=c.zero_bits,
        )

    def segments(self, name: str, shard: InputShard) -> tuple[int, ...] | None:
        """Bytes of each term's packed row in mixed-width codes of a row-parallel layer (cut term by term)."""
        if name != "codes" or shard.count == 1 or len(set(self.term_bits)) == 1:
            return None
        return tuple(packed_size(shard.in_features, b) for b in self.term_bits)

    def bias(self, tensors: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """float16 bias ``[rows, G]`` of an asymmetric layer (the value of its int8 codes with ``zero_bits=8``)."""
        return bias_of(
            tensors["zero"][rows], tensors["scale"][rows], self.term_bits[0], self.config.zero_bits
        )

    def expansions(
        self, tensors: dict[str, torch.Tensor], sizes: tuple[int, ...], shard: InputShard
    ) -> list[Expansion]:
        """One ``Expansion`` per fused piece, rebuilt from the loaded tensors (this rank's inputs: ``shard``)."""
        codes = unpack_series(tensors["codes"], self.term_bits, shard.size)
        c = self.config
        out, start = [], 0
        for i, rows in enumerate(sizes):
            sl = slice(start, start + rows)
            idx, val = tensors.get("outlier_idx"), tensors.get("outlier_val")
            out.append(
                Expansion(
                    codes=codes[:, sl],
                    scale=tensors["scale"][sl],
                    zero=None if c.symmetric else self.bias(tensors, sl),
                    outlier_idx=torch.zeros(rows, 0, dtype=torch.int32) if idx is None else idx[sl].int(),
                    outlier_val=torch.zeros(rows, 0, dtype=torch.float16) if val is None else val[sl],
                    terms_used=int(tensors["terms_used"][i]),  # checked by check_tensors
                    term_bits=self.term_bits,
                    group_size=shard.local_group_size,
                    series=c.series,
                    col_scale=tensors["col_scale"][i] if c.dual_scale else None,
                    rot_signs=tensors["rot_signs"][i] if c.rotation else None,
                    zero_bits=16 if c.symmetric else c.zero_bits,
                )
            )
            start += rows
        return out

    def loaded_tensors(self, layer: Any) -> dict[str, torch.Tensor]:
        """The layer's loaded tensors, checked (``layout.check_tensors``; outlier columns against all inputs, the
        codes against this rank's), with the outliers and input transforms cut to this rank's inputs."""
        sizes, shard, _ = layer.fpxint_layout
        k = outlier_budget(shard.in_features, self.config.outlier_fraction)
        names = self.layout(sum(sizes), shard.in_features, shard.group_size, k, len(sizes))
        tensors = {name: getattr(layer, name).data for name in names}
        rules = dict(terms=self.terms, term_bits=self.term_bits, series=self.config.series)
        rest = {n: t for n, t in tensors.items() if n != "codes"}
        problems = check_tensors(self.prefix, rest, in_features=shard.in_features, **rules)
        problems += check_tensors(self.prefix, {"codes": tensors["codes"]}, in_features=shard.size, **rules)
        if problems:
            raise ValueError(
                f"FP=xINT checkpoint does not match its quantization_config: {'; '.join(problems)}"
            )
        return cut_inputs(tensors, shard)

    def process_weights_after_loading(self, layer: Any) -> None:
        sizes, shard, dtype = layer.fpxint_layout
        parts = self.expansions(self.loaded_tensors(layer), sizes, shard)
        active = self.config.active_terms
        ks = [e.terms_used if active is None else min(active, e.terms_used) for e in parts]
        layer.fpxint_prepared = None
        mode = self.config.forward
        if mode != "dense" and len(set(ks)) == 1 and len(parts) == 1:
            e, k = parts[0], ks[0]
            layer_info = dict(bits=e.term_bits[:k], group_size=e.group_size, in_features=e.shape[1], terms=k)
            if backends.supported(mode, **layer_info, series=e.series, device="cpu", dtype=torch.bfloat16):
                layer.fpxint_prepared = backends.prepare(mode, e, k, torch.bfloat16)
                layer.fpxint_transform = (e.col_scale, e.rot_signs)  # applied to x before the kernel
        if layer.fpxint_prepared is None:
            weight = torch.cat([original_weight(e, k) for e, k in zip(parts, ks, strict=True)])
            for name in ("codes", "scale", "zero", "outlier_idx", "outlier_val", "col_scale", "rot_signs"):
                if hasattr(layer, name):
                    delattr(layer, name)  # dense: the packed tensors are no longer needed
            # hand the dense weight to vLLM's own CPU GEMM (oneDNN, pre-packed), as for an unquantized layer
            layer.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
            layer.fpxint_prepared = "dense"
            if current_platform.is_cpu():
                dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            else:
                layer.cpu_linear = torch.nn.functional.linear

    def apply(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        prepared = layer.fpxint_prepared
        if not isinstance(prepared, str):  # a backend's prepared weights (bfloat16 kernels), not "dense"
            x_t = transform_input(x.float(), *layer.fpxint_transform)
            y = backends.kernel_linear(x_t.to(torch.bfloat16), prepared).to(x.dtype)
            return y if bias is None else y + bias
        return layer.cpu_linear(x, layer.weight, bias)


_PARAMETERS = {  # how vLLM shards and fuses each kind of tensor (layout.KINDS)
    "codes": ModelWeightParameter,
    "group": GroupQuantScaleParameter,
    "row": ChannelQuantScaleParameter,
    "piece": PerTensorScaleParameter,
}


def _parameter(
    spec: TensorSpec, data: torch.Tensor, loader: Any, segments: tuple[int, ...] | None = None
) -> BasevLLMParameter:
    """The vLLM parameter holding a tensor of ``spec`` (its output and input dims as vLLM's loaders expect);
    ``segments``: mixed-width codes of a row-parallel layer, cut term by term (``shards``)."""
    cls = _PARAMETERS[spec.kind]
    dims: dict[str, int] = {}
    if spec.kind in ("codes", "group"):
        dims = {"output_dim": spec.output_dim or 0, "input_dim": spec.input_dim or 0}
    elif spec.kind == "row":
        dims = {"output_dim": spec.output_dim or 0}
    if segments is not None:
        return SegmentedCodesParameter(segments=segments, data=data, weight_loader=loader, **dims)
    return cls(data=data, weight_loader=loader, **dims)


__all__ = ["BasevLLMParameter", "FPxINTvLLMConfig", "FPxINTvLLMLinearMethod"]
