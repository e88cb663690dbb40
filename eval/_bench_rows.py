"""Row builders of ``eval/bench.py``: each returns ``(model, bits per weight, notes)`` for one method.

Bits per weight count the stored bytes of the quantized linear weights (every ``nn.Linear`` but the output
embedding) over their number of weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpxint_hf.evaluation.table import quantizable_linears, rtn_model
from fpxint_hf.hf import FPxINTConfig
from fpxint_hf.model_ops import model_bits_per_weight

BITS, GROUP = 4, 128


def _tbytes(*ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------ row builders: (model, bits/weight, notes)


def build_dense(fp_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype).eval()
    return model, 16.0 if dtype == torch.bfloat16 else 32.0, []


def build_rtn(fp_dir: Path, bits: int = BITS):
    model, bpw = rtn_model(fp_dir, bits, GROUP)
    return model, bpw, []


def _build_bnb(fp_dir: Path, cfg: Any, layer: str, stored_bytes: Any, note: str):
    """A bitsandbytes row: load with ``cfg``; bits per weight from ``stored_bytes`` of every ``bnb.nn.<layer>``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu"
    ).eval()
    import bitsandbytes as bnb

    cls = getattr(bnb.nn, layer)
    stored = n = 0
    for m in model.modules():
        if isinstance(m, cls):
            stored += stored_bytes(m)
            n += m.in_features * m.out_features
    return model, 8 * stored / n, [f"bitsandbytes {bnb.__version__}: {note}"]


def _nf4_bytes(m: nn.Module) -> int:
    qs = m.weight.quant_state
    nested = (
        _tbytes(qs.state2.absmax, qs.state2.code, getattr(qs, "offset", None))
        if getattr(qs, "nested", False)
        else 0
    )
    return _tbytes(m.weight, qs.absmax, qs.code) + nested


def build_bnb(fp_dir: Path):
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    return _build_bnb(fp_dir, cfg, "Linear4bit", _nf4_bytes, "NF4, blocksize 64, float32 absmax")


def build_bnb_int8(fp_dir: Path):
    """bitsandbytes LLM.int8 (8-bit weights, per-row absmax; outlier threshold 6.0 on activations)."""
    from transformers import BitsAndBytesConfig

    return _build_bnb(
        fp_dir,
        BitsAndBytesConfig(load_in_8bit=True),
        "Linear8bitLt",
        lambda m: _tbytes(m.weight, getattr(m.weight, "SCB", None)),
        "LLM.int8, per-row float32 absmax",
    )


def build_hqq(fp_dir: Path, nbits: int = BITS, group_size: int = 64, dtype: torch.dtype = torch.bfloat16):
    """HQQ ``HQQLinear`` layers (bf16 compute, scale and zero) in a model loaded in ``dtype``."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype).eval()
    qcfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    stored = n = 0
    for name, lin in quantizable_linears(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        q = HQQLinear(lin, qcfg, compute_dtype=torch.bfloat16, device="cpu", del_orig=True)
        stored += _tbytes(q.W_q, q.meta["scale"], q.meta["zero"])
        n += lin.in_features * lin.out_features
        setattr(parent, name.rsplit(".", 1)[1], q)
    import hqq

    return (
        model,
        8 * stored / n,
        [
            f"hqq {getattr(hqq, '__version__', '0.2.8.post1')}: {nbits}-bit, group {group_size}, bf16 scale+zero, "
            "default optimizer"
        ],
    )


def build_torchao(fp_dir: Path):
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()
    lin_names = {n for n, _ in quantizable_linears(model)}
    quantize_(model, Int4WeightOnlyConfig(group_size=64), filter_fn=lambda m, fqn: fqn in lin_names)
    x = torch.zeros(1, 4, dtype=torch.long)
    model(input_ids=x)  # the failure is usually at the first forward
    stored = n = 0
    for name in lin_names:
        w = model.get_submodule(name).weight
        stored += _tbytes(*(getattr(w, a) for a in getattr(w, "tensor_data_names", [])))
        n += w.shape[0] * w.shape[1]
    return model, 8 * stored / n, [f"torchao {torchao.__version__}: int4 weight-only, group 64"]


def build_fpxint(fp_dir: Path, terms: int):
    from transformers import AutoModelForCausalLM

    import fpxint_hf

    cfg = FPxINTConfig(bits=BITS, terms=terms, group_size=GROUP, forward_mode="auto")
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.bfloat16).eval()
    fpxint_hf.set_forward_mode(model, "auto")
    return (
        model,
        model_bits_per_weight(model),
        ["forward_mode auto (int8 / int4 packed CPU kernels for bf16)"],
    )
