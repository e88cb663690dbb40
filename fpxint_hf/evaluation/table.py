"""The paper's LLM table (MMLU by category) for FP, RTN-W4 ("Normal") and FP=xINT with 1, 2, 3 terms,
plus the metrics that resolve small quantization damage (perplexity, KL from FP, top-1 agreement), each row
with its bits per weight.

FP=xINT row k is its own ``terms=k`` checkpoint with the default settings (nested series, optimized fit, activation
proxy), each fitted for its k: reading the first k terms of a longer nested checkpoint is a little worse (the
first term is fitted for the whole series; the Pareto benchmark measures that trade-off).
RTN is an independent path: ``expansion.rtn`` (asymmetric min-max round-to-nearest, same group size) written into
a copy of the FP weights (fake quantization), counted as X bits + float16 scale and zero per group. Row ``rtn2x`` is
RTN with 2X bits: the equal-bits peer of T=2 (2X bits + 32/group against T=2's 2X bits + 32/group).
"""

from __future__ import annotations

import gc
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..expansion import resolve_group_size, rtn
from ..hf import FPxINTConfig
from ..model_ops import model_bits_per_weight
from ..settings import DEFAULTS
from .assets import FP_LABEL, fp_model_dir
from .metrics import (
    DEFAULT_CONTEXT,
    DEFAULT_TOKENS,
    QualityMetrics,
    evaluate_against,
    fp_reference,
    pydoc_windows,
)
from .mmlu import CATEGORIES, MMLUResult, run_mmlu
from .rows import DEFAULT_MMLU_LIMIT, ROW_KINDS

logger = logging.getLogger(__name__)

# The paper's Table 6 (MMLU Avg., %), quoted for reference; its per-category numbers are not reproduced here.
PAPER_MMLU_AVG = {
    "LLaMA3-8B": {"FP": 64.8, "Normal (RTN W4A16)": 62.5, "FP=xINT": 64.7},
    "LLaMA2-7B": {"FP": 45.7, "FP=xINT": 45.7},
}


@dataclass
class Row:
    """One line of the table."""

    name: str
    bits_per_weight: float | None  # of the quantized linear weights (None: FP, 32-bit floats here)
    quality: QualityMetrics
    mmlu: MMLUResult | None
    quantize_s: float | None = None


