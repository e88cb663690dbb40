"""End-to-end transformers integration on tiny seeded LLaMA / Qwen2 models (CPU, no downloads).

Quantize-on-load, run-time truncation, the two forward paths, convergence in the number of terms, streaming,
reporting and ``device_map`` (save -> reload is in test_save_reload.py). Tolerances are scale-free (SNR in dB).
"""

from __future__ import annotations

import json
import math
import warnings
import weakref

import pytest
import torch
from checkpoint_helpers import fpxint_modules, saved_tensors
from torch import nn

import fpxint_hf
import fpxint_hf.hf.quantizer as quantizer_mod
import fpxint_hf.series as series_mod
from fpxint_hf import FPxINTLinear
from fpxint_hf.expansion import snr_db
from fpxint_hf.packing import packed_size

N_LAYERS = 2
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
QKV_BIAS = {"qwen2": ("q_proj", "k_proj", "v_proj")}


# --------------------------------------------------------------------------- quantize-on-load


@pytest.mark.parametrize("arch", ["llama", "llama_untied", "qwen2"])
def test_quantized_logits_close_to_fp(arch, make_fp_dir, load_fp, load_quantized, logits_of):
    fp_dir = make_fp_dir(arch)
    ref = logits_of(load_fp(fp_dir))
    q = load_quantized(fp_dir, bits=4, terms=2, group_size=32)
    snr = snr_db(logits_of(q), ref)
    print(f"\n[snr] {arch} bits=4 terms=2 group_size=32 vs FP: {snr:.1f} dB")
    assert snr >= 35.0


