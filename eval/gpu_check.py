"""GPU check of FP=xINT through the engines' own kernels (issue 28, item 4).  THIS SCRIPT HAS NEVER RUN.

It was written on a machine without a GPU: nothing in it has executed on CUDA, and no number it prints has been
seen yet.  A session that is lent a GPU runs it once (sized for under 10 min on one H100: an estimate, not a
measurement; each vLLM run is cut at 240 s) and commits what it writes only after reading it:

    PYTHONPATH=$PWD python eval/gpu_check.py --out eval/results/gpu_check.json [--model FLOAT_DIR]

What it measures, each part on its own so that a missing requirement skips that part with its reason (printed
and recorded as ``"skipped"``; nothing is estimated in its place):

1. ``tinygemm``: an FP=xINT checkpoint (T=1 4-bit and T=2 4+4, group 128, float zeros, no outliers) on CUDA
   through ``torch.ops.aten._weight_int4pack_mm`` (``_convert_weight_to_int4pack``: the CUDA twin of the CPU
   ``int4`` backend; the terms are one matmul over ``[x, x]``; a layer whose inputs group 128 does not divide
   uses the library's fallback group).  The layers are swapped in by this script: the library has no CUDA path.
   Records weight memory, decode tokens/s against the float model in bf16, and the greedy tokens against the
   same checkpoint dequantized to dense bf16 layers.
2. ``vllm_marlin``: ``fpxint export Q OUT --format compressed-tensors`` of a T=1 4-bit checkpoint with integer
   zeros, served by vLLM's CUDA build (W4A16 asymmetric groups: vLLM picks Marlin, or Machete on sm90; the log
   line naming the kernel is recorded), against vLLM serving the float model in bf16: model memory from vLLM's
   log, tokens/s, greedy tokens against transformers on the FP=xINT checkpoint (dense bf16).

Checked on the CPU only (tests/test_gpu_check.py): the codes and (scale, zero) table that part 1 hands to the
kernel encode the weight the library dequantizes.  The uint8 nibble order (taken from torch's own int4 tests),
the CUDA ops, generation on CUDA and everything in part 2 have not run.

Requirements: a CUDA build of torch, transformers and safetensors; for part 2 also vllm (CUDA build),
compressed-tensors and the ``export`` command.  ``--model``: a float Llama/Qwen folder (default: the SmolLM2 folder
that ``fpxint eval`` caches; a random Llama built from a config when that is absent, whose token agreement
says less than a trained model's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import fpxint_hf  # noqa: F401  (registers quant_method "fpxint" with transformers)

CACHE_FP = Path.home() / ".cache" / "fpxint_hf" / "smollm2-135m-instruct-q4_1-dequant-f32-v0.1.2"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein"]
NEW_TOKENS = 64
T1 = dict(bits=4, terms=1, group_size=128, outlier_fraction=0.0)
T2 = dict(bits=4, terms=2, group_size=128, outlier_fraction=0.0)
INT_ZERO = dict(bits=4, terms=1, group_size=128, outlier_fraction=0.0, zero_bits=4)  # integer zeros (item 2)


# --------------------------------------------------------------------------- models


def float_model_dir(arg: str | None, work: Path) -> Path:
    """``--model``, else the cached SmolLM2 float folder, else a random Llama saved under ``work``."""
    if arg:
        return Path(arg)
    if (CACHE_FP / "config.json").exists():
        return CACHE_FP
    from fpxint_hf.evaluation.testing import tiny_llama, tiny_tokenizer

    out = work / "random_llama"
    if not (out / "config.json").exists():
        tok = tiny_tokenizer()
        model = tiny_llama(
            len(tok), hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4
        )
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def quantized_dir(fp_dir: Path, out: Path, config: dict) -> Path:
    """An FP=xINT checkpoint of ``fp_dir`` (quantized on the CPU by the library, as everywhere else)."""
    if not (out / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fpxint_hf import FPxINTConfig

        model = AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=FPxINTConfig(**config), dtype=torch.float32
        )
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(fp_dir).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- part 1: tinygemm


def tinygemm_operands(e) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 codes ``[N_pad, terms·in]`` (``q + 8 - 2^(X-1)``, term i's columns after term i-1's) and the float32
    table ``[terms·G, N_pad, 2]`` of (scale, zero) per group, as ``kernels.prepare_int4`` builds them: the weight
    is ``(code - 8)·scale + zero`` per group, summed over the terms.  Rows padded to 16 with value 0."""
    from fpxint_hf.expansion import term_offsets, term_scales

    k, (n_out, n_in) = e.terms_used, e.shape
    steps = term_scales(e.scale.float(), e.term_bits, k, e.series)
    offsets = term_offsets(e.term_bits, k, e.series)
    pad = (-n_out) % 16
    codes, tables = [], []
    for i in range(k):
        c = e.codes[i].to(torch.int32) + 8 - 2 ** (e.term_bits[i] - 1)
        scale, zero = steps[i], steps[i] * offsets[i]
        if i == 0 and e.zero is not None:
            zero = zero + e.zero.float()
        if pad:  # code 8, scale 0, zero 0: rows of value 0
            c = torch.cat([c, c.new_full((pad, n_in), 8)])
            scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
        codes.append(c)
        tables.append(torch.stack([scale.t(), zero.t()], dim=-1))
    return torch.cat(codes, dim=1), torch.cat(tables)


