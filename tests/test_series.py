"""``series.FPxINTSeries``: one layer's stored series as an object (from_weight, state/from_state, truncate,
dequantize, prepare), the one object behind ``FPxINTLinear``, the bits budget and the vLLM plugin; and the user's
``FPxINTConfig``, which loading leaves as it was, so it can be used again."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fpxint_hf import ExpandOptions, FPxINTConfig, FPxINTLinear, FPxINTSeries, expand
from fpxint_hf.expansion import original_weight, relative_error
from fpxint_hf.series import SeriesSpec
from fpxint_hf.settings import ExpansionSettings


def spec(**settings) -> SeriesSpec:
    return SeriesSpec.for_layer(ExpansionSettings(**settings), 48, 192)


def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(48, 192) * 0.05


@pytest.mark.parametrize(
    "settings",
    [
        dict(bits=4, terms=3, group_size=64),
        dict(bits=(4, 2), terms=2, group_size=None, symmetric=True),
        dict(bits=4, terms=2, group_size=64, zero_bits=8, outlier_fraction=0.02, dual_scale=True),
        dict(bits=3, terms=2, group_size=64, series="legacy", fit="minmax", rotation="hadamard"),
    ],
)
def test_state_round_trips_and_matches_expand(settings):
    s = FPxINTSeries.from_weight(weight(), spec(**settings))
    assert set(s.state()) == set(s.spec.layout())
    for name, t_spec in s.spec.layout().items():
        assert tuple(s.state()[name].shape) == t_spec.shape and s.state()[name].dtype == t_spec.dtype, name
    again = FPxINTSeries.from_state(s.spec, s.state())
    direct = original_weight(expand(weight(), s.spec.expand_settings()))
    assert torch.equal(again.dequantize(), direct)  # the stored tensors are the whole series
    layer = FPxINTLinear(192, 48, spec=s.spec).load_series(again)
    assert torch.equal(layer.dequantize(), direct)
    assert all(torch.equal(layer.to_series().state()[n], t) for n, t in s.state().items())


def test_truncate_keeps_the_first_terms():
    s = FPxINTSeries.from_weight(weight(), spec(bits=4, terms=3, group_size=64))
    for k in (1, 2):
        short = s.truncate(k)
        assert short.spec.terms == k and short.terms_used == k
        assert torch.equal(short.dequantize(), s.dequantize(k))
        assert short.stored_bits() < s.stored_bits()
    with pytest.raises(ValueError, match="cannot keep 4 terms"):
        s.truncate(4)


def test_prepare_gives_the_dequantized_series_to_a_backend():
    s = FPxINTSeries.from_weight(weight(), spec(bits=4, terms=2, group_size=64))
    dense = s.prepare("dense", torch.float32, "cpu", terms=1)
    assert dense.terms == 1 and torch.equal(dense.weight, s.series_weight(1))


def test_from_state_refuses_tensors_of_another_layout():
    s = FPxINTSeries.from_weight(weight(), spec(bits=4, terms=2, group_size=64))
    with pytest.raises(ValueError, match="are not those of"):
        FPxINTSeries.from_state(s.spec, {k: v for k, v in s.state().items() if k != "zero"})
    wrong = {**s.state(), "scale": s.state()["scale"][:, :1]}
    with pytest.raises(ValueError, match=r"scale \[48, 1\] does not match \[48, 3\]"):
        FPxINTSeries.from_state(s.spec, wrong)


def test_group_size_is_resolved_once_per_layer():
    with pytest.warns(UserWarning, match="group_size=128 does not divide in_features=192"):
        sp = spec(bits=4, group_size=128)
    assert sp.group_size == 64 and sp.expand_settings().group_size == 64
    assert SeriesSpec.for_layer(ExpansionSettings(group_size=128), 48, 192, group_size=32).group_size == 32
    assert spec(group_size=None).expand_settings().group_size is None


def test_expand_takes_settings_and_options():
    w = weight()
    base = ExpansionSettings(bits=4, terms=1, group_size=64)
    assert torch.equal(expand(w, base).codes, expand(w, bits=4, terms=1, group_size=64).codes)
    importance = torch.linspace(0.1, 10.0, 192)
    weighted = expand(w, base, ExpandOptions(importance=importance))
    assert not torch.equal(weighted.codes, expand(w, base).codes)  # the options change the fit
    with pytest.raises(ValueError, match=r"ExpansionSettings\.bits=5 is invalid"):
        expand(w, base, bits=5)
    assert relative_error(original_weight(weighted), w) < 0.2


def test_the_users_config_is_unchanged_by_loading_and_can_be_reused(make_fp_dir):
    """Quantize-on-load twice with one ``FPxINTConfig`` (a bits budget, which writes ``layer_terms``): the config
    the user holds keeps every field, and the second load gives the first's tensors."""
    fp = make_fp_dir("llama")
    cfg = FPxINTConfig(bits=4, terms=2, group_size=32, bits_budget=6.0, act_proxy="norm")
    before = cfg.to_dict()
    first = AutoModelForCausalLM.from_pretrained(fp, quantization_config=cfg)
    assert cfg.to_dict() == before
    assert first.config.quantization_config.quantized_modules  # the model's copy records its layers
    second = AutoModelForCausalLM.from_pretrained(fp, quantization_config=cfg)
    assert cfg.to_dict() == before
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
