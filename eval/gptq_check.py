"""Sanity check of the GPTQ baseline on SmolLM2: KL from FP of GPTQ and of RTN at equal bits and group, on the
same pydoc tokens (GPTQ should be below RTN).

    PYTHONPATH=$PWD python eval/gptq_check.py --bits 4 --tokens 2048

Builds the GPTQ folder first when missing (eval/_gptq_row.py; needs .venv-gptq). Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gptq_row as gptq  # noqa: E402
import _pareto_rows as rows  # noqa: E402

from fpxint_hf.evaluation.metrics import evaluate_against  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=rows.GROUP)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    base = rows.fp_baseline(args.tokens)
    bits, group = args.bits, args.group_size
    builders = {
        f"RTN W{bits} g{group}": lambda: rows.rtn_row(base.fp_dir, bits, group),
        f"GPTQ W{bits} g{group}": lambda: gptq.gptq_row(base.fp_dir, bits, group),
    }
    print(json.dumps({"row": "FP", "tokens": base.tokens, "ppl": base.fp.perplexity}), flush=True)
    for label, build in builders.items():
        row = build()
        m = evaluate_against(row["model"], base.ref)
        scores = {"bits": row["bits"], "kl": m.kl_vs_fp, "top1": m.top1_agreement, "ppl": m.perplexity}
        print(json.dumps({"row": label, **scores, "quant_s": row["quant_s"]}), flush=True)
        del row


if __name__ == "__main__":
    main()
