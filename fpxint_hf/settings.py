"""``ExpansionSettings``: every choice that shapes an FP=xINT expansion, declared once; and the one reader of a
saved ``quantization_config`` (``read_quantization_config``).

``FPxINTConfig`` (its fields, defaults and validation), the ``fpxint`` CLI (its quantization flags), the series
code (``expansion.expand``, ``FPxINTLinear``) and the vLLM plugin all derive from this frozen dataclass; each
field's ``metadata`` holds the allowed range shown in errors and the CLI help.  Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_METHODS = ("laplace", "search", "minmax")
SERIES_RULES = ("nested", "legacy")
FIT_METHODS = ("optimized", "minmax")
ROTATIONS = (None, "hadamard")
# a group's bias: float16, an int8 code in steps of scale_1·2^(X_1-8), or (X_1 < 8 bits, the first term's width)
# an integer zero point in steps of scale_1 as GPTQ/AWQ store it (bias.py)
ZERO_BITS = (16, 8, 4, 3, 2)
MAX_TERMS = 8
MAX_OUTLIER_FRACTION = 0.1
ACT_BITS = (4, 8)  # widths of the activation series' terms (activations.ACT_BITS)
MAX_ACT_TERMS = 4
MAX_ACT_OUTLIERS = 64


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ExpansionSettings:
    """What ``expand`` needs to know about a layer's series (see docs/configuration.md)."""

    bits: int | tuple[int, ...] = field(
        default=4, metadata={"help": "bits X per term, or one width per term"}
    )
    terms: int = field(default=1, metadata={"help": f"terms T stored, 1-{MAX_TERMS}"})
    group_size: int | None = field(
        default=64, metadata={"help": "inputs per scale; None: per output channel"}
    )
    symmetric: bool = field(default=False, metadata={"help": "symmetric first term (no bias)"})
    clip: str = field(default="laplace", metadata={"help": "saturation range (used with outliers)"})
    outlier_fraction: float = field(default=0.0, metadata={"help": "share of each row kept exactly (M_sa)"})
    tol: float = field(default=0.0, metadata={"help": "stop a tensor once max |residual| < tol"})
    series: str = field(default="nested", metadata={"help": "how later terms refine earlier ones"})
    fit: str = field(default="optimized", metadata={"help": "first-term fit of a nested series"})
    # the activation series (W·A: activations expanded at run time, per token; absent = None = A16)
    act_bits: int | None = field(
        default=None,
        metadata={
            "help": "bits per activation term (None: activations stay float, A16)",
            "cli": {"type": int},
        },
    )
    act_terms: int = field(
        default=1, metadata={"help": f"activation terms T_a, 1-{MAX_ACT_TERMS}", "cli": {"type": int}}
    )
    act_tol: float = field(
        default=0.0,
        metadata={
            "help": "a token stops adding activation terms once max |residual| < act_tol",
            "cli": {"type": float},
        },
    )
    act_outliers: int = field(
        default=4,
        metadata={"help": "largest-|value| activations per token kept exactly (A_sa)", "cli": {"type": int}},
    )
    dual_scale: bool = field(
        default=False, metadata={"help": "SINQ-style per-input-column scales (Sinkhorn) before the series"}
    )
    rotation: str | None = field(
        default=None, metadata={"help": "hadamard: rotate the input channels first (block FWHT)"}
    )
    zero_bits: int = field(
        default=16,
        metadata={
            "help": "bits of each group's stored bias: 16 (float16), 8 (int8 code, steps of scale_1/2^(8-X)) "
            "or the first term's width X (integer zero point, steps of scale_1, as GPTQ/AWQ)",
            "cli": {"type": int, "choices": ZERO_BITS},
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.bits, list):
            object.__setattr__(self, "bits", tuple(self.bits))
        check_settings("ExpansionSettings", self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def term_bits(self) -> tuple[int, ...]:
        return tuple(self.bits) if isinstance(self.bits, tuple) else (self.bits,) * self.terms


def check_settings(owner: str, values: dict[str, Any]) -> None:
    """Raise ``ValueError`` ``"<owner>.<field>=<value> is invalid; allowed: ..."`` for the first bad setting."""

    def check(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{owner}.{name}={values[name]!r} is invalid; allowed: {allowed}")

    terms, bits = values["terms"], values["bits"]
    check(_is_int(terms) and 1 <= terms <= MAX_TERMS, "terms", f"an int from 1 to {MAX_TERMS}")
    check(values["series"] in SERIES_RULES, "series", f"one of {SERIES_RULES}")
    check(values["fit"] in FIT_METHODS, "fit", f"one of {FIT_METHODS}")
    seq = isinstance(bits, (list, tuple))
    widths = list(bits) if seq else [bits]
    check(
        all(_is_int(b) and b in SUPPORTED_BITS for b in widths) and (not seq or len(widths) == terms),
        "bits",
        f"one of {SUPPORTED_BITS}, or a list of {terms} of them (one per term)",
    )
    check(
        values["series"] == "nested" or len(set(widths)) == 1,
        "bits",
        "a single width with series='legacy' (mixed widths need series='nested')",
    )
    gs = values["group_size"]
    check(
        gs is None or (_is_int(gs) and 16 <= gs <= 65536),
        "group_size",
        "None (per channel) or an int from 16 to 65536",
    )
    check(isinstance(values["symmetric"], bool), "symmetric", "True or False")
    check(values["clip"] in CLIP_METHODS, "clip", f"one of {CLIP_METHODS}")
    frac = values["outlier_fraction"]
    check(
        _is_real(frac) and 0 <= frac <= MAX_OUTLIER_FRACTION,
        "outlier_fraction",
        f"a number from 0 to {MAX_OUTLIER_FRACTION}",
    )
    check(_is_real(values["tol"]) and values["tol"] >= 0, "tol", "a finite number >= 0")
    act = {k: values[k] for k in ACT_SETTINGS}
    ok_bits = act["act_bits"] is None or (_is_int(act["act_bits"]) and act["act_bits"] in ACT_BITS)
    check(ok_bits, "act_bits", f"None (A16) or one of {ACT_BITS}")
    terms_a = act["act_terms"]
    check(
        _is_int(terms_a) and 1 <= terms_a <= MAX_ACT_TERMS, "act_terms", f"an int from 1 to {MAX_ACT_TERMS}"
    )
    check(_is_real(act["act_tol"]) and act["act_tol"] >= 0, "act_tol", "a finite number >= 0")
    k = act["act_outliers"]
    check(_is_int(k) and 0 <= k <= MAX_ACT_OUTLIERS, "act_outliers", f"an int from 0 to {MAX_ACT_OUTLIERS}")
    check(isinstance(values["dual_scale"], bool), "dual_scale", "True or False")
    check(values["rotation"] in ROTATIONS, "rotation", f"one of {ROTATIONS}")
    zb = values["zero_bits"]
    check(_is_int(zb) and zb in ZERO_BITS, "zero_bits", f"one of {ZERO_BITS}")
    check(
        zb == 16 or values["series"] == "nested",
        "zero_bits",
        "16 with series='legacy' (an int8 bias needs series='nested')",
    )
    first = widths[0]
    check(
        zb in (16, 8, first),
        "zero_bits",
        f"16, 8 or the first term's width {first} (an integer zero point in steps of scale_1)",
    )


ACT_SETTINGS = ("act_bits", "act_terms", "act_tol", "act_outliers")
SETTING_NAMES = tuple(f.name for f in fields(ExpansionSettings))
DEFAULTS = ExpansionSettings()


# ---------------------------------------------------------------------------- the saved quantization_config

CONFIG_VERSION = 4
"""Format of a saved ``quantization_config`` (its ``version`` key).

1 (no ``version`` key: fpxint_hf 0.1 up to the format with ``series``): a key it lacks takes the value of
``FORMAT_DEFAULTS[1]``, else of ``CONFIG_DEFAULTS``; the layers are the ``nn.Linear`` modules that
``modules_to_not_convert`` does not match.  2: ``quantized_modules`` names every converted layer and
``layer_group_size`` the group size of every layer where it differs from ``group_size``.  3: the same tensors;
the defaults of a config without arguments changed (``FORMAT_DEFAULTS[2]`` holds format 2's).  4: the same
tensors; ``terms`` and ``zero_bits`` left unset follow ``config_terms`` and ``config_zero_bits`` (format 3 meant 1
and 16)."""
CONFIG_VERSIONS = (1, 2, 3, CONFIG_VERSION)

CONFIG_DEFAULTS: dict[str, Any] = {
    **DEFAULTS.as_dict(),
    "modules_to_not_convert": None,  # module names or patterns kept in full precision (when quantizing)
    "forward_mode": "auto",
    "bits_budget": None,
    "layer_terms": None,  # {module name: terms} where it differs from ``terms`` (written by a bits budget)
    "act_proxy": "probe",
    "second_order": False,  # GPTQ's error feedback with the probe's input covariance (act_proxy="probe" only)
    "quantized_modules": None,  # the converted layers' names (written when quantizing; format 2)
    "layer_group_size": None,  # {module name: group size} where it differs from ``group_size`` (format 2)
    "compute_dtype": None,  # the dtype a reload without dtype= runs in (None: chosen when quantizing)
    "version": CONFIG_VERSION,
}
"""Every field of ``FPxINTConfig`` with its default (the expansion settings first)."""
CONFIG_DEFAULTS["zero_bits"] = None  # FPxINTConfig's: resolved by ``config_zero_bits``
CONFIG_DEFAULTS["terms"] = None  # FPxINTConfig's: resolved by ``config_terms`` (the default recipe)

ACT_PROXIES = ("norm", "probe", None)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def check_quantization_config(owner: str, values: Mapping[str, Any]) -> None:
    """The one check of a ``quantization_config``'s fields (``CONFIG_DEFAULTS``' keys but ``forward_mode``), used by
    ``FPxINTConfig.post_init`` (transformers) and ``FPxINTvLLMConfig`` (vLLM): raise ``ValueError``
    ``"<owner>.<field>=<value> is invalid; allowed: ..."`` for the first bad field."""

    def check(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{owner}.{name}={values[name]!r} is invalid; allowed: {allowed}")

    check_settings(owner, {name: values[name] for name in SETTING_NAMES})
    check(values["act_proxy"] in ACT_PROXIES, "act_proxy", f"one of {ACT_PROXIES}")
    second = values["second_order"]
    check(isinstance(second, bool), "second_order", "True or False (used with act_proxy='probe')")
    dtype = values["compute_dtype"]
    check(dtype is None or dtype in COMPUTE_DTYPES, "compute_dtype", f"None or one of {COMPUTE_DTYPES}")
    budget, terms = values["bits_budget"], values["terms"]
    check(
        budget is None or (_is_real(budget) and 1 <= budget <= 64 and terms >= 2),
        "bits_budget",
        "None, or a number of bits per weight from 1 to 64 with terms >= 2",
    )
    layer_terms = values["layer_terms"]
    check(
        layer_terms is None
        or (
            isinstance(layer_terms, dict)
            and all(isinstance(k, str) and _is_int(v) and 1 <= v <= terms for k, v in layer_terms.items())
        ),
        "layer_terms",
        f"None or a dict of module name -> terms from 1 to {terms}",
    )
    for name in ("modules_to_not_convert", "quantized_modules"):
        names = values[name]
        ok = names is None or (isinstance(names, list) and all(isinstance(m, str) for m in names))
        check(ok, name, "None or a list of module names")
    groups = values["layer_group_size"]
    check(
        groups is None
        or (
            isinstance(groups, dict)
            and all(isinstance(k, str) and _is_int(v) and v >= 1 for k, v in groups.items())
        ),
        "layer_group_size",
        "None or a dict of module name -> group size >= 1",
    )
    check(values["version"] in CONFIG_VERSIONS, "version", f"one of {CONFIG_VERSIONS}")


FORMAT_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"series": "legacy", "fit": "minmax", "act_proxy": None, "second_order": False},
    2: {"terms": 2, "group_size": 128, "act_proxy": "norm", "second_order": False},
    3: {"zero_bits": 16, "terms": 1},
}
"""What a config of an older format means by a key it lacks (format 1: the rule of fpxint_hf 0.1; format 2: the
defaults of fpxint_hf before format 3; format 3: one term and a float16 bias)."""

CONFIG_ZERO_BITS = 8
"""``FPxINTConfig``'s bias width when ``zero_bits`` is not given, for one term or a budget recipe: an int8 code in
steps of ``scale_1·2^(X_1-8)``, 0.125 bits per weight fewer than a float16 bias at group 64 and, measured at
group 64 with the probe and one term, no worse (KL from FP: SmolLM2 0.0695 against 0.0711, Qwen2.5-Coder-1.5B
0.0332 against 0.0342; docs/default.md).  A 4+4 series everywhere keeps the float16 bias: the code's step is its
finest step, and rounding the bias to it tripled its KL on SmolLM2 (0.00108 against 0.00035)."""


RECIPE_TERMS = 2
"""Terms of ``FPxINTConfig``'s default recipe (``terms`` not given, one width ``bits``): a second term where the
bits budget (``RECIPE_MARGIN``) says it pays."""
RECIPE_MARGIN = 0.5
"""The default recipe's ``bits_budget``: the first term's width plus this many bits per weight (4.5 at 4 bits,
what one 4-bit term with a float16 scale and zero at group 64 costs).  Measured at group 64 with the probe, the
4-bit recipe's KL from FP was 0.0250 on Qwen2.5-Coder-1.5B against 0.0332 for one term everywhere (the extra
terms went to q/k/v in 13 of 28 blocks) and 0.0639 against 0.0695 on SmolLM2 (docs/default.md)."""


def config_terms(
    bits: int | list[int] | tuple[int, ...], terms: int | None, bits_budget: float | None
) -> tuple[int, float | None]:
    """``(terms, bits_budget)`` as ``FPxINTConfig`` stores them.  ``terms=None`` (not given): one term per width
    of a list ``bits``; with one width, the default recipe: ``RECIPE_TERMS`` terms under a budget of
    ``bits + RECIPE_MARGIN`` bits per weight (or the ``bits_budget`` given).  A given ``terms`` is kept, with the
    ``bits_budget`` given (None: every layer keeps every term)."""
    if terms is not None:
        return terms, bits_budget
    if isinstance(bits, (list, tuple)):
        return len(bits), bits_budget
    if not _is_int(bits):
        return 1, bits_budget  # invalid bits: ExpansionSettings' check names them
    return RECIPE_TERMS, (bits + RECIPE_MARGIN if bits_budget is None else bits_budget)


def config_zero_bits(
    zero_bits: int | None, series: str, terms: int = 1, bits_budget: float | None = None
) -> int | None:
    """``zero_bits`` as ``FPxINTConfig`` stores it: ``None`` (not given) is ``CONFIG_ZERO_BITS`` for a nested series
    of one term or under a bits budget, and 16 for a series of several terms in every layer or the legacy rule (its
    bias is float16 only); any other value is kept (validated later)."""
    if zero_bits is not None:
        return zero_bits
    if series == "legacy" or (_is_int(terms) and terms > 1 and bits_budget is None):
        return 16
    return CONFIG_ZERO_BITS


def read_quantization_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``FPxINTConfig`` field of a saved ``quantization_config`` (``quant_method`` dropped), missing keys
    filled with the defaults of its format ``version`` (see ``CONFIG_VERSION``).  Unknown keys are kept (the
    caller reports them); values are validated by the caller (``FPxINTConfig.post_init``)."""
    version = saved.get("version", 1)
    if version not in CONFIG_VERSIONS:
        raise ValueError(
            f"quantization_config.version={version!r} is invalid; allowed: one of {CONFIG_VERSIONS} "
            "(a newer fpxint_hf wrote this checkpoint?)"
        )
    base = dict(CONFIG_DEFAULTS)
    for old in sorted(FORMAT_DEFAULTS, reverse=True):  # format 1 also means format 2's defaults, then its own
        if version <= old:
            base.update(FORMAT_DEFAULTS[old])
    out = {**base, **{k: v for k, v in saved.items() if k != "quant_method"}, "version": version}
    terms, budget = config_terms(out["bits"], out["terms"], out["bits_budget"])
    zero_bits = config_zero_bits(out["zero_bits"], out["series"], terms, budget)
    return {**out, "terms": terms, "bits_budget": budget, "zero_bits": zero_bits}
