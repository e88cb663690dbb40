"""``FPxINTConfig``: validation on construction, serialisation round trips, registration, group fallback."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from torch import nn
from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

import fpxint_hf
from fpxint_hf import FPxINTConfig, FPxINTHfQuantizer, FPxINTLinear
from fpxint_hf.expansion import resolve_group_size
from fpxint_hf.hf.replace import make_fpxint_linear
from fpxint_hf.settings import CONFIG_DEFAULTS

# field -> (bad values, words of the allowed range that the message must show)
INVALID = {
    "bits": ([1, 5, 16, "4", True, 4.0, None], ["(2, 3, 4, 8)"]),
    "terms": ([0, 9, 2.5, True, "2"], ["1", "8"]),
    "group_size": ([0, 8, 15, 100000, "x", 32.0, True], ["None", "16", "65536"]),
    "tol": ([-1, -1e-9, math.nan, math.inf, -math.inf, "0", None], [">= 0", "finite"]),
    "outlier_fraction": ([-0.1, 0.5, 0.11, math.nan, math.inf, True, "0.01", None], ["0", "0.1"]),
    "clip": (["foo", "Laplace", "", None, 1], ["laplace", "search", "minmax"]),
    "symmetric": (["yes", 1, 0, None, "True"], ["True", "False"]),
    "forward_mode": (["fast", "Reference", None], ["reference", "terms"]),
    "modules_to_not_convert": (["lm_head", ("lm_head",), [1], ["lm_head", None]], ["None", "list"]),
}

CASES = [(field, value, words) for field, (values, words) in INVALID.items() for value in values]

VALID = {
    "bits": [2, 3, 4, 8],
    "terms": [1, 2, 8],
    "group_size": [None, 16, 32, 128, 65536],
    "tol": [0, 0.0, 1e-6, 3],
    "outlier_fraction": [0, 0.0, 0.02, 0.1],
    "clip": ["laplace", "search", "minmax"],
    "symmetric": [True, False],
    "forward_mode": ["reference", "terms"],
    "modules_to_not_convert": [None, [], ["lm_head", "mlp.down_proj"]],
}


@pytest.mark.parametrize(("field", "value", "words"), CASES, ids=[f"{f}={v!r}" for f, v, _ in CASES])
def test_invalid_field_rejected_on_construction(field, value, words):
    with pytest.raises(ValueError) as info:
        FPxINTConfig(**{field: value})
    message = str(info.value)
    assert f"{field}={value!r}" in message  # names the field and the offending value
    for word in words:  # and the allowed range
        assert word in message, (word, message)


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, vs in VALID.items() for v in vs], ids=lambda x: repr(x)
)
def test_valid_field_accepted(field, value):
    cfg = FPxINTConfig(**{field: value})
    assert getattr(cfg, field) == value
    assert cfg.quant_method == "fpxint"


def test_defaults():
    cfg = FPxINTConfig()
    # the default recipe: a second term where the bits budget says it pays, within bits + 0.5 bits per weight
    assert (cfg.bits, cfg.terms, cfg.group_size, cfg.symmetric) == (4, 2, 64, False)
    assert (cfg.clip, cfg.outlier_fraction, cfg.tol, cfg.forward_mode) == ("laplace", 0.0, 0.0, "auto")
    assert (cfg.series, cfg.fit, cfg.bits_budget, cfg.layer_terms) == ("nested", "optimized", 4.5, None)
    assert (FPxINTConfig(bits=3).terms, FPxINTConfig(bits=3).bits_budget) == (2, 3.5)
    assert (FPxINTConfig(terms=1).terms, FPxINTConfig(terms=1).bits_budget) == (1, None)
    assert (FPxINTConfig(terms=2).terms, FPxINTConfig(terms=2).bits_budget) == (2, None)  # the paper's T=2
    assert (FPxINTConfig(bits=[4, 2]).terms, FPxINTConfig(bits=[4, 2]).bits_budget) == (2, None)
    assert FPxINTConfig(bits_budget=5.0).terms == 2
    assert (cfg.act_proxy, cfg.second_order, cfg.version, cfg.zero_bits) == ("probe", False, 4, 8)
    assert cfg.modules_to_not_convert is None
    assert FPxINTConfig(terms=1).nominal_bits_per_weight() == 4  # + 24/64 (float16 scale, int8 bias): 4.375
    assert FPxINTConfig(series="legacy").zero_bits == 16  # the legacy rule's bias is float16 only
    assert (FPxINTConfig(terms=1).zero_bits, FPxINTConfig(terms=2).zero_bits) == (8, 16)  # 4+4: float16 bias
    assert FPxINTConfig(terms=3, bits_budget=6.0).zero_bits == 8
    assert FPxINTConfig(zero_bits=16).zero_bits == 16


def test_unknown_kwarg_rejected():
    with pytest.raises(ValueError, match=r"unknown FPxINTConfig field.*group_sizes") as info:
        FPxINTConfig(group_sizes=64)
    assert "group_size" in str(info.value).split("allowed", 1)[1]  # lists the real field names


def test_wrong_quant_method_rejected():
    with pytest.raises(ValueError, match=r"quant_method='gptq'.*'fpxint'"):
        FPxINTConfig(quant_method="gptq")
    assert FPxINTConfig(quant_method="fpxint").quant_method == "fpxint"


NON_DEFAULT = dict(
    bits=3,
    terms=4,
    group_size=None,
    symmetric=True,
    clip="search",
    outlier_fraction=0.05,
    tol=1e-4,
    modules_to_not_convert=["mlp.down_proj"],
    forward_mode="terms",
    series="legacy",
    fit="minmax",
    dual_scale=True,
    rotation="hadamard",
    bits_budget=9.0,
    layer_terms={"model.layers.0.mlp.down_proj": 2},
    act_proxy=None,
    second_order=True,
    quantized_modules=["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"],
    layer_group_size={"model.layers.0.mlp.up_proj": 64},
    version=1,
    compute_dtype="float32",
    act_bits=4,
    act_terms=3,
    act_tol=1e-4,
    act_outliers=0,
)  # every field but zero_bits, whose 8 needs series="nested" (the "int8 bias" case below)
INT8_BIAS = dict(bits=[3, 2], terms=2, zero_bits=8, bits_budget=3.5)


def test_non_default_covers_every_field():
    assert {*NON_DEFAULT, *INT8_BIAS} == set(CONFIG_DEFAULTS)
    assert all(CONFIG_DEFAULTS[k] != v for k, v in {**NON_DEFAULT, **INT8_BIAS}.items() if k != "terms")


@pytest.mark.parametrize(
    "kwargs",
    [{}, NON_DEFAULT, dict(bits=8, terms=1, group_size=64), INT8_BIAS],
    ids=["default", "all", "some", "int8 bias"],
)
def test_dict_round_trip(kwargs):
    cfg = FPxINTConfig(**kwargs)
    d = cfg.to_dict()
    assert d["quant_method"] == "fpxint"
    assert set(d) == {"quant_method", *CONFIG_DEFAULTS}
    again = FPxINTConfig.from_dict(d)
    assert isinstance(again, FPxINTConfig)
    assert again.to_dict() == d
    assert again == cfg
    # through JSON, as in config.json
    from_json = FPxINTConfig.from_dict(json.loads(cfg.to_json_string()))
    assert from_json.to_dict() == d


def test_old_config_json_loads_as_legacy_and_new_fields_are_validated():
    """A config.json of fpxint_hf 0.1 has no ``series``/``fit``: it must reload with the rule its tensors used."""
    old = {"quant_method": "fpxint", "bits": 4, "terms": 2, "group_size": 128, "symmetric": False}
    cfg = FPxINTConfig.from_dict(old)
    assert (cfg.series, cfg.fit, cfg.act_proxy) == ("legacy", "minmax", None)
    assert FPxINTConfig.from_dict({**old, "series": "nested", "fit": "optimized"}).series == "nested"
    # format 2 (an explicit version): a missing key takes today's default, not the legacy one
    new = FPxINTConfig.from_dict({**old, "version": 2})
    assert (new.series, new.fit, new.act_proxy) == ("nested", "optimized", "norm")
    assert FPxINTConfig().version == 4 and cfg.version == 1
    assert (
        FPxINTConfig.from_dict({**old, "version": 3, "series": "nested"}).zero_bits == 16
    )  # format 3's bias
    with pytest.raises(ValueError, match=r"quantization_config\.version=5 is invalid"):
        FPxINTConfig.from_dict({**old, "version": 5})
    assert FPxINTConfig(bits=[4, 2], terms=2).term_bits == (4, 2)
    assert FPxINTConfig(bits=[4, 2], terms=2).nominal_bits_per_weight() == 6
    for kwargs, field in [
        (dict(bits=[4, 2], terms=3), "bits"),
        (dict(bits=[4, 5], terms=2), "bits"),
        (dict(bits=[4, 2], terms=2, series="legacy"), "bits"),
        (dict(series="v2"), "series"),
        (dict(fit="best"), "fit"),
        (dict(bits_budget=5.0, terms=1), "bits_budget"),
        (dict(bits_budget=0.5), "bits_budget"),
        (dict(layer_terms={"a": 3}, terms=2), "layer_terms"),
        (dict(act_proxy="activations"), "act_proxy"),
    ]:
        with pytest.raises(ValueError, match=rf"FPxINTConfig\.{field}="):
            FPxINTConfig(**kwargs)


def test_auto_quantization_config_builds_fpxint():
    d = FPxINTConfig(**NON_DEFAULT).to_dict()
    cfg = AutoQuantizationConfig.from_dict(dict(d))
    assert type(cfg) is FPxINTConfig
    assert cfg.to_dict() == d
    assert type(AutoHfQuantizer.from_config(cfg)) is FPxINTHfQuantizer


def test_auto_quantization_config_validates():
    with pytest.raises(ValueError, match=r"bits=5"):
        AutoQuantizationConfig.from_dict({"quant_method": "fpxint", "bits": 5})
    with pytest.raises(ValueError, match=r"group_sizes"):
        AutoQuantizationConfig.from_dict({"quant_method": "fpxint", "group_sizes": 64})


def test_register_is_idempotent():
    fpxint_hf.register()
    fpxint_hf.register()
    assert type(AutoQuantizationConfig.from_dict({"quant_method": "fpxint"})) is FPxINTConfig


# --------------------------------------------------------------------------- group-size fallback


@pytest.mark.parametrize(
    ("in_features", "group_size", "used"),
    [(96, 64, 32), (576, 128, 64), (80, 32, 16), (100, 64, 100), (144, 96, 16)],
)
def test_group_size_fallback_warns(in_features, group_size, used):
    with pytest.warns(
        UserWarning, match=rf"group_size={group_size} does not divide in_features={in_features}"
    ) as rec:
        assert resolve_group_size(in_features, group_size) == used
    assert ("per-channel" if used == in_features else f"group_size={used}") in str(rec[0].message)


@pytest.mark.parametrize(
    ("in_features", "group_size", "used"),
    [(96, 32, 32), (96, 48, 48), (64, 64, 64), (64, 128, 64), (96, None, 96)],
)
def test_group_size_no_fallback_no_warning(in_features, group_size, used):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_group_size(in_features, group_size) == used


def test_layer_with_96_inputs_uses_group_32():
    """A layer with in_features=96 under group_size=64 is built with groups of 32 (and says so)."""
    cfg = FPxINTConfig(bits=4, terms=2, group_size=64)
    with pytest.warns(UserWarning, match=r"in_features=96; using group_size=32"):
        module = make_fpxint_linear(nn.Linear(96, 8, bias=True), cfg, weight_placeholder=False)
    assert isinstance(module, FPxINTLinear)
    assert module.group_size == 32
    assert module.scale.shape == (8, 3) and module.zero.shape == (8, 3)
    assert "group_size=32" in module.extra_repr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_fpxint_linear(nn.Linear(128, 8), cfg, weight_placeholder=False).group_size == 64
