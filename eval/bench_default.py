"""Best by default: ``FPxINTConfig()`` and its 3-bit and 8-bit variants against every peer, on both models.

    SINQ_AUTO_PATCH=0 PYTHONPATH=/tmp/peers-libs python eval/bench_default.py --model smollm2 --tokens 4096
    SINQ_AUTO_PATCH=0 PYTHONPATH=/tmp/peers-libs python eval/bench_default.py --model qwen --tokens 2048
    python eval/bench_default.py --model qwen --memory      # peak anonymous memory of quantize-on-load

Every row is at group 64 (the default's group size), scored by the mean KL of its next-token distributions
from the float32 FP model's on pydoc text (``fpxint_hf.evaluation.metrics``; text the fits never saw: the probe
reads random token ids, GPTQ the standard library's docstrings).  Peers are fake-quantized (their dequantized
weights in the float32 model; eval/_pareto_rows.py, eval/_pareto_peers.py); FP=xINT rows load through the
quantize-on-load path.  Peers: RTN (min-max round-to-nearest, "Normal"), HQQ, bitsandbytes NF4, SINQ (the
authors' package, installed as eval/_pareto_peers.py says), GPTQ calibrated (eval/_gptq_row.py, its own venv;
skipped with the reason when absent).  ``--rerun TEXT`` measures only the rows whose label contains TEXT and
merges them into the committed JSON.  Results: eval/results/default_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT))

import _default_report as report  # noqa: E402
import _pareto_peers as peers  # noqa: E402
import _pareto_rows as rows  # noqa: E402

from fpxint_hf import FPxINTConfig  # noqa: E402
from fpxint_hf.evaluation.metrics import evaluate_against, fp_reference, pydoc_windows  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402
from fpxint_hf.model_ops import model_bits_per_weight  # noqa: E402

GROUP = 64
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (FP = its GGUF Q4_1 weights dequantized to float32)",
    "qwen": "Qwen2.5-Coder-1.5B-Instruct (FP = its GGUF Q4_K_M weights dequantized to float32)",
}


def model_dir(model: str) -> Path:
    if model == "qwen":
        from fpxint_hf.evaluation.coder_assets import coder_fp_dir

        return Path(coder_fp_dir())
    from fpxint_hf.evaluation.assets import fp_model_dir

    return Path(fp_model_dir())


def fpxint(config: FPxINTConfig) -> Any:
    """A row built by quantize-on-load with ``config`` (run in float32 with the dense forward)."""

    def build(fp_dir: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        config.forward_mode = "dense"  # float32 evaluation; does not change what is stored
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config, dtype=torch.float32)
        secs = time.perf_counter() - start
        return {"model": model.eval(), "bits": model_bits_per_weight(model), "quant_s": secs}

    return build


def peer(fn: Any, bits: int) -> Any:
    return lambda fp_dir: rows.counted_row(fp_dir, lambda w, _i: fn(w, bits, GROUP))


def gptq(bits: int) -> Any:
    def build(fp_dir: Path) -> dict[str, Any]:
        import _gptq_row

        return _gptq_row.gptq_row(fp_dir, bits, GROUP)

    return build


ROWS: list[tuple[str, int, Any]] = [  # (label, bits class, builder)
    ("FP=xINT default: FPxINTConfig()", 4, fpxint(FPxINTConfig())),
    ("FP=xINT 3-bit: FPxINTConfig(bits=3)", 3, fpxint(FPxINTConfig(bits=3))),
    ("FP=xINT T=2: FPxINTConfig(terms=2)", 8, fpxint(FPxINTConfig(terms=2))),
    ("FP=xINT one term everywhere: FPxINTConfig(terms=1)", 4, fpxint(FPxINTConfig(terms=1))),
    (
        "FP=xINT T=1, norm proxy (the former 4-bit recipe)",
        4,
        fpxint(FPxINTConfig(terms=1, group_size=GROUP, act_proxy="norm", second_order=False)),
    ),
    (
        "FP=xINT T=1, probe + second_order (GPTQ on random-token H)",
        4,
        fpxint(FPxINTConfig(terms=1, group_size=GROUP, act_proxy="probe", second_order=True)),
    ),
    ("RTN W3", 3, lambda d: rows.rtn_row(d, 3, GROUP)),
    ("RTN W4", 4, lambda d: rows.rtn_row(d, 4, GROUP)),
    ("RTN W8", 8, lambda d: rows.rtn_row(d, 8, GROUP)),
    ("HQQ 3-bit", 3, lambda d: rows.hqq_row(d, 3)),
    ("HQQ 4-bit", 4, lambda d: rows.hqq_row(d, 4)),
    ("bnb NF4", 4, rows.nf4_row),
    ("SINQ 3-bit", 3, peer(peers.sinq, 3)),
    ("SINQ 4-bit", 4, peer(peers.sinq, 4)),
    ("GPTQ 3-bit, calibrated", 3, gptq(3)),
    ("GPTQ 4-bit, calibrated", 4, gptq(4)),
]


def measure(fp_dir: Path, ref, label: str, bits_class: int, build: Any) -> dict[str, Any]:
    try:
        built = build(fp_dir)
    except (ImportError, FileNotFoundError, RuntimeError) as err:  # a peer that is not installed here
        print(f"{label}: skipped ({err})", flush=True)
        return {"label": label, "class": bits_class, "skipped": str(err)}
    m = evaluate_against(built.pop("model"), ref)
    gc.collect()
    row = {
        "label": label,
        "class": bits_class,
        **built,
        "ppl": m.perplexity,
        "kl": m.kl_vs_fp,
        "top1": m.top1_agreement,
    }
    print(f"{label:52s} {row['bits']:6.3f} b/w  KL {m.kl_vs_fp:.5f}  {row['quant_s']:7.1f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rerun",
        metavar="TEXTS",
        help="measure only the rows whose label contains one of these comma-separated texts; merge them into "
        "the committed JSON (written after every row, so an interrupted run keeps what it measured)",
    )
    ap.add_argument("--memory", action="store_true", help="measure quantize-on-load's peak RssAnon instead")
    ap.add_argument(
        "--memory-default-only", action="store_true", help="with --memory: the default config only"
    )
    ap.add_argument("--out", default=None, help="output prefix (default eval/results/default_<model>)")
    args = ap.parse_args(argv)
    out = Path(args.out or ROOT / "eval" / "results" / f"default_{args.model}")
    torch.set_num_threads(args.threads)
    fp_dir = model_dir(args.model)
    command = f"python eval/bench_default.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None
    if args.memory:
        import _memory

        names = ["default"] if args.memory_default_only else None
        res = {**(old or {}), "memory": _memory.measure(fp_dir, names), "memory_command": command}
        print(write_results(out, res, report.to_markdown))
        return 0
    if args.rerun and old is not None and old["tokens"] != args.tokens:
        ap.error(f"--rerun: {out}.json was measured on {old['tokens']} tokens, not {args.tokens}")
    start = time.perf_counter()
    from transformers import AutoTokenizer

    fp = rows.load_fp(fp_dir)
    windows = pydoc_windows(AutoTokenizer.from_pretrained(fp_dir), args.tokens, 512)
    ref = fp_reference(fp, windows, batch_size=1)
    fp_m = evaluate_against(fp, ref)
    del fp
    gc.collect()
    fp_row = {"label": "FP", "class": 32, "bits": 32.0, "ppl": fp_m.perplexity, "kl": 0.0, "top1": 1.0}
    merge = bool(args.rerun) and old is not None
    rows_now = [fp_row] if not merge else [r for r in old["rows"]]
    if merge:
        command = f"{old['command']}, then {command}"
    wanted = args.rerun.split(",") if args.rerun else None
    for label, bits_class, build in ROWS:
        if wanted is None or any(w in label for w in wanted):
            row = measure(fp_dir, ref, label, bits_class, build)
            at = next((i for i, r in enumerate(rows_now) if r["label"] == label), None)
            if at is None:
                rows_now.append(row)
            else:
                rows_now[at] = row
            res = {
                **(
                    {k: v for k, v in old.items() if k in ("memory", "memory_command", "note")} if old else {}
                ),
                "command": command,
                "model": MODELS[args.model],
                "tokens": windows.numel(),
                "group_size": GROUP,
                "threads": args.threads,
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "rows": rows_now,
                "wall_s": time.perf_counter() - start + (old["wall_s"] if merge else 0.0),
            }
            md = write_results(out, res, report.to_markdown)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
