"""Tensor parallelism of the vLLM plugin (marker ``vllm``; run in .venv-vllm by .ci/run with tests/test_vllm.py).

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_tp.py -o addopts=""

The shard tests cut one layer for each rank without an engine (vLLM's rank is patched) and check that the
ranks' partial products add up to the whole layer; the engine tests serve a checkpoint with
``tensor_parallel_size=2`` (two worker processes, one core each) and compare its greedy tokens with
``tensor_parallel_size=1``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is installed only in .venv-vllm (scripts/install-vllm.sh)")

from safetensors.torch import load_file  # noqa: E402
from test_vllm import hf_greedy, quantize, vllm_greedy  # noqa: E402

from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm
TP_MEMORY = 0.08  # KV cache share of RAM per worker: two workers here


@pytest.fixture(scope="module")
def tp_fp_dir(tmp_path_factory):
    """A seeded LLaMA that two ranks can split: 8 heads of 64 and 2 KV heads; o_proj has 512 inputs and
    down_proj 1024, so each rank holds whole groups of 128 and whole Hadamard blocks of 256."""
    tok = tiny_tokenizer()
    model = tiny_llama(
        len(tok),
        max_positions=128,
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        init_std=0.06,
    )
    out = tmp_path_factory.mktemp("vllm_tp") / "fp"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- one layer, cut without an engine


def _method(q_dir, prefix):
    from fpxint_hf.vllm.method import FPxINTvLLMConfig, FPxINTvLLMLinearMethod

    config = FPxINTvLLMConfig(json.loads((q_dir / "config.json").read_text())["quantization_config"])
    terms = config.layer_terms.get(prefix, config.terms)
    return FPxINTvLLMLinearMethod(config, prefix, terms, config.layer_group_size.get(prefix))


def _rank_output(q_dir, prefix, x, rank, tp, row_parallel, monkeypatch, forward="dense"):
    """What rank ``rank`` of ``tp`` computes for layer ``prefix`` (row-parallel: from its slice of ``x``) with
    ``forward`` (``FPXINT_VLLM_FORWARD``)."""
    import vllm.model_executor.parameter as parameter

    monkeypatch.setenv("FPXINT_VLLM_FORWARD", forward)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: tp)
    stored = {
        k.removeprefix(prefix + "."): v
        for k, v in load_file(str(q_dir / "model.safetensors")).items()
        if k.startswith(prefix + ".")
    }
    out, n_in = stored["scale"].shape[0], x.shape[-1]
    method = _method(q_dir, prefix)
    layer = torch.nn.Module()
    layer.tp_rank = rank
    if row_parallel:
        method.create_weights(layer, n_in // tp, [out], n_in, out, torch.float32, weight_loader=None)
    else:
        method.create_weights(layer, n_in, [out // tp], n_in, out, torch.float32, weight_loader=None)
    for name, tensor in stored.items():
        param = getattr(layer, name)
        (param.load_row_parallel_weight if row_parallel else param.load_column_parallel_weight)(tensor)
    method.process_weights_after_loading(layer)
    assert (layer.fpxint_prepared == "dense") == (forward == "dense")  # the backend asked for serves it
    assert layer.fpxint_path.name == forward and not layer.fpxint_path.refused  # and says so
    if row_parallel:
        x = x[:, rank * n_in // tp : (rank + 1) * n_in // tp]
    return method.apply(layer, x)


SHARD_CONFIGS = {
    "t2_asym_g128_outliers": dict(bits=4, terms=2, group_size=128, outlier_fraction=0.02),
    "mixed_4+2_per_channel_sym": dict(bits=[4, 2], terms=2, group_size=None, symmetric=True),
    "legacy_3bit_t2_g64": dict(bits=3, terms=2, group_size=64, series="legacy", fit="minmax"),
    "3+2_sym_budget_3.5_g64": dict(bits=[3, 2], terms=2, group_size=64, symmetric=True, bits_budget=3.5),
    "dual_scale_hadamard_int8_bias_outliers": dict(
        bits=4,
        terms=2,
        group_size=64,
        dual_scale=True,
        rotation="hadamard",
        zero_bits=8,
        outlier_fraction=0.01,
    ),
}


@pytest.mark.parametrize("name", list(SHARD_CONFIGS))
def test_two_ranks_add_up_to_the_whole_layer(name, tp_fp_dir, tmp_path, monkeypatch):
    """Row-parallel (inputs cut: o_proj, down_proj): the two ranks' partial products add up to the layer served
    whole; column-parallel (outputs cut: up_proj alone) they are its two halves of rows.  float32: equal to the
    rounding of the additions."""
    q_dir = tmp_path / "q"
    quantize(tp_fp_dir, q_dir, **SHARD_CONFIGS[name])
    torch.manual_seed(0)
    for prefix, n_in in [("model.layers.1.self_attn.o_proj", 512), ("model.layers.0.mlp.down_proj", 1024)]:
        x = torch.randn(3, n_in)
        whole = _rank_output(q_dir, prefix, x, 0, 1, True, monkeypatch)
        parts = [_rank_output(q_dir, prefix, x, r, 2, True, monkeypatch) for r in range(2)]
        torch.testing.assert_close(
            parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item()
        )
        assert not torch.allclose(parts[0], whole, rtol=0.1)  # each rank holds a real share
    x = torch.randn(3, 512)
    whole = _rank_output(q_dir, "model.layers.1.mlp.up_proj", x, 0, 1, False, monkeypatch)
    halves = [
        _rank_output(q_dir, "model.layers.1.mlp.up_proj", x, r, 2, False, monkeypatch) for r in range(2)
    ]
    torch.testing.assert_close(torch.cat(halves, dim=-1), whole)


@pytest.mark.parametrize(("forward", "group_size"), [("int4", 128), ("int8", None)])
def test_two_ranks_on_the_packed_kernels_add_up_to_the_whole_layer(
    forward, group_size, tp_fp_dir, tmp_path, monkeypatch
):
    """The int4/int8 backends run on each rank's slice of the inputs (bf16 kernels: equal to their rounding)."""
    q_dir = tmp_path / "q"
    quantize(tp_fp_dir, q_dir, bits=4, terms=2, group_size=group_size, dual_scale=True, rotation="hadamard")
    torch.manual_seed(0)
    prefix = "model.layers.0.mlp.down_proj"
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    whole = _rank_output(q_dir, prefix, x, 0, 1, True, monkeypatch, forward).float()
    parts = [_rank_output(q_dir, prefix, x, r, 2, True, monkeypatch, forward).float() for r in range(2)]
    err = (parts[0] + parts[1] - whole).norm() / whole.norm()
    assert err < 1e-2, err.item()