@pytest.mark.parametrize("arch", ["llama", "llama_untied", "qwen2"])
def test_only_decoder_linears_replaced(arch, make_fp_dir, load_fp, load_quantized):
    fp_dir = make_fp_dir(arch)
    fp = load_fp(fp_dir)
    q = load_quantized(fp_dir, bits=4, terms=2, group_size=32)

    modules = fpxint_modules(q)
    assert len(modules) == N_LAYERS * LINEARS_PER_LAYER
    plain_linears = [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    assert plain_linears == ["lm_head"]
    assert type(q.lm_head) is nn.Linear
    assert type(q.get_input_embeddings()) is nn.Embedding
    for name, module in modules.items():
        assert "weight" not in module._parameters, f"{name} kept its full-precision weight"
        assert not hasattr(module, "weight")
        assert all(t.device.type == "cpu" for t in module.state_dict().values())
        fp_linear = fp.get_submodule(name)
        assert (module.in_features, module.out_features) == (fp_linear.in_features, fp_linear.out_features)
        if fp_linear.bias is None:
            assert module.bias is None
        else:  # Qwen2 q/k/v biases are carried over unquantized
            assert torch.equal(module.bias, fp_linear.bias)
    assert {n.rsplit(".", 1)[-1] for n, m in modules.items() if m.bias is not None} == set(
        QKV_BIAS.get(arch, ())
    )

    # embeddings and lm_head untouched (bit-exact)
    assert torch.equal(q.get_input_embeddings().weight, fp.get_input_embeddings().weight)
    assert torch.equal(q.lm_head.weight, fp.lm_head.weight)
    tied = arch == "llama"
    assert q.config.tie_word_embeddings is tied
    assert (q.lm_head.weight.data_ptr() == q.get_input_embeddings().weight.data_ptr()) is tied


def test_modules_to_not_convert_keeps_layers(fp_model_dir, load_fp, load_quantized, logits_of):
    fp_dir = fp_model_dir
    q = load_quantized(fp_dir, bits=4, terms=2, group_size=32, modules_to_not_convert=["down_proj"])
    fp = load_fp(fp_dir)
    for i in range(N_LAYERS):
        down = q.model.layers[i].mlp.down_proj
        assert type(down) is nn.Linear
        assert torch.equal(down.weight, fp.model.layers[i].mlp.down_proj.weight)
    assert len(fpxint_modules(q)) == N_LAYERS * (LINEARS_PER_LAYER - 1)
    assert snr_db(logits_of(q), logits_of(fp)) >= 35.0


def test_group_size_fallback_in_model(make_fp_dir, load_fp, load_quantized, logits_of, tmp_path, caplog):
    """intermediate_size=96 with group_size=64: down_proj (96 inputs) falls back to groups of 32, with one readable
    warning (a log line, not a UserWarning per layer), and config.json records the size each layer used."""
    fp_dir = make_fp_dir("llama_untied", intermediate_size=96)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        q = load_quantized(fp_dir, bits=4, terms=2, group_size=64)
    assert not [w for w in caught if "does not divide" in str(w.message)]
    ours = [r.getMessage() for r in caplog.records if "does not divide" in r.getMessage()]
    assert ours == [
        f"FP=xINT: group_size=64 does not divide the inputs of {N_LAYERS} of {len(fpxint_modules(q))} layers, "
        "which use another group size (recorded per layer in layer_group_size): 96 inputs: groups of 32"
    ]
    for name, module in fpxint_modules(q).items():
        expected = 32 if name.endswith("down_proj") else 64
        assert module.group_size == expected, name
        assert module.scale.shape == (module.out_features, module.in_features // expected)
    assert snr_db(logits_of(q), logits_of(load_fp(fp_dir))) >= 35.0
    before = logits_of(q)
    q.save_pretrained(tmp_path / "q")
    with warnings.catch_warnings(record=True) as caught:  # layer_group_size is read back, not derived again
        warnings.simplefilter("always")
        reloaded = load_fp(tmp_path / "q")
    assert not [w for w in caught if "does not divide" in str(w.message)]
    assert reloaded.model.layers[0].mlp.down_proj.group_size == 32
    assert torch.equal(logits_of(reloaded), before)
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][
        "layer_group_size"
    ]
    assert recorded == {f"model.layers.{i}.mlp.down_proj": 32 for i in range(N_LAYERS)}


def test_a_group_size_that_fits_no_layer_is_refused(make_fp_dir, load_quantized):
    """group_size=48 divides neither 64 (hidden) nor 128 (intermediate) inputs: every layer would silently use
    another size, so quantizing refuses it, naming the sizes and one that fits."""
    with pytest.raises(ValueError) as err:
        load_quantized(make_fp_dir("llama"), bits=4, terms=1, group_size=48)
    assert str(err.value) == (
        f"FPxINTConfig.group_size=48 divides the inputs of none of the {N_LAYERS * LINEARS_PER_LAYER} layers to "
        "quantize (in_features 64, 128); choose a group size that divides them (e.g. 32, or None: one group per "
        "output channel)"
    )


# --------------------------------------------------------------------------- run-time truncation


@pytest.mark.parametrize("mode", ["reference", "terms"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_active_terms_equal_fewer_stored_terms(
    arch, mode, make_fp_dir, load_fp, load_quantized, logits_of, tmp_path
):
    """The legacy rule's first term does not depend on T, so truncating to k terms equals storing k terms."""
    fp_dir = make_fp_dir(arch)
    legacy = dict(bits=4, group_size=32, series="legacy", fit="minmax")
    full = fpxint_hf.set_forward_mode(load_quantized(fp_dir, terms=3, **legacy), mode)
    all_terms = logits_of(full)
    full.save_pretrained(tmp_path / "q3")
    reloaded = fpxint_hf.set_forward_mode(load_fp(tmp_path / "q3"), mode)
    for k in (1, 2):
        direct = logits_of(fpxint_hf.set_forward_mode(load_quantized(fp_dir, terms=k, **legacy), mode))
        fpxint_hf.set_active_terms(full, k)
        assert all(m.num_terms() == k for m in fpxint_modules(full).values())
        assert torch.equal(logits_of(full), direct), f"k={k}"
        fpxint_hf.set_active_terms(reloaded, k)  # one checkpoint, several precisions
        assert torch.equal(logits_of(reloaded), direct), f"k={k} (reloaded)"
    fpxint_hf.set_active_terms(full, None)
    assert torch.equal(logits_of(full), all_terms)
    with pytest.raises(ValueError, match="exceeds the 3 terms stored"):
        fpxint_hf.set_active_terms(full, 7)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="active terms"):
            fpxint_hf.set_active_terms(full, bad)


# --------------------------------------------------------------------------- forward paths


@pytest.mark.parametrize(
    "config",
    [
        dict(group_size=32, symmetric=False, outlier_fraction=0.0),
        dict(group_size=None, symmetric=True, outlier_fraction=0.02, clip="laplace"),
    ],
    ids=["g32_asym", "per_channel_sym_outliers"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_paths_agree(arch, dtype, config, make_fp_dir, load_fp, load_quantized, logits_of):
    fp_dir = make_fp_dir(arch)
    ref = logits_of(load_fp(fp_dir))  # float32 FP model
    q = load_quantized(fp_dir, dtype=dtype, bits=4, terms=3, **config)
    reference = logits_of(fpxint_hf.set_forward_mode(q, "reference"))
    assert all(m.forward_mode == "reference" for m in fpxint_modules(q).values())
    terms = logits_of(fpxint_hf.set_forward_mode(q, "terms"))
    assert all(m.forward_mode == "terms" for m in fpxint_modules(q).values())
    assert reference.dtype == terms.dtype == dtype
    between = snr_db(terms, reference)
    if dtype == torch.float32:
        print(f"\n[snr] {arch} fp32 {config}: terms vs reference path {between:.1f} dB")
        assert between >= 100.0, between
    else:
        s_ref, s_terms = snr_db(reference, ref), snr_db(terms, ref)
        print(f"\n[snr] {arch} bf16 {config}: reference {s_ref:.1f} dB, terms {s_terms:.1f} dB vs FP32")
        assert s_ref >= 30.0 and s_terms >= 30.0
        assert between >= 30.0
    with pytest.raises(ValueError, match="forward mode"):
        fpxint_hf.set_forward_mode(q, "fast")


def test_forward_mode_from_config(make_fp_dir, load_fp, load_quantized, logits_of, tmp_path):
    q = load_quantized(make_fp_dir("qwen2"), bits=4, terms=2, group_size=32, forward_mode="terms")
    assert all(m.forward_mode == "terms" for m in fpxint_modules(q).values())
    before = logits_of(q)
    q.save_pretrained(tmp_path / "q")
    reloaded = load_fp(tmp_path / "q")
    assert all(m.forward_mode == "terms" for m in fpxint_modules(reloaded).values())
    assert torch.equal(logits_of(reloaded), before)


# --------------------------------------------------------------------------- convergence in the terms


def test_error_never_rises_with_terms(fp_model_dir, load_fp, load_quantized, logits_of):
    fp_dir = fp_model_dir
    ref = logits_of(load_fp(fp_dir))
    snrs = []
    for terms in (1, 2, 3, 4):
        q = load_quantized(fp_dir, bits=4, terms=terms, group_size=32)
        snrs.append(snr_db(logits_of(q), ref))
    arch = fp_model_dir.name.split("-")[1]
    print(f"\n[snr] {arch} bits=4 group_size=32 terms 1..4 vs FP: " + ", ".join(f"{s:.1f}" for s in snrs))
    assert snrs[0] >= 15.0
    # each 4-bit term shrinks the residual grid 14x (~23 dB); demand +15 dB per term until the
    # logits approach float32 precision (~100+ dB), and never a drop after that
    for prev, nxt in zip(snrs[:-1], snrs[1:], strict=True):
        if prev < 100.0:
            assert nxt >= prev + 15.0, snrs
        else:
            assert nxt >= prev - 0.5, snrs


def test_error_saturates_at_fp32_precision_8bit(make_fp_dir, load_fp, load_quantized, logits_of):
    """8-bit terms shrink the error 254x (~48 dB) per term, so 3 terms reach float32 precision
    and a 4th cannot improve (nor worsen) the logits."""
    fp_dir = make_fp_dir("llama_untied")
    ref = logits_of(load_fp(fp_dir))
    snrs = [
        snr_db(logits_of(load_quantized(fp_dir, bits=8, terms=t, group_size=32)), ref) for t in (1, 2, 3, 4)
    ]
    print("\n[snr] llama_untied bits=8 terms 1..4 vs FP: " + ", ".join(f"{s:.1f}" for s in snrs))
    assert snrs[0] >= 40.0
    assert snrs[1] >= snrs[0] + 30.0
    assert snrs[2] >= snrs[1] + 30.0
    assert snrs[2] >= 120.0  # float32 precision reached
    assert snrs[3] >= snrs[2] - 0.5  # saturated: adding a term never makes it worse


# --------------------------------------------------------------------------- streaming


def test_quantize_on_load_streams_tensor_by_tensor(make_fp_dir, load_quantized, monkeypatch):
    """Each full-precision weight is dropped right after it is quantized: at every ``expand`` call,
    no FPxINTLinear holds a materialised (non-meta) weight, and no earlier FP weight is still alive."""
    fp_dir = make_fp_dir("qwen2")
    seen: dict = {"model": None, "calls": []}
    orig_convert = quantizer_mod.FPxINTQuantize.convert
    orig_expand = series_mod.expand  # FPxINTSeries.from_weight calls it

    def convert(self, input_dict, model=None, **kwargs):
        seen["model"] = model
        return orig_convert(self, input_dict, model=model, **kwargs)

    def expand(weight, *args, **kwargs):
        model = seen["model"]
        placeholders = [
            m._parameters["weight"]
            for m in model.modules()
            if isinstance(m, FPxINTLinear) and "weight" in m._parameters
        ]
        seen["calls"].append(
            {
                "materialised": sum(p.device.type != "meta" for p in placeholders),
                "placeholders": len(placeholders),
                "earlier_alive": sum(ref() is not None for ref in seen.setdefault("refs", [])),
                "weight": (tuple(weight.shape), weight.device.type),
            }
        )
        seen["refs"].append(weakref.ref(weight))
        return orig_expand(weight, *args, **kwargs)

    monkeypatch.setattr(quantizer_mod.FPxINTQuantize, "convert", convert)
    monkeypatch.setattr(series_mod, "expand", expand)
    # the path without the probe (the probe's own pass holds one block: tests/test_second_order.py)
    q = load_quantized(fp_dir, bits=4, terms=2, group_size=32, act_proxy="norm")

    n = N_LAYERS * LINEARS_PER_LAYER
    calls = seen["calls"]
    assert len(calls) == n  # one expand per linear weight
    assert [c["materialised"] for c in calls] == [0] * n
    assert [c["earlier_alive"] for c in calls] == [0] * n
    assert [c["placeholders"] for c in calls] == list(range(n, 0, -1))  # placeholders dropped one by one
    assert all(c["weight"][1] == "cpu" for c in calls)
    assert sum(ref() is not None for ref in seen["refs"]) == 0
    assert not any("weight" in m._parameters for m in fpxint_modules(q).values())
    assert not any(
        k.endswith(".weight") for k in fpxint_modules(q)["model.layers.0.self_attn.q_proj"].state_dict()
    )


# --------------------------------------------------------------------------- reporting


@pytest.mark.parametrize(
    "config",
    [
        dict(bits=4, terms=2, group_size=32),
        dict(bits=3, terms=3, group_size=None, symmetric=True, outlier_fraction=0.05),
        dict(bits=2, terms=4, group_size=16),
    ],
    ids=["4bit_g32", "3bit_sym_outliers", "2bit_g16"],
)
def test_extra_repr_and_bits_per_weight(config, make_fp_dir, load_quantized, tmp_path):
    q = load_quantized(make_fp_dir("qwen2"), **config)
    q.save_pretrained(tmp_path / "q")
    saved = saved_tensors(tmp_path / "q")
    for name, module in fpxint_modules(q).items():
        n_in, n_out = module.in_features, module.out_features
        stored = sum(
            t.numel() * t.element_size()
            for k, t in saved.items()
            if k.startswith(name + ".") and not k.endswith(".bias")
        )
        bpw = 8 * stored / (n_in * n_out)
        assert module.bits_per_weight() == pytest.approx(bpw, rel=1e-12)

        # the same number from the layout alone: packed codes + fp16 scale (+ zero) + outliers + term count
        gs = n_in if config["group_size"] is None else config["group_size"]
        budget = math.ceil(config.get("outlier_fraction", 0.0) * n_in)
        layout = config["terms"] * n_out * packed_size(n_in, config["bits"])
        layout += n_out * (n_in // gs) * 2 * (1 if config.get("symmetric") else 2)
        layout += n_out * budget * (2 + 2) + 4
        assert stored == layout, name

        rep = repr(module)
        assert f"bits={config['bits']}," in rep
        assert f"terms={config['terms']}," in rep
        assert f"group_size={gs}," in rep
        assert f"bits_per_weight={bpw:.3f}" in rep
        assert f"outliers_per_row={budget}" in rep
    assert (
        f"bits_per_weight={fpxint_modules(q)['model.layers.0.mlp.down_proj'].bits_per_weight():.3f}"
        in repr(q)
    )


# --------------------------------------------------------------------------- device_map


def test_device_map_cpu(fp_model_dir, load_fp, load_quantized, logits_of, tmp_path):
    fp_dir = fp_model_dir
    plain = logits_of(load_quantized(fp_dir, bits=4, terms=2, group_size=32))
    q = load_quantized(fp_dir, device_map="cpu", bits=4, terms=2, group_size=32)
    assert all(t.device.type == "cpu" for t in q.state_dict().values())
    assert torch.equal(logits_of(q), plain)
    q.save_pretrained(tmp_path / "q")
    reloaded = load_fp(tmp_path / "q", device_map="cpu")
    assert all(t.device.type == "cpu" for t in reloaded.state_dict().values())
    assert torch.equal(logits_of(reloaded), plain)
    generated = reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_one_rule_decides_which_linears_are_quantized(make_fp_dir, load_fp, load_quantized):
    """The table's (and the benchmarks') list of quantizable layers is the quantizer's own: same names, with and
    without ``modules_to_not_convert``."""
    from fpxint_hf.evaluation.table import quantizable_linears

    fp_dir = make_fp_dir("llama_untied")
    for skip in (None, ["model.layers.0.mlp.down_proj"]):
        q = load_quantized(fp_dir, bits=4, terms=1, group_size=32, modules_to_not_convert=skip)
        converted = {n for n, m in q.named_modules() if isinstance(m, fpxint_hf.FPxINTLinear)}
        listed = {
            n
            for n, _ in quantizable_linears(
                load_fp(fp_dir), fpxint_hf.FPxINTConfig(modules_to_not_convert=skip)
            )
        }
        assert converted == listed and "lm_head" not in listed
        assert (skip is None) == ("model.layers.0.mlp.down_proj" in listed)
