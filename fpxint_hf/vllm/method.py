"""vLLM ``QuantizationConfig`` and ``LinearMethodBase`` for FP=xINT checkpoints (imported by ``register``).

The layer holds the checkpoint's tensors under their own names as vLLM parameters, so vLLM's loaders shard and
fuse them (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) like any weight:

- ``codes`` ``[T, out, P]`` (``[out, ΣP_i]`` for mixed widths): output rows on dim 1 (dim 0);
- ``scale``/``zero`` ``[out, G]``, ``outlier_idx``/``outlier_val`` ``[out, K]``: output rows on dim 0;
- ``terms_used``: one entry per fused piece.

With ``tensor_parallel_size > 1`` each rank creates only its share (``shards.py``: output rows of column-parallel
layers, whole groups of inputs of row-parallel ones) and rebuilds the series of that share.

After loading, every piece is one ``series.FPxINTSeries`` (the same object, group-size rule and series rule as
``FPxINTLinear``), either dequantized once (``dense``; input transforms folded into the weight) or prepared for the
int4/int8 kernel (``col_scale``/``rot_signs`` then transform the input first, as in ``FPxINTLinear.input_transform``).
The path comes from the checkpoint's ``forward_mode`` (``FPXINT_VLLM_FORWARD`` overrides it) through the same
backends registry (``backends.choose_path``); it and its reason are recorded on the layer (``fpxint_path``).
"""

from __future__ import annotations

import dataclasses
import logging
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
from ..budget import FUSED
from ..layout import TensorSpec, check_tensors
from ..packing import packed_size
from ..series import FPxINTSeries, SeriesSpec
from ..settings import SETTING_NAMES, ExpansionSettings, check_quantization_config, read_quantization_config
from ..transform import transform_input
from . import ENV_ACTIVE_TERMS, ENV_FORWARD
from .shards import InputShard, SegmentedCodesParameter, cut_inputs, input_shard, shard_specs

