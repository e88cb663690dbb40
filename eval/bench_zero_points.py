"""What an integer zero point costs: FP=xINT T=1 at 4 bits with float16 biases, int8 bias codes and integer zero points.

    python eval/bench_zero_points.py [--model smollm2|coder] [--tokens 2048] [--context 512] [--merge]

One process, float32 forward for every row, KL(FP || row) on the first ``--tokens`` pydoc tokens.  Rows, at group
128 and group 64: ``zero_bits=16`` (a float16 bias per group, the default), ``zero_bits=8`` (an int8 code in steps
of scale_1/16), ``zero_bits=4`` (an integer zero point in steps of scale_1, as GPTQ/AWQ and compressed-tensors'
``pack-quantized`` store it: what ``fpxint export`` needs) and GPTQ's round-to-nearest grid with integer zeros
(``zero_bits=4, fit="minmax", act_proxy=None``) as the reference.  Bits per weight count every stored tensor (the
zero points are stored as int8; compressed-tensors packs them to 4 bits).  ``--model coder`` needs the
Qwen2.5-Coder-1.5B packages (``scripts/install-coder.sh``).  Writes ``eval/results/zero_points.{json,md}``
(``--merge`` adds this run's rows to the committed ones, replacing rows of the same model and label).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fpxint_hf import FPxINTConfig  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402

OUT = ROOT / "eval" / "results" / "zero_points"
ZEROS = {  # label -> settings
    "float16 bias (zero_bits=16)": {},
    "int8 bias code (zero_bits=8)": {"zero_bits": 8},
    "integer zero point (zero_bits=4)": {"zero_bits": 4},
    "GPTQ RTN, integer zero point": {"zero_bits": 4, "fit": "minmax", "act_proxy": None},
}
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (FP = its GGUF Q4_1 weights dequantized to float32; 576-input layers "
    "fall back from group 128 to 64)",
    "coder": "Qwen2.5-Coder-1.5B-Instruct (FP = its GGUF weights dequantized to float32)",
}


def fp_dir_of(model: str) -> Path:
    if model == "coder":
        from fpxint_hf.evaluation.coder_assets import coder_fp_dir

        return coder_fp_dir()
    from fpxint_hf.evaluation.assets import fp_model_dir

    return fp_model_dir()


def measure(
    model: str, tokens: int, context: int, groups: list[int], labels: list[str]
) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fpxint_hf.evaluation.metrics import evaluate_against, fp_reference, pydoc_windows
    from fpxint_hf.model_ops import model_bits_per_weight

    fp_dir = fp_dir_of(model)
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    ref = fp_reference(fp, pydoc_windows(AutoTokenizer.from_pretrained(fp_dir), tokens, context))
    del fp
    rows = []
    for group in groups:
        for label in labels:
            config = FPxINTConfig(bits=4, terms=1, group_size=group, forward_mode="dense", **ZEROS[label])
            start = time.perf_counter()
            q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config, dtype=torch.float32)
            secs = time.perf_counter() - start
            m = evaluate_against(q.eval(), ref)
            row = {"model": model, "group": group, "label": label, "settings": ZEROS[label]}
            row |= {"bpw": model_bits_per_weight(q), "quant_s": secs, "ppl": m.perplexity, "kl": m.kl_vs_fp}
            row["top1"] = m.top1_agreement
            rows.append(row)
            del q
            print(f"{model} g{group} {label:34s} {row['bpw']:.3f} b/w KL {m.kl_vs_fp:.4f}", flush=True)
    return rows


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Integer zero points vs float zeros (FP=xINT T=1, 4 bits)",
        "",
        f"Commands: {'; '.join(f'`{c}`' for c in res['commands'])}.  KL(FP || row) on the first pydoc tokens of "
        f"each run (float32 forward, {res['threads']} torch threads on a 2-core machine shared with other jobs, "
        f"run under `nice -n 5`), torch {res['torch']}, transformers {res['transformers']}.",
        "",
    ]
    for model, desc in MODELS.items():
        rows = [r for r in res["rows"] if r["model"] == model]
        if not rows:
            continue
        tokens = res["tokens"][model]
        lines += [f"## {desc}", "", f"{tokens} tokens.", ""]
        lines += ["| group | zero | bits/weight | PPL | KL vs FP | top-1 vs FP | KL vs float16 bias |"]
        lines += ["|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            base = next(b for b in rows if b["group"] == r["group"] and not b["settings"])
            lines.append(
                f"| {r['group']} | {r['label']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
                f"{100 * r['top1']:.1f}% | {r['kl'] / base['kl']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--groups", default="128,64")
    ap.add_argument("--labels", default=None, help="i,j,...: indices into ZEROS (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--merge", action="store_true", help="add to the committed rows instead of replacing them"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(ZEROS)
    labels = [names[int(i)] for i in args.labels.split(",")] if args.labels else names
    groups = [int(g) for g in args.groups.split(",")]
    rows = measure(args.model, args.tokens, args.context, groups, labels)
    import transformers

    command = "python eval/bench_zero_points.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {"commands": [], "rows": [], "tokens": {}}
    if args.merge and OUT.with_suffix(".json").exists():
        res = json.loads(OUT.with_suffix(".json").read_text())
    new = {(r["model"], r["group"], r["label"]) for r in rows}
    res["rows"] = [r for r in res["rows"] if (r["model"], r["group"], r["label"]) not in new] + rows
    order = [(m, g, lab) for m in MODELS for g in (128, 64) for lab in ZEROS]
    res["rows"].sort(key=lambda r: order.index((r["model"], r["group"], r["label"])))
    res["commands"] = [*res["commands"], command]
    res["tokens"] = {**res["tokens"], args.model: args.tokens}
    res |= {"threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__}
    print(write_results(OUT, res, to_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
