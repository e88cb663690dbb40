"""Export an fpxint checkpoint whose series is one uniform grid to compressed-tensors' ``pack-quantized`` format.

The format (https://github.com/vllm-project/compressed-tensors) stores, per group of ``group_size`` inputs, signed
``num_bits``-bit codes ``q`` packed into int32, a scale and (asymmetric) a zero point, all integers:
``w = (q - zp) · scale``.  vLLM (``CompressedTensorsWNA16``: Marlin/Machete kernels on the GPU), SGLang and
transformers (``quant_method: compressed-tensors``) load it.  One FP=xINT term holds exactly that grid when its
zero is an integer zero point (``zero_bits`` equal to the first term's width, ``bias.py`` Eq. Zi) or when it is
symmetric: with the first term's offset ``h = 2^(X-1)``,

    w = (Q + h - h) · scale_1 + (h - z) · scale_1 = ((Q + h - h) - (z - h)) · scale_1,   zp = z - h

where ``Q + h`` is the stored unsigned code, so ``q = code - h`` and ``zp = z - h`` (symmetric: ``zp = 0``).

What the format cannot hold is refused, naming the layer and the setting: float zeros (``zero_bits`` 16 or 8),
more than one term (a nested series of T terms is one uniform grid of ΣX_i bits, but its mid-rise later terms put
that grid's zero half a step off every whole step: no integer zero point reproduces it; 4+4 is therefore not
exported as 8-bit), input transforms (``dual_scale``, ``rotation``), saturated outliers ``M_sa``, activation
series (``act_bits``).  Layers of different group sizes go to separate config groups.

The format is written by the package's own compressor (``ModelCompressor`` / ``PackedQuantizationCompressor``):
the dense model is given the dequantized weights and our scales and zero points, the compressor quantizes and
packs them, and the packed codes are checked to equal ours before anything is saved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bias import zero_point
from ..linear import FPxINTLinear
from ..packing import unpack_series

FORMATS = ("compressed-tensors",)
PACK_BITS = (2, 3, 4, 8)  # first-term widths fpxint stores that pack-quantized holds (it takes 1..8)


def layer_problems(name: str, m: FPxINTLinear) -> list[str]:
    """Why layer ``name`` has no ``pack-quantized`` form (empty when it has one)."""
    out = []
    if m.terms > 1:
        out.append(
            f"{name}: {m.terms} terms (bits={list(m.term_bits)}); pack-quantized holds one grid with an integer "
            "zero point, and the later mid-rise terms put the series' grid half a step off every whole step "
            "(quantize with terms=1)"
        )
    if m.term_bits[0] not in PACK_BITS:
        out.append(f"{name}: bits={m.term_bits[0]}")
    if not m.symmetric and m.zero_bits != m.term_bits[0]:
        kind = "a float16 bias" if m.zero_bits == 16 else "an int8 bias code in 1/16 steps"
        out.append(
            f"{name}: zero_bits={m.zero_bits} ({kind}; pack-quantized stores integer zero points: quantize with "
            f"zero_bits={m.term_bits[0]} or symmetric=True)"
        )
    if m.dual_scale:
        out.append(f"{name}: dual_scale (per-input-column scales)")
    if m.rotation is not None:
        out.append(f"{name}: rotation={m.rotation!r}")
    if m.outlier_budget:
        out.append(f"{name}: {m.outlier_budget} saturated outliers per row (outlier_fraction > 0)")
    if m.act_bits is not None:
        out.append(f"{name}: act_bits={m.act_bits} (an activation series; the export is weight-only, A16)")
    return out


def fpxint_layers(model: nn.Module) -> dict[str, FPxINTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FPxINTLinear)}


def export_problems(model: nn.Module) -> list[str]:
    """Every reason, layer by layer, why ``model`` cannot be exported (empty when it can)."""
    layers = fpxint_layers(model)
    if not layers:
        return ["the model holds no FP=xINT layer"]
    return [p for name, m in layers.items() for p in layer_problems(name, m)]


def refusal(problems: list[str]) -> str:
    """One line: the distinct problems (first layer named), how many layers have them."""
    kinds: dict[str, tuple[str, int]] = {}
    for p in problems:
        name, _, what = p.partition(": ")
        key = re.sub(r"\d+", "N", what)
        first, n = kinds.get(key, (p, 0))
        kinds[key] = (first, n + 1)
    parts = [f"{first}" + (f" (and {n - 1} more layers)" if n > 1 else "") for first, n in kinds.values()]
    return "cannot export to compressed-tensors pack-quantized: " + "; ".join(parts)


def ct_scheme(m: FPxINTLinear) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` fields of layer ``m`` (weights only, A16)."""
    return {
        "num_bits": m.term_bits[0],
        "type": "int",
        "symmetric": m.symmetric,
        "strategy": "group",
        "group_size": m.group_size,
    }


def signed_codes(m: FPxINTLinear) -> torch.Tensor:
    """int8 ``[out, in]`` codes ``q = code - 2^(X-1)`` of the layer's one term."""
    codes = unpack_series(m.codes, m.term_bits, m.in_features)[0]
    return (codes.to(torch.int16) - 2 ** (m.term_bits[0] - 1)).to(torch.int8)