logger = logging.getLogger(__name__)
FORWARDS = (*backends.KERNEL_MODES, "auto", "reference", "terms")  # transformers' forward modes (linear.py)
VLLM_AUTO: tuple[str, ...] = ()
"""The packed kernels ``auto`` tries under vLLM: none; dense runs on vLLM's own GEMM (oneDNN, the weight dequantized
once), as fast as int4 here (eval/results/vllm.md) and token-equal to an unquantized model's path."""


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
        self.settings = ExpansionSettings(**{name: fields[name] for name in SETTING_NAMES})
        self.terms = self.settings.terms
        self.layer_terms = fields["layer_terms"] or {}
        self.layer_group_size = fields["layer_group_size"] or {}
        names = fields["quantized_modules"]
        self.quantized = None if names is None else set(names)  # format 2: converted layers by name
        self.skip = list(fields["modules_to_not_convert"] or [])
        # the checkpoint's forward_mode, as in transformers; the environment variable overrides it
        self.forward = os.environ.get(ENV_FORWARD) or fields["forward_mode"]
        if self.forward not in FORWARDS:
            source = ENV_FORWARD if os.environ.get(ENV_FORWARD) else "quantization_config.forward_mode"
            raise ValueError(f"{source}={self.forward!r} is not one of {FORWARDS}")
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
        self.group_size = group_size  # as recorded in layer_group_size; None: resolved from the config's
        full = config.settings
        bits = full.bits if isinstance(full.bits, int) else full.term_bits[:terms]
        self.settings = dataclasses.replace(full, terms=terms, bits=bits)
        self.term_bits = self.settings.term_bits

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
        spec = SeriesSpec.for_layer(
            self.settings, out, n_in, self.group_size
        )  # its group size, resolved once
        shard = input_shard(
            self.prefix,
            getattr(layer, "tp_rank", 0),
            n_in,
            input_size_per_partition,
            spec.group_size,
            self.term_bits,
            self.settings.rotation,
        )
        pieces = len(output_partition_sizes)
        local = dataclasses.replace(spec, in_features=shard.size, group_size=shard.local_group_size)
        full_layout = spec.layout(pieces)
        local_layout = local.layout(pieces) if shard.count > 1 else full_layout
        # the tensors FPxINTLinear stores, as vLLM parameters of their kind (this rank's share: shards.py)
        for name, t_spec in shard_specs(full_layout, local_layout, shard).items():
            data = torch.empty(t_spec.shape, dtype=t_spec.dtype)
            layer.register_parameter(name, _parameter(t_spec, data, loader, self.segments(name, shard)))
        layer.fpxint_layout = (tuple(output_partition_sizes), shard, params_dtype, spec)

    def segments(self, name: str, shard: InputShard) -> tuple[int, ...] | None:
        """Bytes of each term's packed row in mixed-width codes of a row-parallel layer (cut term by term)."""
        if name != "codes" or shard.count == 1 or len(set(self.term_bits)) == 1:
            return None
        return tuple(packed_size(shard.in_features, b) for b in self.term_bits)

    def series(
        self, tensors: dict[str, torch.Tensor], sizes: tuple[int, ...], spec: SeriesSpec, shard: InputShard
    ) -> list[FPxINTSeries]:
        """One ``FPxINTSeries`` per fused piece of the loaded tensors (``sizes``: its rows; this rank's inputs:
        ``shard``)."""
        out, start = [], 0
        for i, rows in enumerate(sizes):
            piece = dataclasses.replace(
                spec, out_features=rows, in_features=shard.size, group_size=shard.local_group_size
            )
            state = {}
            for name, t_spec in piece.layout().items():
                t = tensors[name]
                if t_spec.kind == "piece":  # terms_used, col_scale, rot_signs: one row a piece
                    state[name] = t[i : i + 1]
                else:  # codes (rows on dim 1, or 0 for mixed widths), scale, zero, outliers (rows on dim 0)
                    state[name] = t.narrow(t_spec.output_dim or 0, start, rows)
            out.append(FPxINTSeries.from_state(piece, state))
            start += rows
        return out

    def loaded_tensors(self, layer: Any) -> dict[str, torch.Tensor]:
        """The layer's loaded tensors, checked (``layout.check_tensors``; outlier columns against all inputs, the
        codes against this rank's), with the outliers and input transforms cut to this rank's inputs."""
        sizes, shard, _, spec = layer.fpxint_layout
        tensors = {name: getattr(layer, name).data for name in spec.layout(len(sizes))}
        rules: dict[str, Any] = dict(terms=self.terms, term_bits=self.term_bits, series=self.settings.series)
        rest = {n: t for n, t in tensors.items() if n != "codes"}
        problems = check_tensors(self.prefix, rest, in_features=shard.in_features, **rules)
        problems += check_tensors(self.prefix, {"codes": tensors["codes"]}, in_features=shard.size, **rules)
        if problems:
            raise ValueError(
                f"FP=xINT checkpoint does not match its quantization_config: {'; '.join(problems)}"
            )
        return cut_inputs(tensors, shard)

    def choose_path(self, parts: list[FPxINTSeries], ks: list[int]) -> backends.ForwardPath:
        """The path this layer is served by (``backends.choose_path``, with vLLM's ``auto``: ``VLLM_AUTO``); a
        kernel asked for that cannot run it leaves it ``dense``, the reason recorded."""
        mode = self.config.forward
        if mode in ("reference", "terms"):
            return backends.ForwardPath(
                "dense", f"forward_mode={mode!r} runs in FPxINTLinear only; vLLM: dense"
            )
        if mode != "dense" and (len(parts) > 1 or len(set(ks)) > 1):
            why = f"a fused layer of {len(parts)} pieces (the kernels run one series)"
            return backends.ForwardPath("dense", why, ((mode, why),) if mode != "auto" else ())
        s, k = parts[0], ks[0]
        q = backends.LayerQuery(
            s.spec.term_bits[:k],
            k,
            s.spec.group_size,
            s.spec.in_features,
            s.spec.settings.series,
            "cpu",
            torch.bfloat16,
        )
        if mode == "auto":
            return backends.choose_path("auto", q, VLLM_AUTO)
        ok, why = backends.backend(mode).can_implement(q)
        if not ok:
            return backends.ForwardPath("dense", f"{mode} cannot run this layer", ((mode, why),))
        return backends.ForwardPath(mode, f"forward_mode (or {ENV_FORWARD}) asks for it")

    def process_weights_after_loading(self, layer: Any) -> None:
        sizes, shard, dtype, spec = layer.fpxint_layout
        parts = self.series(self.loaded_tensors(layer), sizes, spec, shard)
        ks = [s.active(self.config.active_terms) for s in parts]
        layer.fpxint_path = path = self.choose_path(parts, ks)
        logger.debug("FP=xINT %s: %s", self.prefix, path)
        if path.name != "dense":
            s = parts[0]
            layer.fpxint_prepared = s.prepare(path.name, torch.bfloat16, "cpu", ks[0])
            t = s.tensors  # the input transforms, applied to x before the kernel
            layer.fpxint_transform = tuple(t[n][0] if n in t else None for n in ("col_scale", "rot_signs"))
            return
        weight = torch.cat([s.dequantize(k) for s, k in zip(parts, ks, strict=True)])
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