def operands_weight(codes: torch.Tensor, table: torch.Tensor, group_size: int, n_out: int, terms: int):
    """float32 ``[n_out, in]`` that ``tinygemm_operands`` encode (the CPU check of the operands, no kernel)."""
    scale = table[..., 0].t().repeat_interleave(group_size, dim=1)
    zero = table[..., 1].t().repeat_interleave(group_size, dim=1)
    w = (codes.float() - 8) * scale + zero
    return sum(w.chunk(terms, dim=1))[:n_out]


class TinygemmLinear(torch.nn.Module):
    """One FP=xINT layer on ``_weight_int4pack_mm`` (``tinygemm_operands``; uint8 nibbles even-index-high, as in
    torch's own int4 tests, then ``_convert_weight_to_int4pack``)."""

    def __init__(self, layer, device: str) -> None:
        super().__init__()
        e = layer.expansion()
        codes, table = tinygemm_operands(e)
        w = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)
        tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (16 * t) == 0)
        self.packed = torch.ops.aten._convert_weight_to_int4pack(w, tiles)
        self.table = table.to(device=device, dtype=torch.bfloat16).contiguous()
        self.group_size, self.terms, self.n_out = e.group_size, e.terms_used, e.shape[0]
        self.bias = None if layer.bias is None else layer.bias.detach().to(device, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        xs = torch.cat([x2d] * self.terms, dim=1) if self.terms > 1 else x2d.contiguous()
        y = torch.ops.aten._weight_int4pack_mm(xs, self.packed, self.group_size, self.table)[:, : self.n_out]
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.n_out).to(x.dtype)


def swap_layers(model, make) -> None:
    """Replace every ``FPxINTLinear`` of ``model`` by ``make(layer)``."""
    from fpxint_hf.linear import FPxINTLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, FPxINTLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, make(module))


def dense_linear(layer) -> torch.nn.Linear:
    """The FP=xINT layer dequantized once into a bf16 ``nn.Linear`` (the reference the kernels must match)."""
    w = layer.dequantize()
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, dtype=torch.bfloat16)
    out.weight.data.copy_(w)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias)
    return out


def generate(model, tok, device: str) -> dict:
    """Greedy tokens of every prompt, decode tokens/s (after one warm-up), weight and peak GPU memory."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for mod in model.modules():
        if isinstance(mod, TinygemmLinear):
            weights += sum(t.numel() * t.element_size() for t in (mod.packed, mod.table))
    ids = [tok(p, return_tensors="pt").input_ids.to(device) for p in PROMPTS]
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    model.generate(ids[0], **kw)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tokens, start = [], time.perf_counter()
    for x in ids:
        tokens.append(model.generate(x, **kw)[0, x.shape[1] :].tolist())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(
        tokens=tokens,
        tokens_per_s=len(ids) * NEW_TOKENS / seconds,
        weight_mb=weights / 2**20,
        peak_mb=torch.cuda.max_memory_allocated() / 2**20,
    )


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of equal tokens up to each prompt's first difference, and whether all are equal."""
    same = []
    for p, q in zip(a, b, strict=True):
        same.append(
            next((i for i, (x, y) in enumerate(zip(p, q, strict=False)) if x != y), min(len(p), len(q)))
        )
    return dict(equal=a == b, first_difference=same, prefix_share=sum(same) / sum(len(p) for p in a))


