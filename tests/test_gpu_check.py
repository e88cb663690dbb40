"""The part of eval/gpu_check.py that a CPU can check (the script itself has never run on a GPU): the operands it
hands to torch's CUDA int4 kernel (``_weight_int4pack_mm``: ``(code - 8)·scale + zero`` per group, the terms side
by side along the inputs) encode the weight the library dequantizes."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from fpxint_hf.linear import FPxINTLinear

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "config",
    [
        dict(bits=4, terms=1, group_size=128),
        dict(bits=4, terms=2, group_size=128),
        dict(bits=4, terms=2, group_size=64, symmetric=True),
        dict(bits=4, terms=2, group_size=64, series="legacy", fit="minmax"),
    ],
)
def test_tinygemm_operands_encode_the_dequantized_weight(config):
    g = gpu_check()
    torch.manual_seed(0)
    layer = FPxINTLinear.from_linear(nn.Linear(256, 40), outlier_fraction=0.0, **config)
    e = layer.expansion()
    codes, table = g.tinygemm_operands(e)
    assert codes.shape == (48, e.terms_used * 256)  # 40 rows padded to a multiple of 16
    assert 0 <= int(codes.min()) and int(codes.max()) <= 15
    w = g.operands_weight(codes, table, e.group_size, 40, e.terms_used)
    torch.testing.assert_close(w, layer.dequantize(), rtol=1e-5, atol=1e-6)
