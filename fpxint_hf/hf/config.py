"""``FPxINTConfig``: the ``quantization_config`` of FP=xINT checkpoints (``quant_method = "fpxint"``)."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..linear import FORWARD_MODES
from ..settings import (
    CONFIG_DEFAULTS,
    SETTING_NAMES,
    ExpansionSettings,
    check_quantization_config,
    config_terms,
    config_zero_bits,
    read_quantization_config,
)

QUANT_METHOD = "fpxint"


class FPxINTConfig(QuantizationConfigMixin):
    """
    This is a wrapper class about all possible attributes and features of FP=xINT quantization: every linear
    weight is expanded as ``M = M_sa + bias·1 + Σ_{i=1..T} scale_i·Q_i`` with X-bit integer terms ``Q_i``.

    Args:
        bits (`int` or `list[int]`, *optional*, defaults to 4):
            Bit width X of every term (one of 2, 3, 4, 8), or one width per term (e.g. `[4, 2]`: a 4-bit term plus
            a 2-bit correction; needs `series="nested"`).
        terms (`int`, *optional*):
            Number T of terms stored (1 to 8). The forward can use fewer at run time (`set_active_terms`). Not
            given: one per width of a list `bits`; with one width, the default recipe: 2 terms under
            `bits_budget = bits + 0.5`, so most layers keep one term and those where a second lowers the error
            most get it (4.5 bits per weight at `bits=4`). `terms=1`: one term everywhere (4.375 bits per weight
            at group 64); `terms=2`: the paper's 4+4 series everywhere (8.5: a float16 bias, see `zero_bits`).
        group_size (`int` or `None`, *optional*, defaults to 64):
            Inputs sharing one scale/bias, along the input dimension; `None` = one group per output channel.
            An int from 16 to 65536. When it does not divide a layer's in-features, that layer uses the largest
            power of two below it that does (at least 16), else one group per channel, with a warning.
        symmetric (`bool`, *optional*, defaults to `False`):
            First term symmetric (no bias) instead of asymmetric (bias = middle of the clip range).
        clip (`str`, *optional*, defaults to `"laplace"`):
            How the saturation range is chosen: `"laplace"` (Laplace fit, ACIQ constants), `"search"`
            (min-error search over shrunk ranges) or `"minmax"` (no saturation). Only used with outliers.
        outlier_fraction (`float`, *optional*, defaults to 0.0):
            Fraction of each row's weights that may be kept exactly as saturated outliers `M_sa`, from 0 to 0.1.
            Sets a fixed budget of `ceil(fraction · in_features)` values per row (stored as int16/32 index +
            float16 value); 0 disables `M_sa`.
        tol (`float`, *optional*, defaults to 0.0):
            Stop a tensor's expansion early once the residual's max |value| is below `tol` (>= 0; 0 = never).
        modules_to_not_convert (`list[str]`, *optional*):
            Module names (or name suffixes) kept in full precision. `lm_head` (and tied output embeddings)
            are always kept.
        forward_mode (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (packed int8/int4 CPU kernels for bfloat16, else `"dense"`), `"dense"` (dequantize once and
            cache), `"int4"`, `"int8"`, `"terms"` (T integer matmuls then the weighted reduce) or `"reference"`
            (dequantize on every call; for debugging).
        series (`str`, *optional*, defaults to `"nested"`):
            How later terms refine earlier ones. `"nested"`: mid-rise terms using all 2^X codes, each 2^X times
            finer, the first term fitted so the whole series is the error-minimizing uniform grid. `"legacy"`:
            the rule of fpxint_hf 0.1 (grid 2^X - 2 finer); a config.json without this key is legacy.
        fit (`str`, *optional*, defaults to `"optimized"`):
            First-term fit of a nested series: `"optimized"` (clip search + least squares, calibration-free) or
            `"minmax"` (round-to-nearest on the min-max range). A config.json without this key is `"minmax"`.
        dual_scale (`bool`, *optional*, defaults to `False`):
            Before the series, divide every input column of the weight by a scale `t` found data-free by SINQ's
            Sinkhorn-like balancing of row and column standard deviations (per group of columns); `t` is stored
            (float16, one per input) and the layer multiplies its input by it. A config.json without this key: off.
        rotation (`str` or `None`, *optional*):
            `"hadamard"`: rotate the input channels by a block Hadamard matrix with fixed random ±1 signs (blocks of
            the largest power of two <= 256 dividing in-features) before the series; the signs are stored (int8,
            one per input) and the layer applies the inverse rotation to its input with a fast Walsh-Hadamard
            transform. `None` (default, and a config.json without this key): no rotation.
        zero_bits (`int`, *optional*, defaults to 8 for one term or a bits budget, else 16):
            How each group's bias is stored: `16` (float16) or `8` (an int8 code `b`, bias = `b·scale_1·2^(X-8)`,
            a grid 16x finer than the first term's at 4 bits; 8 bits per group fewer, 0.125 bits per weight at
            group size 64; `series="nested"` only; no effect with `symmetric=True`), or the first term's width
            (`zero_bits=4` with `bits=4`: an integer zero point `z` in [0, 2^X - 1], bias = `(2^(X-1) - z)·scale_1`,
            as GPTQ/AWQ and compressed-tensors store it; `fpxint export` needs it). Not given: 8 for one term or
            under a bits budget (the default recipe), 16 for several terms in every layer (the int8 code's step is
            a 4+4 series' finest step) and for `series="legacy"`. A config.json of format 3 or older without this
            key: 16.
        bits_budget (`float`, *optional*):
            Average bits per weight to spend (codes, scales, zeros and outliers counted; the per-layer 32-bit
            `terms_used` counter is not, so `bits=[3, 2]`, `bits_budget=3.5`, `zero_bits=16` at group 64 is 3-bit in every
            layer). Each layer is quantized with 1..`terms` terms and keeps the number of terms that lowers the summed relative weight error most per stored bit;
            the choice is written to `layer_terms`. Needs `terms >= 2`. Not given with `terms` not given either
            and one width `bits`: `bits + 0.5` (the default recipe, see `terms`).
        act_proxy (`str` or `None`, *optional*, defaults to `"probe"`):
            Weigh the first-term fit by each input column's activation energy `E[x_j²]`. `"probe"`: measured on the
            FP model itself fed random token ids (no data), one decoder block in memory at a time, read from the
            checkpoint's safetensors files (see `fpxint_hf.hf.probe`). `"norm"`: a data-free estimate read from the
            neighbouring norm and projection weights (LLaMA/Qwen2 blocks; see `fpxint_hf.hf.proxy`). `None`: plain
            weight error. Used when quantizing with `series="nested"`, `fit="optimized"`.
        second_order (`bool`, *optional*, defaults to `False`):
            With `act_proxy="probe"`, the probe also measures each layer's input covariance `H = E[x xᵀ]` (on 8
            sequences of 128 random token ids) and the codes are chosen with GPTQ's error feedback on the fitted
            grid, per output row only where that lowers the output error `(w - ŵ) H (w - ŵ)ᵀ` (see
            `fpxint_hf.gptq`). Used with `act_proxy="probe"` only (the other proxies measure nothing).
        compute_dtype (`str`, *optional*):
            The dtype a saved checkpoint runs in when reloaded without `dtype=` (`"bfloat16"`, `"float16"` or
            `"float32"`; written as config.json's `dtype`). `None` (default): decided when quantizing, `"float16"`
            for a float16 model, else `"bfloat16"` (the dtype of the packed CPU kernels).
        layer_terms (`dict[str, int]`, *optional*):
            Terms stored per layer where they differ from `terms` (written by `bits_budget`; read on reload).
        quantized_modules (`list[str]`, *optional*):
            The names of the converted layers, written when quantizing (`modules_to_not_convert` resolved
            against the model); a checkpoint with it is loaded by name (transformers and vLLM), one without it
            by matching `modules_to_not_convert` again.
        layer_group_size (`dict[str, int]`, *optional*):
            Group size per layer where it differs from `group_size` (the fallback for in-features it does not
            divide), written when quantizing; a checkpoint without it re-derives the fallback.
        version (`int`, *optional*, defaults to 4):
            Format of the saved config. A config.json without `version` is format 1: a key it lacks takes the
            value of fpxint_hf 0.1 (`series="legacy"`, `fit="minmax"`, `act_proxy=None`).
        act_bits (`int` or `None`, *optional*):
            Expand every quantized layer's input as well, at run time, per token (W4A8 / W4A4): `A = A_sa +
            bias_A·1 + Σ_j scale_{A,j}·Ã_j` with `act_bits`-bit integer terms `Ã_j` (4 or 8), and compute the layer
            as integer × integer products (see `fpxint_hf.act_kernels`). `None` (default; also a config.json
            without the key): activations stay in floating point (A16). Not supported by the vLLM plugin.
        act_terms (`int`, *optional*, defaults to 1):
            Activation terms T_a (1 to 4); each adds `act_bits` bits of precision (the error falls ~2^X-fold).
        act_tol (`float`, *optional*, defaults to 0.0):
            A token stops adding activation terms once its residual's max |value| is below `act_tol` (the paper
            uses 1e-4); 0 = always `act_terms`.
        act_outliers (`int`, *optional*, defaults to 4):
            Largest-|value| activations per token kept exactly (`A_sa`, 0 to 64), multiplied in floating point
            (4 cut SmolLM2's W4A8 KL ~8x at one activation term: eval/results/act.md).
        kwargs (`dict[str, Any]`, *optional*):
            Only `quant_method` (as written in config.json) is accepted here; other names raise `ValueError`.
    """

    def __init__(
        self,
        bits: int | list[int] | tuple[int, ...] = CONFIG_DEFAULTS["bits"],
        terms: int | None = CONFIG_DEFAULTS["terms"],
        group_size: int | None = CONFIG_DEFAULTS["group_size"],
        symmetric: bool = CONFIG_DEFAULTS["symmetric"],
        clip: str = CONFIG_DEFAULTS["clip"],
        outlier_fraction: float = CONFIG_DEFAULTS["outlier_fraction"],
        tol: float = CONFIG_DEFAULTS["tol"],
        modules_to_not_convert: list[str] | None = CONFIG_DEFAULTS["modules_to_not_convert"],
        forward_mode: str = CONFIG_DEFAULTS["forward_mode"],
        series: str = CONFIG_DEFAULTS["series"],
        fit: str = CONFIG_DEFAULTS["fit"],
        dual_scale: bool = CONFIG_DEFAULTS["dual_scale"],
        rotation: str | None = CONFIG_DEFAULTS["rotation"],
        zero_bits: int | None = CONFIG_DEFAULTS["zero_bits"],
        bits_budget: float | None = CONFIG_DEFAULTS["bits_budget"],
        layer_terms: dict[str, int] | None = CONFIG_DEFAULTS["layer_terms"],
        act_proxy: str | None = CONFIG_DEFAULTS["act_proxy"],
        second_order: bool = CONFIG_DEFAULTS["second_order"],
        quantized_modules: list[str] | None = CONFIG_DEFAULTS["quantized_modules"],
        layer_group_size: dict[str, int] | None = CONFIG_DEFAULTS["layer_group_size"],
        version: int = CONFIG_DEFAULTS["version"],
        compute_dtype: str | None = CONFIG_DEFAULTS["compute_dtype"],
        act_bits: int | None = CONFIG_DEFAULTS["act_bits"],
        act_terms: int = CONFIG_DEFAULTS["act_terms"],
        act_tol: float = CONFIG_DEFAULTS["act_tol"],
        act_outliers: int = CONFIG_DEFAULTS["act_outliers"],
        **kwargs: Any,
    ):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method={method!r} is not {QUANT_METHOD!r}")
        if kwargs:
            raise ValueError(
                f"unknown FPxINTConfig field(s) {sorted(kwargs)}; allowed: {sorted(self._fields())}"
            )
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # an out-of-tree method, not in the enum
        self.bits = list(bits) if isinstance(bits, (list, tuple)) else bits
        self.terms, recipe_budget = config_terms(bits, terms, bits_budget)
        # the default recipe's budget (not given by the user): where one term alone exceeds it (small groups),
        # every layer keeps one term instead of failing (hf/bits_budget.py); not saved (to_dict)
        self._recipe_budget = bits_budget is None and recipe_budget is not None
        bits_budget = recipe_budget
        self.group_size = group_size
        self.symmetric = symmetric
        self.clip = clip
        self.outlier_fraction = outlier_fraction
        self.tol = tol
        self.modules_to_not_convert = modules_to_not_convert
        self.forward_mode = forward_mode
        self.series = series
        self.fit = fit
        self.dual_scale = dual_scale
        self.rotation = rotation
        self.zero_bits = config_zero_bits(zero_bits, series, self.terms, bits_budget)
        self.bits_budget = bits_budget
        self.layer_terms = layer_terms
        self.act_proxy = act_proxy
        self.second_order = second_order
        self.quantized_modules = quantized_modules
        self.layer_group_size = layer_group_size
        self.version = version
        self.compute_dtype = compute_dtype
        self.act_bits, self.act_terms, self.act_tol, self.act_outliers = (
            act_bits,
            act_terms,
            act_tol,
            act_outliers,
        )
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """As ``QuantizationConfigMixin.from_dict``, validating again after ``kwargs`` override fields.

        The saved dict is read by ``settings.read_quantization_config``: a key it lacks takes the default of its
        format ``version`` (format 1, without ``series``/``fit``: fpxint_hf 0.1's legacy rule)."""
        config_dict = read_quantization_config(config_dict)
        out = super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)
        (out[0] if return_unused_kwargs else out).post_init()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The saved ``quantization_config``: every field of ``CONFIG_DEFAULTS`` and ``quant_method``."""
        out = super().to_dict()
        out.pop("_recipe_budget", None)
        return out

    @property
    def recipe_budget(self) -> bool:
        """Whether ``bits_budget`` is the default recipe's (``settings.config_terms``), not one the user gave."""
        return bool(getattr(self, "_recipe_budget", False))

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return tuple(CONFIG_DEFAULTS)

    def settings(self) -> ExpansionSettings:
        """The expansion settings of this config (``settings.ExpansionSettings``, from which its fields derive)."""
        return ExpansionSettings(**{name: getattr(self, name) for name in SETTING_NAMES})

    @property
    def term_bits(self) -> tuple[int, ...]:
        """The width of each of the ``terms`` terms."""
        return self.settings().term_bits

    def terms_of(self, module_name: str) -> int:
        """Terms stored for ``module_name`` (``layer_terms``, else ``terms``)."""
        return (self.layer_terms or {}).get(module_name, self.terms)

    def post_init(self):
        """Check every field; raise ``ValueError`` naming the field, the value and what is allowed."""
        check_quantization_config("FPxINTConfig", {name: getattr(self, name) for name in CONFIG_DEFAULTS})
        _check(
            self.forward_mode in FORWARD_MODES, "forward_mode", self.forward_mode, f"one of {FORWARD_MODES}"
        )

    def nominal_bits_per_weight(self) -> int:
        """``terms · bits``: code bits only; scales, biases and outliers come on top (see ``bits_per_weight``)."""
        return sum(self.term_bits)


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"FPxINTConfig.{field}={value!r} is invalid; allowed: {allowed}")
