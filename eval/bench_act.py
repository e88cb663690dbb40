"""Activation series (issue 16): W4A16 vs W4A8 vs W4A4 with 1-3 activation terms, on the embedded SmolLM2.

    python eval/bench_act.py [--tokens 1024] [--out eval/results/act]

One process, float32 forward for every row, the same pydoc tokens (windows of 512) and FP reference as
eval/bench_pareto.py (``fpxint_hf.evaluation.metrics``).  The weights use the project defaults (4-bit nested
series, group 128) with T=1 and T=2 terms: each is quantized once, on load, with ``FPxINTConfig(act_bits=8,
act_terms=1)``; the other activation settings are then set on the layers (the stored weights do not depend on
them).  Writes ``<out>.json`` and ``<out>.md`` (table + targets met/missed, rendered by ``_act_report``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _act_report as report  # noqa: E402
from _pareto_rows import fp_baseline  # noqa: E402

from fpxint_hf import FPxINTConfig  # noqa: E402
from fpxint_hf.evaluation.metrics import evaluate_against  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402
from fpxint_hf.linear import FPxINTLinear  # noqa: E402
from fpxint_hf.model_ops import model_bits_per_weight  # noqa: E402
from fpxint_hf.settings import DEFAULTS  # noqa: E402

# (act_bits, act_terms, act_outliers) per row; None = A16
ACT_ROWS: list[tuple[int | None, int, int]] = [
    (None, 1, 0),
    *[(8, t, DEFAULTS.act_outliers) for t in (1, 2, 3)],
    *[(4, t, DEFAULTS.act_outliers) for t in (1, 2, 3)],
    (8, 1, 0),  # without A_sa
    (4, 1, 0),
    (4, 2, 0),
]


def set_activations(model: torch.nn.Module, bits: int | None, terms: int, outliers: int) -> int:
    """Set the activation series of every FP=xINT layer of ``model``; return how many layers."""
    layers = [m for m in model.modules() if isinstance(m, FPxINTLinear)]
    for m in layers:
        m.act_bits, m.act_terms, m.act_outliers = bits, terms, outliers
    return len(layers)


def write(args: argparse.Namespace, argv: list[str] | None, tokens: int, rows: list, start: float):
    """Write ``<out>.json`` and ``<out>.md`` with the rows measured so far; return the result dict."""
    res = {
        "command": "python eval/bench_act.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (FP = its GGUF Q4_1 weights dequantized to float32)",
        "weights": "FPxINTConfig defaults (bits=4, nested, fit=optimized, group_size=128, act_proxy=norm)",
        "tokens": tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "default_act_outliers": DEFAULTS.act_outliers,
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    write_results(args.out, res, report.to_markdown)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="eval/results/act")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-terms", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM

    base = fp_baseline(args.tokens)
    fp_dir, ref, fp_m = base.fp_dir, base.ref, base.fp
    rows: list[dict[str, Any]] = [
        {"weights": "FP", "act_bits": None, "act_terms": 0, "act_outliers": 0, "bits": 32.0}
        | {"ppl": fp_m.perplexity, "kl": 0.0, "top1": 1.0, "eval_s": None}
    ]
    for wt in args.weight_terms:
        config = FPxINTConfig(terms=wt, act_bits=8, act_terms=1)
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config, dtype=torch.float32)
        model.eval()
        bits = model_bits_per_weight(model)
        for act_bits, act_terms, outliers in ACT_ROWS:
            set_activations(model, act_bits, act_terms, outliers)
            t0 = time.perf_counter()
            m = evaluate_against(model, ref)
            row = {"weights": f"W4 T={wt}", "act_bits": act_bits, "act_terms": act_terms if act_bits else 0}
            row |= {"act_outliers": outliers, "bits": bits, "ppl": m.perplexity, "kl": m.kl_vs_fp}
            row |= {"top1": m.top1_agreement, "eval_s": time.perf_counter() - t0}
            rows.append(row)
            print(report.row_line(row), flush=True)
        del model
        write(
            args, argv, base.tokens, rows, start
        )  # after each weight setting: a partial run leaves its rows
    print(report.to_markdown(write(args, argv, base.tokens, rows, start)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