def test_a_kernel_that_cannot_run_a_layer_leaves_it_dense_with_the_reason(tp_fp_dir, tmp_path, monkeypatch):
    """``int8`` asked for a grouped layer: served dense (vLLM's GEMM), ``fpxint_path`` names the refusal."""
    import vllm.model_executor.parameter as parameter

    q_dir = tmp_path / "q"
    quantize(tp_fp_dir, q_dir, bits=4, terms=1, group_size=64)
    monkeypatch.setenv("FPXINT_VLLM_FORWARD", "int8")
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    prefix = "model.layers.0.mlp.down_proj"
    stored = {
        k.removeprefix(prefix + "."): v
        for k, v in load_file(str(q_dir / "model.safetensors")).items()
        if k.startswith(prefix + ".")
    }
    out = stored["scale"].shape[0]
    method, layer = _method(q_dir, prefix), torch.nn.Module()
    method.create_weights(layer, 1024, [out], 1024, out, torch.float32, weight_loader=None)
    for name, tensor in stored.items():
        getattr(layer, name).load_column_parallel_weight(tensor)
    method.process_weights_after_loading(layer)
    assert layer.fpxint_prepared == "dense" and layer.fpxint_path.name == "dense"
    assert "not per-channel" in dict(layer.fpxint_path.refused)["int8"]


@pytest.mark.parametrize(
    ("config", "n_in", "tp", "match"),
    [
        (dict(bits=4, terms=2, group_size=128), 384, 2, r"group_size=128: a group would straddle two ranks"),
        (dict(bits=4, terms=1, group_size=32, rotation="hadamard"), 192, 2, r"Hadamard blocks of 64 inputs"),
        (dict(bits=3, terms=1, group_size=None), 36, 3, r"3-bit codes of one rank do not end on a byte"),
    ],
)
def test_shards_that_would_split_a_group_are_refused_naming_the_layer(config, n_in, tp, match):
    """The message names the layer, its in_features, group size and the tensor_parallel_size."""
    from fpxint_hf.vllm.method import FPxINTvLLMConfig, FPxINTvLLMLinearMethod

    method = FPxINTvLLMLinearMethod(FPxINTvLLMConfig(config), "model.x.o_proj", config["terms"])
    where = (
        rf"model\.x\.o_proj: in_features={n_in} split over tensor_parallel_size={tp} \({n_in // tp} inputs"
    )
    with pytest.raises(ValueError, match=where + r".*" + match):
        method.create_weights(
            torch.nn.Module(), n_in // tp, [64], n_in, 64, torch.float32, weight_loader=None
        )


# --------------------------------------------------------------------------- whole engines: TP=2 against TP=1

TP_CONFIGS = {  # T=1, T=2, a bits budget (T and widths per layer), a skipped block: three checkpoints, six engines
    "t1_4bit_g128_outliers_skipped_block_0": dict(
        bits=4, terms=1, group_size=128, outlier_fraction=0.02, modules_to_not_convert=["model.layers.0"]
    ),
    "t2_4+4_g64_dual_scale_hadamard": dict(
        bits=4, terms=2, group_size=64, dual_scale=True, rotation="hadamard"
    ),
    "3+2_budget_3.5_g64": dict(bits=[3, 2], terms=2, group_size=64, symmetric=True, bits_budget=3.5),
}


def _llm(path, tp):
    return vllm.LLM(
        str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=64,
        seed=0,
        gpu_memory_utilization=TP_MEMORY,
        tensor_parallel_size=tp,
    )


@pytest.mark.parametrize("name", list(TP_CONFIGS))
def test_tensor_parallel_2_greedy_equals_tensor_parallel_1(name, tp_fp_dir, tmp_path, monkeypatch):
    model = quantize(tp_fp_dir, tmp_path / "q", **TP_CONFIGS[name])
    one = vllm_greedy(_llm(tmp_path / "q", 1))
    assert one == hf_greedy(model)  # TP=1 itself is token-equal to transformers (as in test_vllm.py)
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[-1]}")  # one core per rank
    assert vllm_greedy(_llm(tmp_path / "q", 2)) == one