@dataclass
class TableResult:
    rows: list[Row]
    settings: dict[str, Any]
    environment: dict[str, Any]
    wall_time_s: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def row(r: Row) -> dict[str, Any]:
            out = asdict(r)
            out["quality"] = r.quality.to_json()
            out["mmlu"] = None if r.mmlu is None else r.mmlu.to_json()
            return out

        return {
            "rows": [row(r) for r in self.rows],
            "settings": self.settings,
            "environment": self.environment,
            "wall_time_s": self.wall_time_s,
            "paper_mmlu_avg": PAPER_MMLU_AVG,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableResult:
        """Inverse of :meth:`to_json` (``paper_mmlu_avg`` is this module's constant, not read back)."""

        def row(r: dict[str, Any]) -> Row:
            mmlu = None if r["mmlu"] is None else MMLUResult(**r["mmlu"])
            return Row(r["name"], r["bits_per_weight"], QualityMetrics(**r["quality"]), mmlu, r["quantize_s"])

        rows = [row(r) for r in data["rows"]]
        return cls(rows, data["settings"], data["environment"], data["wall_time_s"], data["notes"])

    def document(self) -> str:
        """The markdown file ``fpxint eval --out`` writes: title, the command, then :meth:`to_markdown`."""
        return f"# FP=xINT table\n\nCommand: `{self.settings.get('command', '?')}`\n\n{self.to_markdown()}"

    def to_markdown(self) -> str:
        s = self.settings
        head = (
            "| method | bits/weight | Hums. | STEM | Social | Other | Avg. | PPL | KL vs FP (nats) | top-1 vs FP "
            "| quantize_s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        lines = []
        for r in self.rows:
            cats = [_pct(getattr(r.mmlu, c)) if r.mmlu else "-" for c in (*CATEGORIES, "overall")]
            bpw = "32 (fp32)" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}"
            q = r.quality
            lines.append(
                f"| {r.name} | {bpw} | {' | '.join(cats)} | {q.perplexity:.3f} | {q.kl_vs_fp:.4f} | "
                f"{100 * q.top1_agreement:.2f}% | {'-' if r.quantize_s is None else f'{r.quantize_s:.1f}'} |"
            )
        limit = s["mmlu_limit"]
        subset = "all questions" if limit is None else f"first {limit} questions per subject"
        mmlu_desc = (
            "MMLU: not run"
            if s["mmlu_limit"] == 0
            else f"MMLU: 0-shot, lm-eval's stock `mmlu` group on {s.get('mmlu_source', '?')}, "
            f"{subset}"
            f" ({s.get('mmlu_questions', '?')} questions); Avg. = lm-eval's question-weighted `mmlu` accuracy "
            "(not the mean of the four categories)."
        )
        paper = "; ".join(
            f"{model}: " + ", ".join(f"{k} {v}" for k, v in nums.items())
            for model, nums in PAPER_MMLU_AVG.items()
        )
        return (
            f"Model: {s['model']} — {s.get('fp_label', FP_LABEL)}. Quantized: every linear layer except `lm_head` "
            f"(bits={s['bits']}, group_size={s['group_size']}; layers whose in-features it does not divide use "
            "the largest power of two that does).\n\n"
            + head
            + "\n".join(lines)
            + f"\n\n{mmlu_desc}\nPPL / KL / top-1: {s['tokens']} pydoc tokens in windows of {s['context']}, "
            "against the FP model on the same tokens.\n"
            f"bits/weight: stored bytes of the quantized linear weights (codes + scales + zeros + outliers) / "
            f"their count.\nPaper (Table 6, MMLU Avg. %, for reference only): {paper}.\n"
            + "".join(f"\n- {n}" for n in self.notes)
        )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


class _RowList(list):
    """A list that reports every appended row to ``on_row``."""

    def __init__(self, on_row: Callable[[Row], None] | None) -> None:
        super().__init__()
        self._on_row = on_row

    def append(self, row: Row) -> None:
        super().append(row)
        if self._on_row is not None:
            self._on_row(row)


def quantizable_linears(model: nn.Module, config: FPxINTConfig | None = None) -> list[tuple[str, nn.Linear]]:
    """The linear layers the FP=xINT quantizer converts under ``config`` (default settings when ``None``): the
    quantizer's own rule (``hf.replace.linears_to_quantize``), so RTN and peer rows cover the same layers."""
    from ..hf.replace import linears_to_quantize, modules_to_not_convert

    return linears_to_quantize(model, modules_to_not_convert(model, config or FPxINTConfig()))


def _model_label(model_dir: str | Path | None) -> str:
    """The embedded default's name, a local folder's name, or a hub id as given."""
    if model_dir is None:
        return "SmolLM2-135M-Instruct"
    return Path(model_dir).name if Path(model_dir).is_dir() else str(model_dir)


@torch.no_grad()
def rtn_model(fp_dir: str | Path, bits: int, group_size: int | None) -> tuple[nn.Module, float]:
    """FP model with RTN-dequantized linear weights, and its bits per weight (X + 32 / group)."""
    from transformers import AutoModelForCausalLM

    from ..hf.replace import quiet_group_fallback, warn_group_fallback

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    stored, n, used = 0.0, 0, {}
    linears = [m for _, m in quantizable_linears(model)]
    with quiet_group_fallback():  # one warning for all layers, as the FP=xINT rows
        for m in linears:
            gs = used[m.in_features] = resolve_group_size(m.in_features, group_size)
            m.weight.copy_(rtn(m.weight, bits, gs))
            stored += m.weight.numel() * (bits + 32 / gs)
            n += m.weight.numel()
    warn_group_fallback(group_size, [m.in_features for m in linears], used)
    return model, stored / n


def _environment() -> dict[str, Any]:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import lm_eval

        env["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    env["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    return env


def run_table(
    rows: tuple[str, ...] = ROW_KINDS,
    bits: int = 4,
    group_size: int | None = DEFAULTS.group_size,
    mmlu_limit: int | None = DEFAULT_MMLU_LIMIT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    model_dir: str | Path | None = None,
    mmlu_local: bool | None = None,
    cache_dir: str | Path | None = None,
    *,
    extra_rows: dict[str, Callable[[str], tuple[str, nn.Module, float]]] | None = None,
    mmlu_options: dict[str, Any] | None = None,
    on_row: Callable[[Row], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TableResult:
    """Build every requested row. ``mmlu_limit``: questions per subject (``None``: all; 0: skip MMLU).

    ``extra_rows`` adds row kinds beyond :data:`ROW_KINDS`: ``kind -> build(fp_dir) -> (name, model, bits per
    weight)`` (e.g. a peer method); ``mmlu_options`` are passed on to :func:`run_mmlu` (``local_dir``,
    ``per_question``); ``on_row`` is called with each finished row (e.g. to save partial results), ``on_status`` with a line
    saying which row is being built or scored and how many remain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra_rows = extra_rows or {}
    bad = sorted(set(rows) - set(ROW_KINDS) - set(extra_rows))
    if bad:
        raise ValueError(f"rows={bad} unknown; allowed: {(*ROW_KINDS, *extra_rows)}")
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    if repeated:
        raise ValueError(f"rows={repeated} repeated; name each row once")
    start = time.perf_counter()
    # a local folder or a hub id (kept a string: from_pretrained resolves it through the hub cache)
    fp_dir = str(model_dir) if model_dir else fp_model_dir(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    windows = pydoc_windows(tokenizer, tokens, context)
    if on_status is not None:
        on_status(f"loading the FP model and scoring it on {len(windows)} windows of {context} tokens")
    t = time.perf_counter()
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    fp_load_s = time.perf_counter() - t
    from ..hf.replace import check_group_size

    check_group_size(group_size, [m.in_features for _, m in quantizable_linears(fp)])  # before any row
    reference = fp_reference(fp, windows)
    if "fp" not in rows:
        fp = None  # only its reference is needed from here on: free the float32 model before the next one loads
    settings: dict[str, Any] = {
        "model": _model_label(model_dir),
        "fp_label": FP_LABEL if model_dir is None else "FP = its published weights in float32",
        "bits": bits,
        "group_size": group_size,
        "mmlu_limit": mmlu_limit,
        "tokens": reference.n_tokens + len(windows),
        "context": context,
        "rows": list(rows),
        "fp_load_s": fp_load_s,
    }

    say = on_status or (lambda message: None)
    n_rows = len(rows)
    row_label = {"fp": "FP", "rtn": f"RTN W{bits}", "rtn2x": f"RTN W{2 * bits}"}
    row_label |= {f"t{k}": f"FP=xINT T={k}" for k in (1, 2, 3)}

    def mmlu(model: nn.Module, step: str) -> MMLUResult | None:
        if mmlu_limit == 0:
            return None
        subset = "all questions" if mmlu_limit is None else f"{mmlu_limit} questions per subject"
        say(f"{step}: MMLU ({subset})")
        result = run_mmlu(
            model, tokenizer, mmlu_limit, mmlu_local, cache_dir=cache_dir, **(mmlu_options or {})
        )
        settings["mmlu_source"], settings["mmlu_questions"] = result.source, result.n_questions
        return result

    def score(model: nn.Module, step: str) -> QualityMetrics:
        say(f"{step}: PPL / KL / top-1 on {settings['tokens']:,} tokens")
        return evaluate_against(model, reference)

    out: list[Row] = _RowList(on_row)
    progress = tqdm(rows, desc="FP=xINT table", unit="row", disable=None)
    for i, kind in enumerate(progress, 1):
        progress.set_postfix_str(kind)
        step = f"row {i}/{n_rows} ({row_label.get(kind, kind)})"
        row_start = time.perf_counter()
        if kind == "fp":
            # the FP row scores the reference itself: no second pass over the same tokens
            fp_quality = QualityMetrics(reference.perplexity, 0.0, 1.0, reference.n_tokens)
            out.append(Row("FP", None, fp_quality, mmlu(fp, step)))
            fp = None
            gc.collect()
        elif kind in extra_rows:
            say(f"{step}: building")
            name, model, bpw = extra_rows[kind](str(fp_dir))
            elapsed = time.perf_counter() - row_start
            out.append(Row(name, bpw, score(model, step), mmlu(model, step), elapsed))
            del model
            gc.collect()
        elif kind in ("rtn", "rtn2x"):
            rtn_bits = bits if kind == "rtn" else 2 * bits
            say(f"{step}: building (round-to-nearest of the FP weights)")
            model, bpw = rtn_model(fp_dir, rtn_bits, group_size)
            elapsed = time.perf_counter() - row_start
            name = f"RTN W{rtn_bits} (Normal)" if kind == "rtn" else f"RTN W{rtn_bits} (equal bits to T=2)"
            out.append(Row(name, bpw, score(model, step), mmlu(model, step), elapsed))
            del model
            gc.collect()
        else:
            k = int(kind[1:])
            say(f"{step}: building (quantizing the FP model)")
            cfg = FPxINTConfig(bits=bits, terms=k, group_size=group_size)
            model = AutoModelForCausalLM.from_pretrained(
                fp_dir, quantization_config=cfg, dtype=torch.float32
            ).eval()
            elapsed = time.perf_counter() - row_start
            settings.setdefault("fpxint_configs", {})[kind] = cfg.to_dict()
            name = f"FP=xINT T={k} ({k}x{bits}-bit)"
            quality = score(model, step)
            out.append(Row(name, model_bits_per_weight(model), quality, mmlu(model, step), elapsed))
            del model
            gc.collect()
        left = n_rows - i
        say(f"{step}: done in {time.perf_counter() - row_start:.0f} s; {left} row{'s' * (left != 1)} to go")
    notes = [
        "Each FP=xINT row is its own checkpoint, fitted for its T (the nested rule fits the first term for the "
        "whole series, so the first terms of a longer checkpoint are a little worse; see eval/results/pareto.md); "
        f"`quantize_s` is each quantized row's build time in seconds (load + quantize; RTN: load + round); the FP "
        f"model loads in {fp_load_s:.1f} s.",
    ]
    if model_dir is None:  # what holds for the embedded SmolLM2 only
        notes += [
            "SmolLM2-135M is near chance on MMLU; PPL, KL and top-1 are the metrics that resolve quantization "
            "damage.",
            "Its weights come from a Q4_1 GGUF (4-bit min-max per block of 32): a 4-bit quantizer with group 32 "
            "re-finds that grid almost losslessly, so group 32 is not used here.",
        ]
    return TableResult(list(out), settings, _environment(), time.perf_counter() - start, notes)
