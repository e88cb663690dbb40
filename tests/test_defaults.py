"""Every default of an expansion setting comes from ``settings.DEFAULTS`` (the dataclass), wherever it is
spelled: a literal that drifts from it (the low-level code once defaulted to the legacy series while users got the
nested one) fails here.  vLLM's reading of the same defaults is checked in tests/test_vllm.py."""

from __future__ import annotations

import inspect

import pytest

from fpxint_hf import FPxINTConfig
from fpxint_hf.expansion import expand
from fpxint_hf.linear import FPxINTLinear
from fpxint_hf.settings import (
    CONFIG_DEFAULTS,
    CONFIG_ZERO_BITS,
    DEFAULTS,
    FORMAT_DEFAULTS,
    SETTING_NAMES,
    read_quantization_config,
)

# every callable whose signature repeats expansion settings as keyword defaults (the public config's, kept explicit)
SIGNATURES = {
    "FPxINTConfig.__init__": FPxINTConfig.__init__,
}


@pytest.mark.parametrize("where", list(SIGNATURES))
def test_signature_defaults_are_the_dataclass_defaults(where):
    params = inspect.signature(SIGNATURES[where]).parameters
    shared = [n for n in SETTING_NAMES if n in params]
    assert len(shared) >= 6, (where, shared)  # the settings really are repeated there
    drift = {n: params[n].default for n in shared if params[n].default != getattr(DEFAULTS, n)}
    # the deliberate differences: the config's bias width and terms, resolved by settings.config_zero_bits and
    # config_terms (the default recipe; the library's expand keeps one term and the float16 bias every rule stores)
    assert drift == {"terms": None, "zero_bits": None}, (
        f"{where} defaults differ from settings.DEFAULTS: {drift}"
    )
    assert FPxINTConfig().zero_bits == CONFIG_ZERO_BITS != DEFAULTS.zero_bits


def test_expand_and_the_layer_take_the_dataclass_itself():
    """``expand`` and ``FPxINTLinear`` repeat no setting in their signatures: one settings object (``DEFAULTS`` when
    not given) and its fields as overrides, so a new setting needs no edit there."""
    for fn in (expand, FPxINTLinear.__init__):
        params = inspect.signature(fn).parameters
        assert not [n for n in SETTING_NAMES if n in params], fn
    assert inspect.signature(expand).parameters["settings"].default is DEFAULTS
    assert FPxINTLinear(128, 8).spec.settings == DEFAULTS


def test_from_linear_defaults_are_the_dataclass():
    assert inspect.signature(FPxINTLinear.from_linear).parameters["settings"].default is DEFAULTS


def test_config_defaults_are_the_reader_defaults():
    params = inspect.signature(FPxINTConfig.__init__).parameters
    assert {n: params[n].default for n in CONFIG_DEFAULTS} == CONFIG_DEFAULTS
    assert set(FPxINTConfig().to_dict()) == {"quant_method", *CONFIG_DEFAULTS}


def test_reader_fills_each_format_with_its_defaults():
    recipe = {"zero_bits": CONFIG_ZERO_BITS, "terms": 2, "bits_budget": 4.5}  # settings.config_terms
    assert read_quantization_config({"version": 4}) == {**CONFIG_DEFAULTS, **recipe}
    assert read_quantization_config({"version": 4, "series": "legacy"})["zero_bits"] == 16
    format3 = {**CONFIG_DEFAULTS, **FORMAT_DEFAULTS[3], "version": 3}
    assert (
        read_quantization_config({"version": 3}) == format3 and format3["zero_bits"] == 16
    )  # before format 4
    format2 = {**format3, **FORMAT_DEFAULTS[2], "version": 2}
    assert read_quantization_config({"version": 2}) == format2
    assert format2["terms"] == 2 and format2["act_proxy"] == "norm"  # what fpxint_hf wrote before format 3
    assert read_quantization_config({}) == {**format2, **FORMAT_DEFAULTS[1], "version": 1}
    for saved in ({}, {"version": 2}, {"version": 3}, {"version": 4}, {"series": "nested", "bits": [4, 2]}):
        assert FPxINTConfig.from_dict(saved).to_dict() == {
            "quant_method": "fpxint",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in read_quantization_config(saved).items()},
        }


def test_registries_are_the_vocabulary():
    """The forward modes are the module's own two, the backends registry's, and ``auto``; the fits of
    ``settings.FIT_METHODS`` are those of the first-term fit registry."""
    from fpxint_hf import backends
    from fpxint_hf.expansion import FIRST_TERM_FITS
    from fpxint_hf.linear import FORWARD_MODES, MODULE_MODES
    from fpxint_hf.settings import FIT_METHODS

    assert FORWARD_MODES == (*MODULE_MODES, *backends.BACKENDS, "auto")
    assert tuple(FIRST_TERM_FITS) == FIT_METHODS
