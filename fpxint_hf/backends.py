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
class LayerQuery:
    """What a backend is asked about a layer: the widths of its ``terms`` active terms, its group size, inputs and
    series rule, and the activations' device and dtype."""

    bits: tuple[int, ...]
    terms: int
    group_size: int
    in_features: int
    series: str
    device: torch.device | str
    dtype: torch.dtype


@dataclass(frozen=True)
class Backend:
    """One forward path: ``can_implement(query)`` → ``Support`` (``ok, reason``); ``prepare(e, terms, dtype,
    device)`` → weights; ``forward(x2d, weights)`` → ``[n, out]``."""

    name: str
    can_implement: Callable[[LayerQuery], Support]
    prepare: Callable[..., Any]
    forward: Callable[[torch.Tensor, Any], torch.Tensor]


def _int4_can(q: LayerQuery) -> Support:
    return kernels.int4_supported(kernels.term_widths(q.bits, q.terms), q.group_size, q.device, q.dtype)


def _int8_can(q: LayerQuery) -> Support:
    return kernels.int8_supported(q.bits, q.group_size, q.in_features, q.terms, q.series, q.device, q.dtype)


def prepare_dense(
    e: Expansion, terms: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> DenseWeights:
    """Dequantize the first ``terms`` terms once (``reconstruct``) into the compute dtype."""
    return DenseWeights(reconstruct(e, terms).to(device=device, dtype=dtype), terms)


BACKENDS = {
    "int4": Backend("int4", _int4_can, kernels.prepare_int4, kernels.int4_linear),
    "int8": Backend("int8", _int8_can, kernels.prepare_int8, kernels.int8_linear),
    "dense": Backend(
        "dense",
        lambda q: Support(True),
        prepare_dense,
        lambda x2d, w: torch.nn.functional.linear(x2d, w.weight),
    ),
}
KERNEL_MODES = tuple(BACKENDS)
AUTO_ORDER = ("int8", "int4")
"""The packed kernels ``auto`` tries, in order, for ``kernels.AUTO_DTYPES`` activations (else ``dense``).

Only bfloat16 activations on the CPU get a packed kernel: in torch 2.13 the float32 and float16 variants of both
ops are correct but unvectorized, 10-90x slower than dense ``F.linear`` in the same dtype.  ``int8`` goes first
(one matmul for all its terms; with one term it measured as fast as ``int4`` or faster), then ``int4``.
Measurements: ``eval/results/bench_kernels.md``."""
_BY_WEIGHTS = {Int4Weights: "int4", Int8Weights: "int8", DenseWeights: "dense"}
_FORWARD: dict[type, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    cls: BACKENDS[name].forward for cls, name in _BY_WEIGHTS.items()
}  # one lookup per call
_FORWARD[ActWeights] = act_linear  # W·A (act_bits set): both operands expanded


def backend(mode: str) -> Backend:
    if mode not in BACKENDS:
        raise ValueError(f"kernel mode={mode!r} is not one of {KERNEL_MODES}")
    return BACKENDS[mode]


@dataclass(frozen=True)
class ForwardPath:
    """The path a layer runs (``name``: a backend, ``reference``, ``terms`` or ``act/<method>``), why, and why each
    backend it passed over was refused (``refused``: ``(name, reason)`` pairs)."""

    name: str
    reason: str
    refused: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        others = "; ".join(f"{n}: {why}" for n, why in self.refused)
        return f"{self.name} ({self.reason})" + (f"; refused {others}" if others else "")


def choose_path(mode: str, q: LayerQuery, auto_order: tuple[str, ...] = AUTO_ORDER) -> ForwardPath:
    """The backend that runs a layer under ``mode`` (``auto`` or a name of ``BACKENDS``): one asked for by name
    runs or raises ``ValueError`` with the reason it cannot; ``auto`` takes the first of ``auto_order`` that can
    (for ``kernels.AUTO_DTYPES`` activations only), else ``dense``, recording why each other was refused."""
    if mode != "auto":
        ok, why = backend(mode).can_implement(q)
        if not ok:
            raise ValueError(f"forward_mode={mode!r} cannot run this layer: {why}")
        return ForwardPath(mode, "forward_mode asks for it")
    refused: list[tuple[str, str]] = []
    for name in auto_order:
        if q.dtype not in AUTO_DTYPES:
            ok, why = False, f"auto runs packed kernels for {AUTO_DTYPES} activations only, not {q.dtype}"
        else:
            ok, why = BACKENDS[name].can_implement(q)
        if ok:
            return ForwardPath(name, f"auto: the first of {auto_order} that runs this layer", tuple(refused))
        refused.append((name, why))
    reason = "auto: no packed kernel runs this layer" if auto_order else "auto: dequantized once"
    return ForwardPath("dense", reason, tuple(refused))


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
