"""Build one GPTQ baseline model with llmcompressor (runs in .venv-gptq; see scripts/install-gptq.sh).

    .venv-gptq/bin/python eval/_gptq_build.py FP_DIR OUT_DIR --bits 4 --group-size 64

Loads the float32 FP folder, runs llmcompressor's ``oneshot`` with a ``GPTQModifier`` (asymmetric integer
weights, one float16 scale and integer zero per group, lm_head left out, the modifier's default activation
ordering and dampening) on the CPU, calibrated on standard-library docstrings (``_gptq_calib``), and writes a
plain float32 HF folder whose linear weights are GPTQ's dequantized weights (fake quantization: any transformers
version loads it as an ordinary model), plus ``gptq.json`` (bits per weight as GPTQ stores them, settings,
calibration, seconds, versions). The folder appears complete or not at all (written beside, then renamed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gptq_calib import Calibration, calibration_text, gptq_bits_per_weight  # noqa: E402


def calibration_windows(tokenizer, cal: Calibration) -> torch.Tensor:
    """``cal.samples`` contiguous windows of ``cal.seq_len`` tokens of the docstring text, in text order."""
    text = calibration_text(cal)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = cal.samples * cal.seq_len
    if len(ids) < need:
        raise SystemExit(f"calibration text gives {len(ids)} tokens, {need} needed; raise Calibration.chars")
    return torch.tensor(ids[:need]).reshape(cal.samples, cal.seq_len), hashlib.sha256(
        text.encode()
    ).hexdigest()


def recipe(bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def dequantized_weights(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """The GPTQ-quantized linears' weights (already dequantized by GPTQ), and the largest relative change a
    second quant-dequant with the stored scale/zero makes to them (0 when they lie on the stored grid)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out, worst = {}, 0.0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float()
        if getattr(module, "weight_g_idx", None) is not None:
            raise SystemExit(f"{name}: a group index (actorder 'group') is not handled; groups stay in order")
        again = fake_quantize(w, module.weight_scale, module.weight_zero_point, scheme.weights)
        worst = max(worst, float((again - w).norm() / w.norm().clamp(min=1e-30)))
        out[f"{name}.weight"] = w.clone()
    return out, worst


def write_plain(fp_dir: Path, weights: dict[str, torch.Tensor], tmp: Path) -> int:
    """A fresh float32 FP model with ``weights`` copied in, saved as a plain HF folder; returns layers copied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    plain.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(fp_dir).save_pretrained(tmp)
    return len(weights)


def build(fp_dir: Path, out: Path, bits: int, group_size: int, cal: Calibration) -> dict:
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cal.seed)
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    windows, text_sha = calibration_windows(tokenizer, cal)
    data = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe(bits, group_size),
        num_calibration_samples=cal.samples,
        max_seq_length=cal.seq_len,
    )
    seconds = time.perf_counter() - start
    weights, regrid = dequantized_weights(model)
    if not weights:
        raise SystemExit("no linear layer was quantized by GPTQ")
    n = sum(w.numel() for w in weights.values())
    del model
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_plain(fp_dir, weights, tmp)
    scheme = recipe(bits, group_size)
    meta = {
        "method": "GPTQ (llmcompressor oneshot, GPTQModifier), fake-quantized: dequantized float32 weights",
        "fp_dir": str(fp_dir),
        "bits": bits,
        "group_size": group_size,
        "symmetric": False,
        "actorder": str(scheme.actorder),
        "dampening_frac": scheme.dampening_frac,
        "block_size": scheme.block_size,
        "ignore": ["lm_head"],
        "bits_per_weight": gptq_bits_per_weight(bits, group_size),
        "bits_per_weight_counts": "code + float16 scale + integer zero (bits) per group, over the quantized linears",
        "quantized_layers": len(weights),
        "quantized_weights": n,
        "regrid_relative_change": regrid,
        "calibration": {
            **asdict(cal),
            "chars": cal.chars,
            "text_sha256": text_sha,
            "tokens": int(windows.numel()),
        },
        "calibration_text": "Python standard-library docstrings (ast, no imports), pydoc_data and tests skipped, "
        f"de-duplicated, shuffled with seed {cal.seed}, joined by blank lines",
        "quant_s": seconds,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
        },
    }
    (tmp / "gptq.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bits", type=int, required=True, choices=(2, 3, 4, 8))
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--samples", type=int, default=Calibration.samples)
    ap.add_argument("--seq-len", type=int, default=Calibration.seq_len)
    ap.add_argument("--seed", type=int, default=Calibration.seed)
    args = ap.parse_args(argv)
    cal = Calibration(samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    meta = build(args.fp_dir, args.out, args.bits, args.group_size, cal)
    print(
        json.dumps(
            {k: meta[k] for k in ("bits_per_weight", "quant_s", "quantized_layers", "regrid_relative_change")}
        )
    )


if __name__ == "__main__":
    main()
