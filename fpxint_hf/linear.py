"""``FPxINTLinear``: a linear layer computing ``y = Σ_i scale_i·(Q_i x) + bias·Σx + M_sa x (+ b)``.

The weight is held as the FP=xINT series of Eq. 1 (see ``expansion.py``), in registered buffers
with stable names, so ``save_pretrained`` writes them as they are and ``from_pretrained`` reloads
them with a plain shape check.  The forward paths (``forward_mode``) give the same result:

- ``reference``: dequantize the whole series into one matrix, then one matmul;
- ``terms``: the "AbelianAdd" of the paper (``terms_forward.terms_linear``): T integer matmuls, one reduce;
- ``int4`` / ``int8`` / ``dense``: the backends of ``backends.py`` (packed CPU kernels; the series dequantized
  once), prepared on first use and cached on the module (not in ``state_dict``), rebuilt when the active
  terms, dtype, device or buffers change;
- ``auto`` (the default): the fastest path for the layer, device and dtype (``backends.choose_kernel``:
  ``int8``/``int4`` for bfloat16 activations on the CPU, else ``dense``); ``dense`` when x needs a gradient.

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
from .bias import bias_of, stored_bias
from .expansion import (
    Expansion,
    expand,
    normalize_bits,
    original_weight,
    outlier_budget,
    reconstruct,
    resolve_group_size,
)
from .layout import TensorSpec, layer_tensors
from .offload import buffers_offloaded
from .packing import pack_series, unpack_series
from .settings import ACT_SETTINGS, DEFAULTS, ExpansionSettings
from .terms_forward import terms_linear
from .transform import transform_input

MODULE_MODES = ("reference", "terms")  # computed by the module itself (``series_weight``, ``terms_linear``)
FORWARD_MODES = (*MODULE_MODES, *backends.KERNEL_MODES, "auto")  # the backends registry names the rest


class FPxINTLinear(nn.Module):
    """Linear layer with FP=xINT weights (``bits``-bit terms, ``terms`` stored, per-group scales).  ``group_size``
    must divide ``in_features`` (``expansion.resolve_group_size``); ``outlier_budget``: saturated values kept per
    output row (0: no ``M_sa`` buffers)."""

    # buffers (declared for type checkers; registered in __init__)
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_val: torch.Tensor
    terms_used: torch.Tensor
    col_scale: torch.Tensor  # with dual_scale
    rot_signs: torch.Tensor  # with rotation

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int | tuple[int, ...] = DEFAULTS.bits,
        terms: int = DEFAULTS.terms,
        group_size: int | None = DEFAULTS.group_size,
        symmetric: bool = DEFAULTS.symmetric,
        outlier_budget: int = 0,
        series: str = DEFAULTS.series,
        fit: str = DEFAULTS.fit,
        act_bits: int | None = DEFAULTS.act_bits,
        act_terms: int = DEFAULTS.act_terms,
        act_tol: float = DEFAULTS.act_tol,
        act_outliers: int = DEFAULTS.act_outliers,
        dual_scale: bool = DEFAULTS.dual_scale,
        rotation: str | None = DEFAULTS.rotation,
        zero_bits: int = DEFAULTS.zero_bits,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        group_size = in_features if group_size is None else group_size
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.term_bits = normalize_bits(bits, terms)
        self.bits = self.term_bits[0] if len(set(self.term_bits)) == 1 else self.term_bits
        self.terms, self.group_size = terms, group_size
        self.symmetric, self.outlier_budget = symmetric, outlier_budget
        self.series, self.fit = series, fit  # the series rule; the first-term fit (quantize time only)
        self.dual_scale, self.rotation = dual_scale, rotation  # the input transforms (transform.py)
        self.zero_bits = 16 if symmetric else zero_bits  # the bias: float16 (16) or int8 code (8, bias.py)
        self.act_bits, self.act_terms = act_bits, act_terms  # activation series (act_kernels.py)
        self.act_tol, self.act_outliers = act_tol, act_outliers
        self.active_terms: int | None = None  # run-time truncation; None = every stored term
        self.forward_mode = "auto"
        self._kernel_cache: tuple | None = None  # (key, buffers, prepared kernel weights or None)
        # the buffers of layout.layer_tensors (shapes and dtypes declared there): codes, scale, zero (asymmetric),
        # outlier_idx and outlier_val (with an outlier budget), terms_used
        for name, spec in self.layout().items():
            self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype, device=device))
        self.terms_used.fill_(terms)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def layout(self) -> dict[str, TensorSpec]:
        """The stored tensors of this layer: names, shapes, dtypes (``layout.layer_tensors``)."""
        return layer_tensors(
            self.term_bits,
            self.out_features,
            self.in_features,
            self.group_size,
            self.symmetric,
            self.outlier_budget,
            dual_scale=self.dual_scale,
            rotation=self.rotation,
            zero_bits=self.zero_bits,
        )

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FPxINTLinear:
        """An empty layer shaped by ``settings`` (group size resolved, outlier budget from the fraction)."""
        return cls(
            in_features,
            out_features,
            bias,
            bits=settings.term_bits,
            terms=settings.terms,
            group_size=resolve_group_size(in_features, settings.group_size),
            symmetric=settings.symmetric,
            outlier_budget=outlier_budget(in_features, settings.outlier_fraction),
            series=settings.series,
            fit=settings.fit,
            **{k: getattr(settings, k) for k in ACT_SETTINGS},
            dual_scale=settings.dual_scale,
            rotation=settings.rotation,
            zero_bits=settings.zero_bits,
            device=device,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ state <-> Expansion

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
        module.load_expansion(module.quantize_weight(linear.weight, s.clip, s.outlier_fraction, s.tol))
        if linear.bias is not None and module.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def quantize_weight(
        self,
        weight: torch.Tensor,
        clip: str = "laplace",
        outlier_fraction: float = 0.0,
        tol: float = 0.0,
        importance: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
        hessian_span: int | None = None,
    ) -> Expansion:
        """``expansion.expand`` of a full-precision ``[out, in]`` weight with this layer's settings."""
        return expand(
            weight, self.term_bits, self.terms, self.group_size, self.symmetric, clip, outlier_fraction, tol,
            self.series, self.fit, importance, self.dual_scale, self.rotation, self.zero_bits,
            hessian=hessian, hessian_span=hessian_span,
        )  # fmt: skip

    def expansion_state(self, e: Expansion) -> dict[str, torch.Tensor]:
        """The buffers of this module holding ``e``, keyed by buffer name (declared dtypes and shapes)."""
        mine = (self.term_bits, self.terms, self.group_size, self.series, self.dual_scale, self.zero_bits)
        theirs = (e.term_bits, e.terms, e.group_size, e.series, e.col_scale is not None, e.zero_bits)
        rotated = {self.rotation is not None, e.rot_signs is not None}  # one element when they agree
        if e.shape != (self.out_features, self.in_features) or theirs != mine or len(rotated) > 1:
            raise ValueError(
                f"expansion (shape={e.shape}, bits={e.term_bits}, terms={e.terms}, group_size={e.group_size}, "
                f"series={e.series}, col_scale={e.col_scale is not None}, rot_signs={e.rot_signs is not None}, "
                f"zero_bits={e.zero_bits}) "
                f"does not match {self.extra_repr()}"
            )
        values = {
            "codes": pack_series(e.codes, self.term_bits),
            "scale": e.scale,
            "zero": None if e.zero is None else stored_bias(e.zero, e.scale, e.bits, e.zero_bits),
            "outlier_idx": e.outlier_idx,
            "outlier_val": e.outlier_val,
            "terms_used": torch.tensor([e.terms_used], device=e.scale.device),
            "col_scale": None if e.col_scale is None else e.col_scale.reshape(1, -1),
            "rot_signs": None if e.rot_signs is None else e.rot_signs.reshape(1, -1),
        }
        state = {}
        for name, spec in self.layout().items():
            value = values[name]
            if value is None or tuple(value.shape) != spec.shape:
                got = None if value is None else list(value.shape)
                raise ValueError(
                    f"expansion's {name} {got} does not match {list(spec.shape)} of {self.extra_repr()}"
                )
            state[name] = value.to(spec.dtype)
        return state

    @torch.no_grad()
    def load_expansion(self, e: Expansion) -> FPxINTLinear:
        """Copy an expansion into this module's buffers (in place, keeping their devices)."""
        self._kernel_cache = None
        for name, value in self.expansion_state(e).items():
            setattr(self, name, value.to(getattr(self, name).device))
        return self

    def expansion(self) -> Expansion:
        """The stored series as an ``Expansion`` (codes unpacked)."""
        n_out = self.out_features
        return Expansion(
            codes=unpack_series(self.codes, self.term_bits, self.in_features),
            scale=self.scale,
            zero=self.bias_values(),
            outlier_idx=self.outlier_idx
            if self.outlier_budget
            else self.scale.new_zeros(n_out, 0, dtype=torch.int32),
            outlier_val=self.outlier_val if self.outlier_budget else self.scale.new_zeros(n_out, 0),
            terms_used=int(self.terms_used.item()),
            term_bits=self.term_bits,
            group_size=self.group_size,
            series=self.series,
            col_scale=self.col_scale[0] if self.dual_scale else None,
            rot_signs=self.rot_signs[0] if self.rotation is not None else None,
            zero_bits=self.zero_bits,
        )

    def bias_values(self) -> torch.Tensor | None:
        """float16 ``[out, G]`` bias of Eq. 1 (the int8 codes' values with ``zero_bits=8``); None when symmetric."""
        if self.symmetric:
            return None
        return bias_of(self.zero, self.scale, self.term_bits[0], self.zero_bits)

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
        return original_weight(self.expansion(), self.num_terms())

    def series_weight(self) -> torch.Tensor:
        """float32 ``[out, in]`` matrix of the first ``num_terms()`` terms, which multiplies ``input_transform(x)``
        (``dequantize()`` itself when the layer has no input transform)."""
        return reconstruct(self.expansion(), self.num_terms())

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

    def _kernel_weights(self, x: torch.Tensor):
        """Prepared weights of the ``int4``/``int8`` kernel for ``x`` (cached), or ``None``: ``auto`` fell back."""
        mode, act = self.forward_mode, None
        if self.act_bits is not None:  # W·A: x is expanded too (act_kernels); forward_mode picks the product
            act = backends.act_spec(
                mode, self.group_size, x.device, *(getattr(self, n) for n in ACT_SETTINGS)
            )
        elif mode == "auto" and x.requires_grad and torch.is_grad_enabled():
            mode = "dense"  # the packed kernels have no backward; the dense weight is a constant of autograd
        # the hot path (every decode step) reads no tensor: the key holds active_terms, not terms_used.item(); the
        # same buffer objects mean the same terms_used (every method that changes state replaces or resets them)
        key, cache = (mode, self.active_terms, x.dtype, x.device, act), getattr(self, "_kernel_cache", None)
        if cache is not None and cache[0] == key and len(cache[1]) == len(self._buffers):
            if all(map(operator.is_, cache[1], self._buffers.values())):  # same buffer objects: still valid
                return cache[2]
        k, buffers = self.num_terms(), tuple(self._buffers.values())
        kw: dict = dict(bits=self.term_bits[:k], group_size=self.group_size, in_features=self.in_features)
        kw.update(terms=k, series=self.series)
        if act is not None:
            mode = "act"
        elif mode == "auto":
            mode = backends.choose_kernel(**kw, device=x.device, dtype=x.dtype)
        else:
            why = backends.supported(mode, **kw, device=x.device, dtype=x.dtype)
            if not why:
                raise ValueError(f"forward_mode={mode!r} does not apply to {self.extra_repr()}: {why.reason}")
        prepared = backends.prepare(mode, self.expansion(), k, x.dtype, x.device, act)
        # accelerate swaps offloaded buffers in for each forward and back to meta after it: a cache would only
        # miss, and would keep every offloaded layer's weights in memory
        self._kernel_cache = None if buffers_offloaded(self) else (key, buffers, prepared)
        return prepared

    # ------------------------------------------------------------------ reporting

    @torch.no_grad()
    def truncate_terms(self, k: int) -> FPxINTLinear:
        """Keep only the first ``k`` stored terms (the buffers shrink; used by a bits budget)."""
        if not 1 <= k <= self.terms:
            raise ValueError(f"cannot keep {k} terms of a layer that stores {self.terms}")
        if k == self.terms:
            return self
        e = self.expansion()
        e.codes = e.codes[:k]
        e.terms_used = min(e.terms_used, k)
        self.terms, self.term_bits = k, self.term_bits[:k]
        self.bits = self.term_bits[0] if len(set(self.term_bits)) == 1 else self.term_bits
        self._kernel_cache = None
        self.codes = pack_series(e.codes, self.term_bits)
        self.terms_used = torch.tensor([e.terms_used], dtype=torch.int32, device=self.terms_used.device)
        return self

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
