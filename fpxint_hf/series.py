"""One layer's stored series (Eq. 1): ``SeriesSpec`` (the settings, the shape, the group size and outlier budget,
resolved once per layer) and ``FPxINTSeries`` (a spec with its packed tensors, those of ``layout.layer_tensors``).

Every owner of a layer's series goes through this one object: ``FPxINTLinear`` (its registered buffers are a
series' ``state``), the bits budget (a series per candidate number of terms), the vLLM plugin (a series per fused
piece) and the forward backends (``prepare``).  Its methods return series, tensors or ``Expansion``s, never a
module.  Pure torch: no ``nn``, no transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import backends
from .act_kernels import ActSpec
from .bias import bias_of, stored_bias
from .expansion import (
    NO_OPTIONS,
    ExpandOptions,
    Expansion,
    expand,
    original_weight,
    outlier_budget,
    reconstruct,
    resolve_group_size,
)
from .layout import TensorSpec, layer_tensors
from .packing import pack_series, unpack_series
from .settings import ExpansionSettings


@dataclass(frozen=True)
class SeriesSpec:
    """A layer's series without its tensors.  ``settings``: what it was (or will be) quantized with (``terms`` and
    ``bits`` as stored); ``group_size``: the one this layer uses (``for_layer`` resolves it, once);
    ``outlier_budget``: values of ``M_sa`` kept per output row."""

    settings: ExpansionSettings
    out_features: int
    in_features: int
    group_size: int
    outlier_budget: int = 0

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.in_features % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide in_features={self.in_features}")

    @classmethod
    def for_layer(
        cls, settings: ExpansionSettings, out_features: int, in_features: int, group_size: int | None = None
    ) -> SeriesSpec:
        """The spec of a layer under ``settings``: ``group_size`` as recorded for it (a checkpoint's
        ``layer_group_size``), else ``settings.group_size`` resolved (``expansion.resolve_group_size``); the
        outlier budget from ``outlier_fraction``."""
        gs = resolve_group_size(in_features, settings.group_size) if group_size is None else group_size
        k = outlier_budget(in_features, settings.outlier_fraction)
        return cls(settings, out_features, in_features, gs, k)

    @property
    def term_bits(self) -> tuple[int, ...]:
        return self.settings.term_bits

    @property
    def terms(self) -> int:
        return self.settings.terms

    @property
    def zero_bits(self) -> int:
        """How each group's bias is stored: 16 (float16, also when symmetric: no bias) or an int8 code."""
        return 16 if self.settings.symmetric else self.settings.zero_bits

    def layout(self, pieces: int = 1) -> dict[str, TensorSpec]:
        """The stored tensors (``layout.layer_tensors``): names, shapes, dtypes."""
        return layer_tensors(
            self.settings, self.out_features, self.in_features, self.group_size, self.outlier_budget, pieces
        )

    def truncated(self, k: int) -> SeriesSpec:
        """The spec of the first ``k`` stored terms."""
        if not 1 <= k <= self.terms:
            raise ValueError(f"cannot keep {k} terms of a layer that stores {self.terms}")
        bits = self.settings.bits if isinstance(self.settings.bits, int) else self.term_bits[:k]
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, terms=k, bits=bits))

    def expand_settings(self) -> ExpansionSettings:
        """``settings`` with this layer's group size (``None`` when it is one group per output row)."""
        gs = None if self.group_size == self.in_features else self.group_size
        return dataclasses.replace(self.settings, group_size=gs)

    def describe(self) -> str:
        s = self.settings
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, terms={s.terms}, "
            f"group_size={self.group_size}, symmetric={s.symmetric}, series={s.series}, "
            f"dual_scale={s.dual_scale}, rotation={s.rotation}, zero_bits={self.zero_bits}, "
            f"outliers_per_row={self.outlier_budget}"
        )


