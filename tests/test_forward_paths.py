"""Which forward path each layer runs, and why: ``FPxINTLinear.forward_path``, ``fpxint_hf.forward_paths`` (one
answer for a model with mixed layers), the backends' ``can_implement`` reasons, and ``fpxint inspect``'s listing."""

import pytest
import torch
from torch import nn

from fpxint_hf import FPxINTLinear, backends, forward_paths, kernels
from fpxint_hf.cli import main
from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

needs_kernels = pytest.mark.skipif(
    bool(kernels._ops_missing(kernels._INT4_OPS + kernels._INT8_OPS)),
    reason=f"torch {torch.__version__} lacks the CPU int4/int8 ops",
)
LEGACY = dict(series="legacy", fit="minmax")  # the rule whose int8 collapse the kernel docs tabulate


def mixed_model() -> nn.Module:
    """One layer for each way a path is chosen: int8 (per channel, 2 legacy 4-bit terms collapse to int8), int4
    (groups of 64), dense (groups of 16: no kernel group size divides them; 8-bit terms: no int4, too wide for
    int8), the activation series, and a module mode asked for by name."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    layers = {
        "per_channel": FPxINTLinear.from_linear(lin, bits=4, terms=2, group_size=None, **LEGACY),
        "grouped": FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64),
        "small_groups": FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=16),
        "eight_bit": FPxINTLinear.from_linear(lin, bits=8, terms=2, group_size=None, **LEGACY),
        "w4a8": FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64, act_bits=8),
        "reference": FPxINTLinear.from_linear(lin, bits=4, terms=1, group_size=64),
    }
    layers["reference"].forward_mode = "reference"
    return nn.ModuleDict(layers)


@needs_kernels
def test_a_model_with_mixed_layers_lists_each_path_and_why():
    model = mixed_model()
    paths = forward_paths(model, torch.bfloat16)
    assert {n: p.name for n, p in paths.items()} == {
        "per_channel": "int8",
        "grouped": "int4",
        "small_groups": "dense",
        "eight_bit": "dense",
        "w4a8": "act/int",
        "reference": "reference",
    }
    refused = {n: dict(p.refused) for n, p in paths.items()}
    assert refused["per_channel"] == {} and "auto" in paths["per_channel"].reason
    assert "not per-channel" in refused["grouped"]["int8"]
    assert "not per-channel" in refused["small_groups"]["int8"]
    assert "not a multiple of 32" in refused["small_groups"]["int4"]
    assert "wider than int8" in refused["eight_bit"]["int8"] and "bits=" in refused["eight_bit"]["int4"]
    assert "act_bits=8" in paths["w4a8"].reason
    assert "refused" in str(paths["small_groups"]) and "int4" in str(paths["small_groups"])

    # the forward runs what is listed: each layer's cached weights are those of its path
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    weights = {"int8": kernels.Int8Weights, "int4": kernels.Int4Weights, "dense": kernels.DenseWeights}
    for name, layer in model.items():
        layer(x)
        if paths[name].name in weights:
            assert type(layer._kernel_cache[2]) is weights[paths[name].name], name

    # float32 activations: auto refuses the packed kernels for the dtype, and says so
    for name, path in forward_paths(model, torch.float32).items():
        if name not in ("w4a8", "reference"):
            assert path.name == "dense" and [n for n, _ in path.refused] == ["int8", "int4"], name
            assert all("activations only" in why for _, why in path.refused), name


def test_a_backend_asked_for_by_name_runs_or_says_why_not():
    layer = mixed_model()["small_groups"]
    layer.forward_mode = "int4"
    with pytest.raises(ValueError, match=r"forward_mode='int4' cannot run this layer: group_size=16"):
        layer.forward_path(torch.bfloat16)
    with pytest.raises(ValueError, match="int4"):
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    layer.forward_mode = "dense"
    assert layer.forward_path(torch.bfloat16) == backends.ForwardPath("dense", "forward_mode asks for it")
    layer.forward_mode = "auto"
    assert (
        layer.forward_path(torch.bfloat16, requires_grad=True).name == "dense"
    )  # no backward in the kernels


def test_every_backend_answers_ok_and_reason():
    query = backends.LayerQuery((4,), 1, 16, 256, "nested", "cpu", torch.bfloat16)
    answers = {name: tuple(b.can_implement(query)) for name, b in backends.BACKENDS.items()}
    assert answers["dense"] == (True, "")
    assert answers["int4"][0] is False and "multiple of 32" in answers["int4"][1]
    assert answers["int8"][0] is False and "per-channel" in answers["int8"][1]


@needs_kernels
def test_inspect_lists_each_layers_path_and_why(tmp_path, capsys):
    tok = tiny_tokenizer()
    fp = tmp_path / "fp"
    tiny_llama(len(tok)).save_pretrained(fp)
    tok.save_pretrained(fp)
    out = tmp_path / "q"
    assert main(["quantize", str(fp), str(out), "--bits", "4", "--terms", "1", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| model.")]
    path_of = {line.split("|")[1].strip(): line.split("|")[-3].strip() for line in rows}
    # 32 inputs in groups of 32 are one group per row (int8); the MLP's down_proj has 64 inputs (int4)
    assert (
        path_of["model.layers.0.self_attn.q_proj"] == "int8"
        and path_of["model.layers.0.mlp.down_proj"] == "int4"
    )
    assert "forward paths (bfloat16 activations" in text
    assert (
        "int4 (auto: the first of ('int8', 'int4') that runs this layer); refused int8: group_size=32" in text
    )
    assert main(["inspect", str(out), "--dtype", "float32"]) == 0
    assert "activations only" in capsys.readouterr().out
