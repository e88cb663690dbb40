"""Forward backends as objects: each says whether it applies to a layer (``supports``), prepares the layer's
weights once (``prepare``) and computes ``x @ M.T`` (``forward``) — the shape of quanto's and HQQ's backends.

``int4`` and ``int8`` are the packed CPU kernels of ``kernels.py``; ``dense`` dequantizes the series once into the
activation dtype (the speed and the memory of an unquantized layer).  ``FPxINTLinear`` caches what ``prepare``
returns and runs ``forward`` inside an ``autograd.Function`` whose backward uses the dequantized weight, so every
backend can train adapters.  Pure torch: no ``nn.Module``, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels
from .act_kernels import ActSpec, ActWeights, act_linear, auto_method, prepare_act
from .expansion import Expansion, reconstruct
from .kernels import AUTO_DTYPES, DenseWeights, Int4Weights, Int8Weights, Support


@dataclass(frozen=True)
class Backend:
    """One forward path: ``supports(**layer)`` → ``Support``; ``prepare(e, terms, dtype, device)`` → weights;
    ``forward(x2d, weights)`` → ``[n, out]``."""

    name: str
    supports: Callable[..., Support]
    prepare: Callable[..., Any]
    forward: Callable[[torch.Tensor, Any], torch.Tensor]


def _int4_supports(*, bits, group_size, in_features, terms, device, dtype, series) -> Support:
    return kernels.int4_supported(kernels.term_widths(bits, terms), group_size, device, dtype)


def _int8_supports(*, bits, group_size, in_features, terms, device, dtype, series) -> Support:
    return kernels.int8_supported(bits, group_size, in_features, terms, series, device, dtype)


def _dense_supports(**_: Any) -> Support:
    return Support(True)


def prepare_dense(
    e: Expansion, terms: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> DenseWeights:
    """Dequantize the first ``terms`` terms once (``reconstruct``) into the compute dtype."""
    return DenseWeights(reconstruct(e, terms).to(device=device, dtype=dtype), terms)


BACKENDS = {
    "int4": Backend("int4", _int4_supports, kernels.prepare_int4, kernels.int4_linear),
    "int8": Backend("int8", _int8_supports, kernels.prepare_int8, kernels.int8_linear),
    "dense": Backend(
        "dense", _dense_supports, prepare_dense, lambda x2d, w: torch.nn.functional.linear(x2d, w.weight)
    ),
}
KERNEL_MODES = tuple(BACKENDS)
_BY_WEIGHTS = {Int4Weights: "int4", Int8Weights: "int8", DenseWeights: "dense"}
_FORWARD: dict[type, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    cls: BACKENDS[name].forward for cls, name in _BY_WEIGHTS.items()
}  # one lookup per call
_FORWARD[ActWeights] = act_linear  # W·A (act_bits set): both operands expanded


def backend(mode: str) -> Backend:
    if mode not in BACKENDS:
        raise ValueError(f"kernel mode={mode!r} is not one of {KERNEL_MODES}")
    return BACKENDS[mode]


def supported(mode: str, **layer: Any) -> Support:
    """Whether backend ``mode`` applies to a layer (``bits``, ``group_size``, ``in_features``, ``terms``,
    ``device``, ``dtype``, ``series``)."""
    return backend(mode).supports(**layer)


def choose_kernel(*, dtype: torch.dtype, **layer: Any) -> str:
    """The backend ``"auto"`` uses.

    Only bfloat16 activations on the CPU get a packed kernel: in torch 2.13 the float32 and float16 variants
    of both ops are correct but unvectorized, 10-90x slower than dense ``F.linear`` in the same dtype.
    ``int8`` goes first (one matmul for all its terms; with one term it measured as fast as ``int4`` or
    faster), then ``int4``.  Everything else gets ``dense`` (dequantized once, cached).  Measurements:
    ``eval/results/bench_kernels.md``.
    """
    if dtype in AUTO_DTYPES:
        for mode in ("int8", "int4"):
            if supported(mode, dtype=dtype, **layer):
                return mode
    return "dense"


def prepare(
    mode: str,
    e: Expansion,
    terms: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    act: ActSpec | None = None,
):
    """The weights backend ``mode`` runs on, for the first ``terms`` terms of ``e`` (with ``act``: the
    activation product of ``act_kernels``, whatever ``mode``)."""
    if act is not None:
        return prepare_act(e, terms, act, device)
    return backend(mode).prepare(e, terms, dtype, device)


ACT_METHOD_OF_MODE = {"reference": "reference", "int8": "int", "dense": "float32"}
"""The activation product's method under a layer's ``forward_mode`` when ``act_bits`` is set (``dense``: float32
matmuls on the integer codes); every other mode takes ``act_kernels.auto_method`` (``int`` on the CPU, else
``reference``)."""


def act_spec(
    forward_mode: str,
    group_size: int,
    device: torch.device,
    bits: int,
    terms: int,
    tol: float,
    outliers: int,
) -> ActSpec:
    """The ``ActSpec`` of a layer with activation settings ``bits``, ``terms``, ``tol``, ``outliers``."""
    method = ACT_METHOD_OF_MODE.get(forward_mode) or auto_method(group_size, bits, device)
    return ActSpec(bits, terms, tol, outliers, method)


def kernel_linear(x: torch.Tensor, w: Int4Weights | Int8Weights | DenseWeights | ActWeights) -> torch.Tensor:
    """``x @ M.T`` for any leading shape of ``x`` with prepared weights ``w``."""
    forward = _FORWARD[type(w)]
    if x.dim() == 2:
        return forward(x, w)
    shape = x.shape
    y = forward(x.reshape(-1, shape[-1]), w)
    return y.view(*shape[:-1], y.shape[-1])


class KernelLinearFunction(torch.autograd.Function):
    """A packed kernel's forward with the dequantized weight's backward (``dL/dx = dL/dy · M``), so every forward
    mode can train adapters on top of a frozen FP=xINT layer (quanto's ``QLinearFunction`` does the same).  ``x`` is
    the layer's transformed input (``FPxINTLinear.input_transform``), so ``M`` is its ``series_weight``."""

    @staticmethod
    def forward(ctx, x, layer, prepared):  # type: ignore[override]
        ctx.layer = layer
        return kernel_linear(x, prepared)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad @ ctx.layer.series_weight().to(grad.dtype), None, None