@dataclass
class FPxINTSeries:
    """A layer's stored series: its ``spec`` and its packed ``tensors`` (by the names of ``spec.layout()``).
    ``errors``: the relative error after each term when it was just fitted (``Expansion.errors``; not stored)."""

    spec: SeriesSpec
    tensors: dict[str, torch.Tensor]
    errors: tuple[float, ...] = ()

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, spec: SeriesSpec, options: ExpandOptions = NO_OPTIONS
    ) -> FPxINTSeries:
        """Quantize a full-precision ``[out, in]`` weight (``expansion.expand``) into the series ``spec`` declares."""
        return cls.from_expansion(spec, expand(weight, spec.expand_settings(), options))

    @classmethod
    def from_expansion(cls, spec: SeriesSpec, e: Expansion) -> FPxINTSeries:
        """Pack an ``Expansion`` into the tensors of ``spec`` (declared dtypes; ``ValueError`` on a mismatch)."""
        mine = (
            spec.term_bits,
            spec.group_size,
            spec.settings.series,
            spec.settings.dual_scale,
            spec.zero_bits,
        )
        theirs = (e.term_bits, e.group_size, e.series, e.col_scale is not None, e.zero_bits)
        rotated = {spec.settings.rotation is not None, e.rot_signs is not None}  # one element when they agree
        if e.shape != (spec.out_features, spec.in_features) or theirs != mine or len(rotated) > 1:
            raise ValueError(
                f"expansion (shape={e.shape}, bits={e.term_bits}, terms={e.terms}, group_size={e.group_size}, "
                f"series={e.series}, col_scale={e.col_scale is not None}, rot_signs={e.rot_signs is not None}, "
                f"zero_bits={e.zero_bits}) does not match {spec.describe()}"
            )
        values = {
            "codes": pack_series(e.codes, spec.term_bits),
            "scale": e.scale,
            "zero": None if e.zero is None else stored_bias(e.zero, e.scale, e.bits, e.zero_bits),
            "outlier_idx": e.outlier_idx,
            "outlier_val": e.outlier_val,
            "terms_used": torch.tensor([e.terms_used], device=e.scale.device),
            "col_scale": None if e.col_scale is None else e.col_scale.reshape(1, -1),
            "rot_signs": None if e.rot_signs is None else e.rot_signs.reshape(1, -1),
        }
        tensors = {}
        for name, t_spec in spec.layout().items():
            value = values[name]
            if value is None or tuple(value.shape) != t_spec.shape:
                got = None if value is None else list(value.shape)
                raise ValueError(
                    f"expansion's {name} {got} does not match {list(t_spec.shape)} of {spec.describe()}"
                )
            tensors[name] = value.to(t_spec.dtype)
        return cls(spec, tensors, e.errors)

    @classmethod
    def from_state(cls, spec: SeriesSpec, state: Mapping[str, torch.Tensor]) -> FPxINTSeries:
        """The series of stored tensors ``state`` (a module's buffers, a checkpoint's or a vLLM piece's tensors):
        exactly the names of ``spec.layout()``, with its shapes (values are checked by ``layout.check_tensors``)."""
        layout = spec.layout()
        if set(state) != set(layout):
            raise ValueError(f"tensors {sorted(state)} are not those of {spec.describe()}: {sorted(layout)}")
        for name, t_spec in layout.items():
            if tuple(state[name].shape) != t_spec.shape:
                raise ValueError(
                    f"{name} {list(state[name].shape)} does not match {list(t_spec.shape)} of {spec.describe()}"
                )
        return cls(spec, dict(state))

    def state(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a checkpoint holds for this layer)."""
        return dict(self.tensors)

    @property
    def terms_used(self) -> int:
        return int(self.tensors["terms_used"][0].item())

    def bias_values(self) -> torch.Tensor | None:
        """float16 ``[out, G]`` bias of Eq. 1 (the int8 codes' values with ``zero_bits=8``); None when symmetric."""
        if self.spec.settings.symmetric:
            return None
        return bias_of(
            self.tensors["zero"], self.tensors["scale"], self.spec.term_bits[0], self.spec.zero_bits
        )

    def expansion(self) -> Expansion:
        """The series as an ``Expansion`` (codes unpacked)."""
        spec, t = self.spec, self.tensors
        scale, n_out = t["scale"], spec.out_features
        return Expansion(
            codes=unpack_series(t["codes"], spec.term_bits, spec.in_features),
            scale=scale,
            zero=self.bias_values(),
            outlier_idx=t["outlier_idx"].int()
            if spec.outlier_budget
            else scale.new_zeros(n_out, 0, dtype=torch.int32),
            outlier_val=t["outlier_val"] if spec.outlier_budget else scale.new_zeros(n_out, 0),
            terms_used=self.terms_used,
            term_bits=spec.term_bits,
            group_size=spec.group_size,
            series=spec.settings.series,
            errors=self.errors,
            col_scale=t["col_scale"][0] if spec.settings.dual_scale else None,
            rot_signs=t["rot_signs"][0] if spec.settings.rotation is not None else None,
            zero_bits=spec.zero_bits,
        )

    def active(self, active_terms: int | None = None) -> int:
        """Terms a forward uses: ``min(active_terms, terms_used)`` (``None``: every computed term)."""
        used = self.terms_used
        return used if active_terms is None else min(active_terms, used)

    def truncate(self, k: int) -> FPxINTSeries:
        """The series of the first ``k`` stored terms (its codes shrink; used by a bits budget)."""
        spec = self.spec.truncated(k)
        if k == self.spec.terms:
            return self
        codes = unpack_series(self.tensors["codes"], self.spec.term_bits, self.spec.in_features)[:k]
        used = torch.tensor([min(self.terms_used, k)], dtype=torch.int32, device=codes.device)
        tensors = {**self.tensors, "codes": pack_series(codes, spec.term_bits), "terms_used": used}
        return FPxINTSeries(spec, tensors, self.errors[:k])

    def dequantize(self, terms: int | None = None) -> torch.Tensor:
        """float32 ``[out, in]`` weight of the first ``terms`` terms, in the original input basis."""
        return original_weight(self.expansion(), terms)

    def series_weight(self, terms: int | None = None) -> torch.Tensor:
        """float32 ``[out, in]`` matrix of the first ``terms`` terms, which multiplies the transformed input."""
        return reconstruct(self.expansion(), terms)

    def prepare(
        self,
        backend: str,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        terms: int | None = None,
        act: ActSpec | None = None,
    ):
        """The weights ``backend`` runs on (``backends.prepare``) for the first ``terms`` terms (``None``: all)."""
        return backends.prepare(backend, self.expansion(), self.active(terms), dtype, device, act)

    def stored_bits(self) -> int:
        """Bits of every tensor that grows with the layer (all but the per-layer ``terms_used`` counter)."""
        return 8 * sum(t.numel() * t.element_size() for n, t in self.tensors.items() if n != "terms_used")