def part_tinygemm(fp_dir: Path, work: Path, device: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fp_dir)
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).to(device).eval()
    res: dict = {"bf16": generate(fp, tok, device)}
    del fp
    for name, config in (("T1_4bit_g128", T1), ("T2_4+4_g128", T2)):
        q_dir = quantized_dir(fp_dir, work / name, config)
        for variant, make in (
            ("dense_bf16", dense_linear),
            ("tinygemm", lambda m: TinygemmLinear(m, device)),
        ):
            model = AutoModelForCausalLM.from_pretrained(q_dir, dtype=torch.float32)
            swap_layers(model, make)
            model = model.to(device=device, dtype=torch.bfloat16).eval()
            res[f"{name}_{variant}"] = generate(model, tok, device)
            del model
            torch.cuda.empty_cache()
        kern, dense = res[f"{name}_tinygemm"], res[f"{name}_dense_bf16"]
        kern["vs_dense"] = agreement(kern["tokens"], dense["tokens"])
        kern["speed_vs_bf16"] = kern["tokens_per_s"] / res["bf16"]["tokens_per_s"]
    return res


# --------------------------------------------------------------------------- part 2: vLLM with Marlin


def vllm_child(path: str) -> int:
    """In its own process: vLLM (CUDA) serves ``path`` in bf16; prints one JSON line."""
    import vllm

    llm = vllm.LLM(path, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.5, seed=0)
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = [llm.generate([p], params, use_tqdm=False)[0] for p in PROMPTS]  # one sequence at a time
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps(dict(tokens=tokens, tokens_per_s=len(PROMPTS) * NEW_TOKENS / seconds)))
    return 0


def run_vllm(path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--vllm-child", str(path)], capture_output=True, text=True, timeout=240
    )
    log = proc.stdout + proc.stderr
    lines = [ln for ln in log.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return dict(skipped=f"vLLM exited {proc.returncode}: {log[-1500:]}")
    res = json.loads(lines[-1][len("RESULT ") :])
    res["log_lines"] = [ln[-200:] for ln in log.splitlines() if "Kernel" in ln or "Model loading took" in ln]
    return res


def part_vllm(fp_dir: Path, work: Path, device: str, reference: dict | None) -> dict:
    try:
        import compressed_tensors  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as err:
        return dict(skipped=f"needs vllm (CUDA build) and compressed-tensors: {err}")
    try:
        q_dir = quantized_dir(fp_dir, work / "T1_4bit_g128_int_zero", INT_ZERO)
    except (TypeError, ValueError) as err:
        return dict(skipped=f"FPxINTConfig({INT_ZERO}) refused (integer zeros, issue 28 item 2): {err}")
    out = work / "T1_compressed_tensors"
    cmd = [
        sys.executable,
        "-m",
        "fpxint_hf.cli",
        "export",
        str(q_dir),
        str(out),
        "--format",
        "compressed-tensors",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return dict(skipped=f"`{' '.join(cmd[2:])}` exited {proc.returncode}: {proc.stderr[-800:]}")
    torch.cuda.empty_cache()  # vLLM (its own process) reserves a share of the GPU
    res = {"bf16": run_vllm(fp_dir), "export": run_vllm(out)}
    if reference is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(q_dir, dtype=torch.float32)
        swap_layers(model, dense_linear)
        reference = generate(
            model.to(device, torch.bfloat16).eval(), AutoTokenizer.from_pretrained(q_dir), device
        )
    if "tokens" in res["export"]:
        res["export"]["vs_transformers_dense"] = agreement(res["export"]["tokens"], reference["tokens"])
        if "tokens_per_s" in res["bf16"]:
            res["export"]["speed_vs_bf16"] = res["export"]["tokens_per_s"] / res["bf16"]["tokens_per_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="float Llama/Qwen folder (default: the cached SmolLM2)")
    ap.add_argument("--work", default="/tmp/fpxint-gpu-check")
    ap.add_argument("--out", default="/tmp/fpxint-gpu-check/gpu_check.json")
    ap.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vllm_child:
        return vllm_child(args.vllm_child)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script only runs on a GPU)")
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp_dir = float_model_dir(args.model, work)
    res: dict = dict(model=str(fp_dir), device=torch.cuda.get_device_name(), torch=torch.__version__)
    try:
        res["tinygemm"] = part_tinygemm(fp_dir, work, "cuda")
    except Exception as err:  # noqa: BLE001  (recorded, then part 2 still runs)
        res["tinygemm"] = dict(failed=f"{type(err).__name__}: {err}")
    res["vllm_marlin"] = part_vllm(fp_dir, work, "cuda", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