def signed_zero_points(m: FPxINTLinear) -> torch.Tensor:
    """int8 ``[out, G]`` zero points ``zp = z - 2^(X-1)`` (0 when symmetric) of ``w = (q - zp)·scale``."""
    bias = m.bias_values()
    if bias is None:  # symmetric
        return torch.zeros_like(m.scale, dtype=torch.int8)
    z = zero_point(bias, m.scale, m.term_bits[0])
    return (z.to(torch.int16) - 2 ** (m.term_bits[0] - 1)).to(torch.int8)


def dense_weight(m: FPxINTLinear, dtype: torch.dtype) -> torch.Tensor:
    """``(q - zp)·scale`` ``[out, in]`` in ``dtype``: the grid the format stores (the bias exact, not float16)."""
    q = signed_codes(m).float().reshape(m.out_features, -1, m.group_size)
    zp = signed_zero_points(m).float().unsqueeze(-1)
    return ((q - zp) * m.scale.float().unsqueeze(-1)).reshape(m.out_features, m.in_features).to(dtype)


def to_dense(model: nn.Module, layers: Mapping[str, FPxINTLinear], dtype: torch.dtype) -> None:
    """Replace every FP=xINT layer of ``model`` by an ``nn.Linear`` holding its grid's weight (in place)."""
    for name, m in layers.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(dense_weight(m, dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        model.set_submodule(name, lin)


def quantization_config(model: nn.Module, layers: Mapping[str, FPxINTLinear]) -> Any:
    """compressed-tensors ``QuantizationConfig`` of the dense ``model``: one scheme for every layer is written as
    the usual ``targets: ["Linear"]`` with the other linear layers (``lm_head``, skipped blocks) in ``ignore``;
    several schemes (e.g. group sizes that differ by layer) as one config group each, targeting layers by name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_scheme: dict[tuple[Any, ...], list[str]] = {}
    for name, m in layers.items():
        by_scheme.setdefault(tuple(ct_scheme(m).items()), []).append(name)
    if len(by_scheme) == 1:
        ignore = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n not in layers]
        scheme = QuantizationScheme(
            targets=["Linear"], weights=QuantizationArgs(**dict(next(iter(by_scheme))))
        )
        return QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized")
    groups = {
        f"group_{i}": QuantizationScheme(
            targets=[f"re:^{re.escape(n)}$" for n in names], weights=QuantizationArgs(**dict(key))
        )
        for i, (key, names) in enumerate(by_scheme.items())
    }
    return QuantizationConfig(config_groups=groups, format="pack-quantized")


def check_packed(model: nn.Module, layers: Mapping[str, FPxINTLinear]) -> None:
    """The compressor's packed codes and zero points are ours, bit for bit (else ``RuntimeError``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for name, m in layers.items():
        lin: Any = model.get_submodule(name)
        bits, shape = m.term_bits[0], (m.out_features, m.in_features)
        q = unpack_from_int32(lin.weight_packed.data, bits, torch.Size(shape))
        ok = torch.equal(q.to(torch.int8), signed_codes(m)) and torch.equal(
            lin.weight_scale.data.half(), m.scale
        )
        if not m.symmetric:
            zp = unpack_from_int32(lin.weight_zero_point.data, bits, m.scale.shape, packed_dim=0)
            ok = ok and torch.equal(zp.to(torch.int8), signed_zero_points(m))
        if not ok:
            raise RuntimeError(f"compressed-tensors packed {name} differently from its FP=xINT codes")


EXPORT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
"""The dtypes an export is written in: both hold the float16 scales exactly (bfloat16 would round them)."""


def export_compressed_tensors(model: nn.Module, out: str | Path, dtype: str = "float16") -> dict[str, Any]:
    """Write the FP=xINT ``model`` (loaded from an fpxint checkpoint, its layers one exportable term each: see
    ``export_problems``) to the folder ``out`` in compressed-tensors' ``pack-quantized`` format, in ``dtype`` (one
    of ``EXPORT_DTYPES``: the other tensors and the stored scales).  The model is changed in place (its layers
    become compressed ``nn.Linear``).  Returns the number of layers and the schemes written."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: one of {tuple(EXPORT_DTYPES)}")
    problems = export_problems(model)
    if problems:
        raise ValueError(refusal(problems))
    layers = fpxint_layers(model)
    pm: Any = model  # its compressed layers gain weight_scale / weight_zero_point / weight_packed parameters
    torch_dtype = EXPORT_DTYPES[dtype]
    model.to(torch_dtype)
    to_dense(model, layers, torch_dtype)
    qconfig = quantization_config(model, layers)
    apply_quantization_config(model, qconfig)
    with torch.no_grad():
        for name, m in layers.items():
            lin = pm.get_submodule(name)
            lin.weight_scale.copy_(m.scale.reshape(lin.weight_scale.shape))
            if not m.symmetric:
                lin.weight_zero_point.copy_(signed_zero_points(m).reshape(lin.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    check_packed(model, layers)
    pm.hf_quantizer = None  # a plain model now: transformers saves no fpxint quantization_config
    if hasattr(pm.config, "quantization_config"):
        del pm.config.quantization_config
    pm.config.dtype = torch_dtype
    pm.save_pretrained(out)
    compressor.update_config(str(out))
    schemes = {tuple(sorted(ct_scheme(m).items())) for m in layers.values()}
    return {"layers": len(layers), "schemes": [dict(key) for key in sorted(schemes)]}
