"""``FPxINTLinear``: a linear layer computing ``y = Σ_i scale_i·(Q_i x) + bias·Σx + M_sa x (+ b)``.

The weight is held as the FP=xINT series of Eq. 1 (``expansion.py``; ``series.FPxINTSeries``), in registered
buffers with stable names, so ``save_pretrained`` writes them as they are and ``from_pretrained`` reloads
them with a plain shape check.  The forward paths (``forward_mode``) give the same result:

- ``reference``: dequantize the whole series into one matrix, then one matmul;
- ``terms``: the "AbelianAdd" of the paper (``terms_forward.terms_linear``): T integer matmuls, one reduce;
- ``int4`` / ``int8`` / ``dense``: the backends of ``backends.py`` (packed CPU kernels; the series dequantized
  once), prepared on first use and cached on the module (not in ``state_dict``), rebuilt when the active
  terms, dtype, device or buffers change;
- ``auto`` (the default): the fastest path for the layer, device and dtype (``backends.choose_path``:
  ``int8``/``int4`` for bfloat16 activations on the CPU, else ``dense``); ``dense`` when x needs a gradient.

``forward_path(dtype, device)`` says which path a layer runs and why (``model_ops.forward_paths`` for a model).

``active_terms`` truncates the series at run time: one checkpoint, several precisions.  With an input transform
(``rotation``, ``dual_scale``: ``transform.py``) every path multiplies ``input_transform(x)`` by the stored series.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .expansion import Expansion
from .layout import TensorSpec
from .offload import buffers_offloaded
from .series import FPxINTSeries, SeriesSpec
from .settings import ACT_SETTINGS, DEFAULTS, ExpansionSettings
from .terms_forward import terms_linear
from .transform import transform_input

MODULE_MODES = ("reference", "terms")  # computed by the module itself (``series_weight``, ``terms_linear``)
FORWARD_MODES = (*MODULE_MODES, *backends.KERNEL_MODES, "auto")  # the backends registry names the rest


def _setting(name: str, of_spec: bool = False) -> Any:
    """A read-only view of one setting of the layer's ``spec`` (``of_spec``: of the spec itself, resolved for
    the layer: ``term_bits``, ``group_size``, ``outlier_budget``, ``zero_bits``)."""
    if of_spec:
        return property(lambda self: getattr(self.spec, name), doc=f"``spec.{name}``")
    return property(lambda self: getattr(self.spec.settings, name), doc=f"``spec.settings.{name}``")


class FPxINTLinear(nn.Module):
    """Linear layer with FP=xINT weights: its buffers hold one ``series.FPxINTSeries`` whose ``spec`` (settings,
    shape, group size, outlier budget) the layer keeps.  Build it with ``settings`` fields (``bits=``, ``terms=``,
    ``group_size=`` (must divide ``in_features``; None: one group per output row), ...) and ``outlier_budget``
    (saturated values kept per output row; 0: no ``M_sa`` buffers), or with a whole ``spec``."""

    # buffers (declared for type checkers; registered in __init__)
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_val: torch.Tensor
    terms_used: torch.Tensor
    col_scale: torch.Tensor  # with dual_scale
    rot_signs: torch.Tensor  # with rotation
    # the activation series (act_kernels.py): run-time settings, taken from the spec's settings, may be changed
    act_bits: int | None
    act_terms: int
    act_tol: float
    act_outliers: int
    # the stored series' settings (read-only: they shape the buffers)
    terms, symmetric, series, fit = (
        _setting("terms"),
        _setting("symmetric"),
        _setting("series"),
        _setting("fit"),
    )
    dual_scale, rotation = _setting("dual_scale"), _setting("rotation")
    term_bits, group_size = _setting("term_bits", True), _setting("group_size", True)
    outlier_budget, zero_bits = _setting("outlier_budget", True), _setting("zero_bits", True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        spec: SeriesSpec | None = None,
        outlier_budget: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **settings: Any,
    ):
        super().__init__()
        if spec is None:
            s = dataclasses.replace(DEFAULTS, **settings)
            gs = in_features if s.group_size is None else s.group_size
            spec = SeriesSpec(s, out_features, in_features, gs, outlier_budget)
        elif settings or (spec.in_features, spec.out_features) != (in_features, out_features):
            raise ValueError(f"spec ({spec.describe()}) does not match in_features={in_features}, "
                             f"out_features={out_features} (or settings {sorted(settings)} given beside it)")  # fmt: skip
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        for name in ACT_SETTINGS:
            setattr(self, name, getattr(spec.settings, name))
        self.active_terms: int | None = None  # run-time truncation; None = every stored term
        self.forward_mode = "auto"
        self._kernel_cache: tuple | None = None  # (key, buffers, prepared kernel weights or None)
        # the buffers of layout.layer_tensors (shapes and dtypes declared there): codes, scale, zero (asymmetric),
        # outlier_idx and outlier_val (with an outlier budget), terms_used
        for name, t_spec in self.layout().items():
            self.register_buffer(name, torch.zeros(t_spec.shape, dtype=t_spec.dtype, device=device))
        self.terms_used.fill_(spec.terms)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def bits(self) -> int | tuple[int, ...]:
        """X of every term, or one width per term when they differ."""
        return self.term_bits[0] if len(set(self.term_bits)) == 1 else self.term_bits

    def layout(self) -> dict[str, TensorSpec]:
        """The stored tensors of this layer: names, shapes, dtypes (``layout.layer_tensors``)."""
        return self.spec.layout()

    def _apply(self, fn, recurse=True):
        """Keep the float16 scale/bias/outlier buffers float16 under ``.to(dtype)``, ``.half()``, ``.bfloat16()``.

        They are viewed as int16 while ``fn`` runs (dtype casts skip integer tensors; device moves do not).
        """
        self._kernel_cache = None
        fp16 = [n for n, b in self._buffers.items() if b is not None and b.dtype == torch.float16]
        for n in fp16:
            self._buffers[n] = self._buffers[n].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            for n in fp16:
                self._buffers[n] = self._buffers[n].view(torch.float16)

    def __getstate__(self):  # copy.deepcopy / pickle: drop the kernel cache, it is rebuilt on demand
        return {**self.__dict__, "_kernel_cache": None}

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = None  # load_state_dict copies into the buffers in place
        return super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def for_settings(
        cls,
        in_features: int,
        out_features: int,
        settings: ExpansionSettings,
        bias: bool = True,
        *,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FPxINTLinear:
        """An empty layer shaped by ``settings`` (``series.SeriesSpec.for_layer``: ``group_size`` as recorded for
        the layer, else ``settings.group_size`` resolved; the outlier budget from the fraction)."""
        spec = SeriesSpec.for_layer(settings, out_features, in_features, group_size)
        return cls(in_features, out_features, bias, spec=spec, device=device, dtype=dtype)

    # ------------------------------------------------------------------ state <-> FPxINTSeries

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, settings: ExpansionSettings = DEFAULTS, **overrides: Any
    ) -> FPxINTLinear:
        """Quantize one ``nn.Linear`` (its bias is copied) with ``settings`` and ``overrides`` of its fields
        (``bits=``, ``terms=``, ``series=``, ...). ``group_size`` falls back as ``resolve_group_size``."""
        s = dataclasses.replace(settings, **overrides)
        module = cls.for_settings(
            linear.in_features,
            linear.out_features,
            s,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        module.load_series(FPxINTSeries.from_weight(linear.weight, module.spec))
        if linear.bias is not None and module.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def to_series(self) -> FPxINTSeries:
        """The stored series: this layer's ``spec`` and its buffers (the same tensors, not copies)."""
        return FPxINTSeries(self.spec, {name: getattr(self, name) for name in self.layout()})

    @torch.no_grad()
    def load_series(self, s: FPxINTSeries) -> FPxINTLinear:
        """Hold the series ``s`` (its spec, its tensors moved to the devices of this module's buffers)."""
        self._kernel_cache = None
        state = s.state()
        for name in [n for n in self.layout() if n not in state]:
            delattr(self, name)
        self.spec = s.spec
        for name, value in state.items():
            old = self._buffers.get(name)
            self.register_buffer(name, value if old is None else value.to(old.device))
        return self

    def expansion_state(self, e: Expansion) -> dict[str, torch.Tensor]:
        """The buffers of this module holding ``e``, keyed by buffer name (declared dtypes and shapes)."""
        return FPxINTSeries.from_expansion(self.spec, e).state()

    @torch.no_grad()
    def load_expansion(self, e: Expansion) -> FPxINTLinear:
        """Copy an expansion into this module's buffers (in place, keeping their devices)."""
        return self.load_series(FPxINTSeries.from_expansion(self.spec, e))

    def expansion(self) -> Expansion:
        """The stored series as an ``Expansion`` (codes unpacked)."""
        return self.to_series().expansion()

    def bias_values(self) -> torch.Tensor | None:
        """float16 ``[out, G]`` bias of Eq. 1 (the int8 codes' values with ``zero_bits=8``); None when symmetric."""
        return self.to_series().bias_values()

    @property
    def qweight(self) -> torch.Tensor:
        """The packed integer codes under the name PEFT looks up for a quantized layer's weight (GPTQ's
        ``qweight``): PEFT reads its device when it wraps the layer with LoRA.  Read-only, not in ``state_dict``."""
        return self.codes

    def num_terms(self) -> int:
        """Terms the forward uses now: ``min(active_terms, terms_used)``."""
        used = int(self.terms_used.item())
        return used if self.active_terms is None else min(self.active_terms, used)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]`` weight of the first ``num_terms()`` terms, in the original input basis."""
        return self.to_series().dequantize(self.num_terms())

    def series_weight(self) -> torch.Tensor:
        """float32 ``[out, in]`` matrix of the first ``num_terms()`` terms, which multiplies ``input_transform(x)``
        (``dequantize()`` itself when the layer has no input transform)."""
        return self.to_series().series_weight(self.num_terms())

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        """``t ⊙ Rᵀx`` of ``transform.transform_input`` (``x`` itself without ``dual_scale`` and ``rotation``)."""
        return transform_input(x, self._buffers.get("col_scale"), self._buffers.get("rot_signs"))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode={self.forward_mode!r} is not supported; allowed: {FORWARD_MODES}")
        quantized_x = self.act_bits is not None  # W·A: x expanded too (issue 16), through act_kernels
        prepared = None if self.forward_mode in MODULE_MODES and not quantized_x else self._kernel_weights(x)
        x = self.input_transform(x)
        if prepared is not None:
            needs_grad = torch.is_grad_enabled() and x.requires_grad
            y = (
                backends.KernelLinearFunction.apply(x, self, prepared)
                if needs_grad
                else backends.kernel_linear(x, prepared)
            )
        elif self.forward_mode == "terms":
            y = terms_linear(x, self.expansion(), self.num_terms())
        else:
            y = F.linear(x, self.series_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward_path(
        self, dtype: torch.dtype, device: torch.device | str = "cpu", requires_grad: bool = False
    ) -> backends.ForwardPath:
        """The path ``forward`` runs for activations of ``dtype`` on ``device`` (``requires_grad``: x needs a
        gradient) under ``forward_mode``, why, and why ``auto`` refused the backends it passed over."""
        mode = self.forward_mode
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode={mode!r} is not supported; allowed: {FORWARD_MODES}")
        if self.act_bits is not None:  # W·A: x is expanded too (act_kernels); forward_mode picks the product
            method = self._act_spec(device).method
            why = f"act_bits={self.act_bits}: activations expanded too; forward_mode={mode!r} takes the {method} product"
            return backends.ForwardPath(f"act/{method}", why)
        if mode in MODULE_MODES:
            return backends.ForwardPath(mode, "forward_mode asks for it (computed by the module)")
        if mode == "auto" and requires_grad:
            return backends.ForwardPath(
                "dense", "auto while x needs a gradient (the packed kernels have no backward)"
            )
        k = self.num_terms()
        q = backends.LayerQuery(
            self.term_bits[:k], k, self.group_size, self.in_features, self.series, device, dtype
        )
        try:
            return backends.choose_path(mode, q)
        except ValueError as err:
            raise ValueError(f"{err} ({self.extra_repr()})") from err

    def _act_spec(self, device: torch.device | str) -> backends.ActSpec:
        settings = (getattr(self, n) for n in ACT_SETTINGS)
        return backends.act_spec(self.forward_mode, self.group_size, torch.device(device), *settings)

    def _kernel_weights(self, x: torch.Tensor):
        """Prepared weights of the path ``forward_path`` chooses for ``x`` (cached on the module)."""
        grad = x.requires_grad and torch.is_grad_enabled()
        # the hot path (every decode step) reads no tensor: the key holds active_terms, not terms_used.item(); the
        # same buffer objects mean the same terms_used (every method that changes state replaces or resets them)
        acts = tuple(getattr(self, n) for n in ACT_SETTINGS)
        key = (self.forward_mode, self.active_terms, x.dtype, x.device, grad, acts)
        cache = getattr(self, "_kernel_cache", None)
        if cache is not None and cache[0] == key and len(cache[1]) == len(self._buffers):
            if all(map(operator.is_, cache[1], self._buffers.values())):  # same buffer objects: still valid
                return cache[2]
        buffers, path = tuple(self._buffers.values()), self.forward_path(x.dtype, x.device, grad)
        act = None if self.act_bits is None else self._act_spec(x.device)
        prepared = self.to_series().prepare(path.name, x.dtype, x.device, self.num_terms(), act)
        # accelerate swaps offloaded buffers in for each forward and back to meta after it: a cache would only
        # miss, and would keep every offloaded layer's weights in memory
        self._kernel_cache = None if buffers_offloaded(self) else (key, buffers, prepared)
        return prepared

    # ------------------------------------------------------------------ reporting

    @torch.no_grad()
    def truncate_terms(self, k: int) -> FPxINTLinear:
        """Keep only the first ``k`` stored terms (the buffers shrink; used by a bits budget)."""
        return self.load_series(self.to_series().truncate(k))

    def stored_bytes(self) -> int:
        """Bytes of every buffer that stores the weight (codes, scales, zeros, outliers, term count)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, terms={self.terms}, group_size={self.group_size}, symmetric={self.symmetric}, "
            f"series={self.series}, dual_scale={self.dual_scale}, rotation={self.rotation}, "
            + ("" if self.zero_bits == 16 else f"zero_bits={self.zero_bits}, ")
            + ("" if self.act_bits is None else f"act_bits={self.act_bits}, act_terms={self.act_terms}, ")
            + f"outliers_per_row={self.outlier_budget}, bits_per_weight={self.bits_per_weight():.3f}"
        )
