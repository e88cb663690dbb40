"""Side-by-side benchmark of FP=xINT against baselines and other 4-bit weight-only methods, in ONE process.

    python eval/bench.py [--quick]

Same model (the SmolLM2-135M FP folder of ``fpxint_hf.evaluation.assets.fp_model_dir()``), same inputs, rows:
bf16 and fp32 baselines, RTN W4 (fake-quantized, same group size as FP=xINT), bitsandbytes NF4, HQQ 4-bit
(``hqq.core.quantize.HQQLinear`` per ``nn.Linear``), torchao int4 weight-only (if it runs on CPU), FP=xINT T=1,2,3.
A row whose library is missing or fails is kept in the output with the reason.

Columns: bits per weight of the quantized linear weights from their stored bytes; PPL / KL / top-1 on the pydoc
text (``fpxint_hf.evaluation.metrics``) in the row's compute dtype, against the fp32 model; quantization wall
time (load + quantize) as a ratio to RTN's; prefill tokens/s (one 512-token forward) and decode tokens/s
(greedy ``generate``, batch 1), medians of repeats, timed round-robin over all rows and reported as ratios to
bf16; resident-memory increase of building each row (RSS is process-wide, so this is the RSS after the row's
model is built minus the RSS before, with every earlier model still resident) and the process peak RSS.
Writes ``eval/results/bench.json`` and ``eval/results/bench.md``.

Comparison libraries (the ``bench`` extra), installed without their dependencies so torch is left alone:
``pip install --no-deps bitsandbytes==0.50.2 hqq==0.2.8.post1 einops termcolor`` (psutil for RSS).
torchao (``pip install --no-deps torchao==0.18.0``) is tried; its int4 weight-only path has no CPU packing
format in that release, so the row is skipped with the recorded error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fpxint_hf.evaluation.assets import fp_model_dir  # noqa: E402
from fpxint_hf.evaluation.metrics import evaluate_against, fp_reference, pydoc_windows  # noqa: E402
from fpxint_hf.evaluation.table import rtn_model  # noqa: E402
from fpxint_hf.hf import FPxINTConfig  # noqa: E402
from fpxint_hf.linear import model_bits_per_weight  # noqa: E402

BITS, GROUP = 4, 128
SLOW_DECODE_TOK_S, SLOW_DECODE_TOKENS = 2.0, 8
OUT_DIR = ROOT / "eval" / "results"

try:
    import psutil

    _PROC = psutil.Process()
except ImportError:  # pragma: no cover
    _PROC = None


def rss_mb() -> float | None:
    return None if _PROC is None else _PROC.memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out_emb = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not out_emb]


def _tbytes(*ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------ row builders: (model, bits/weight, notes)


def build_dense(fp_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype).eval()
    return model, 16.0 if dtype == torch.bfloat16 else 32.0, []


def build_rtn(fp_dir: Path):
    model, bpw = rtn_model(fp_dir, BITS, GROUP)
    return model, bpw, []


def build_bnb(fp_dir: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu"
    ).eval()
    import bitsandbytes as bnb

    stored = n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            stored += _tbytes(m.weight, qs.absmax, qs.code)
            if getattr(qs, "nested", False):
                stored += _tbytes(qs.state2.absmax, qs.state2.code, getattr(qs, "offset", None))
            n += m.in_features * m.out_features
    return model, 8 * stored / n, [f"bitsandbytes {bnb.__version__}: NF4, blocksize 64, float32 absmax"]


def build_hqq(fp_dir: Path):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()
    qcfg = BaseQuantizeConfig(nbits=BITS, group_size=64)
    stored = n = 0
    for name, lin in _linears(model):
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
            f"hqq {getattr(hqq, '__version__', '0.2.8.post1')}: 4-bit, group 64, bf16 scale+zero, default optimizer"
        ],
    )


def build_torchao(fp_dir: Path):
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()
    lin_names = {n for n, _ in _linears(model)}
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


# ------------------------------------------------------------------ timing


@torch.no_grad()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    t = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def _environment(threads: int) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        env["cpu"] = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
        )
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        env["cpu_flags"] = sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))})
    except OSError:
        pass
    for mod in ("bitsandbytes", "hqq", "torchao", "psutil"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod)
        except Exception:
            env[mod] = None
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller budget (1024 PPL tokens, 1 timing repeat)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(OUT_DIR / "bench"), help="output prefix (.json, .md)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    settings = {
        "quick": args.quick,
        "ppl_tokens": 1024 if args.quick else 2048,
        "context": 512,
        "prefill_tokens": 512,
        "decode_prompt_tokens": 32,
        "decode_new_tokens": 16 if args.quick else 32,
        "repeats": 1 if args.quick else 3,
        "bits": BITS,
        "group_size": GROUP,
    }
    start = time.perf_counter()
    fp_dir = fp_model_dir()
    tok = AutoTokenizer.from_pretrained(fp_dir)
    windows = pydoc_windows(tok, settings["ppl_tokens"], settings["context"])
    long_windows = pydoc_windows(tok, 1024, 512)
    prefill_ids = long_windows[1:2]  # [1, 512]
    prompt = long_windows[0:1, : settings["decode_prompt_tokens"]]

    specs: list[tuple[str, str, Any]] = [
        ("fp32", "float32", lambda: build_dense(fp_dir, torch.float32)),
        ("bf16", "bfloat16", lambda: build_dense(fp_dir, torch.bfloat16)),
        ("RTN W4 g128", "bfloat16", lambda: build_rtn(fp_dir)),
        ("bnb NF4", "bfloat16", lambda: build_bnb(fp_dir)),
        ("HQQ 4-bit g64", "bfloat16", lambda: build_hqq(fp_dir)),
        ("torchao int4wo g64", "bfloat16", lambda: build_torchao(fp_dir)),
        *[(f"FP=xINT T={t}", "bfloat16", (lambda t=t: build_fpxint(fp_dir, t))) for t in (1, 2, 3)],
    ]
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    reference = None
    for name, dtype, build in specs:
        print(f"[bench] building {name}", flush=True)
        row: dict[str, Any] = {"name": name, "compute_dtype": dtype}
        gc.collect()
        rss0 = rss_mb()
        t = time.perf_counter()
        try:
            model, bpw, notes = build()
        except Exception as e:  # keep the row with the reason
            row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
            print(f"[bench] {name} skipped: {row['skipped']}", flush=True)
            rows.append(row)
            gc.collect()
            continue
        row["quantize_s"] = time.perf_counter() - t
        if name.startswith("RTN"):
            rtn_fp32 = model
            model = None
        gc.collect()
        row["bits_per_weight"] = bpw
        row["notes"] = notes
        if name == "fp32":
            reference = fp_reference(model, windows)
        assert reference is not None
        if name.startswith("RTN"):
            # RTN is fake quantization (dequantized weights in a dense model): score it in fp32 too, then run
            # it in bf16 like the other quantized rows; its speed is that of the dense bf16 model (not timed).
            row["fp32_quality"] = evaluate_against(rtn_fp32, reference).to_json()
            model = rtn_fp32.to(torch.bfloat16)
            del rtn_fp32
            gc.collect()
            row["notes"].append("fake-quantized (dequantized weights in a dense bf16 model); speed not timed")
        row["rss_increase_mb"] = None if rss0 is None else rss_mb() - rss0
        row["quality"] = evaluate_against(model, reference).to_json()
        row["peak_rss_after_mb"] = peak_rss_mb()
        print(
            f"[bench] {name}: bpw={bpw:.3f} ppl={row['quality']['perplexity']:.3f} "
            f"q={row['quantize_s']:.1f}s",
            flush=True,
        )
        rows.append(row)
        models[name] = model

    # ---- timing: round-robin over all timed rows, repeats interleaved
    timed = [n for n in models if not n.startswith("RTN")]
    prefill: dict[str, list[float]] = {n: [] for n in timed}
    decode: dict[str, list[float]] = {n: [] for n in timed}
    by_name = {r["name"]: r for r in rows}
    with torch.no_grad():
        new_tokens: dict[str, int] = {}
        for n in timed:  # warm-up (kernel preparation, allocator); very slow decoders get a smaller budget
            time_prefill(models[n], prefill_ids[:, :64])
            rate = 4 / time_decode(models[n], prompt, 4)
            slow = rate < SLOW_DECODE_TOK_S
            new_tokens[n] = SLOW_DECODE_TOKENS if slow else settings["decode_new_tokens"]
            if slow:
                by_name[n]["notes"].append(
                    f"slow decode (~{rate:.2f} tok/s at warm-up): decode timed once on {SLOW_DECODE_TOKENS} new "
                    "tokens to keep the run short"
                )
        for rep in range(settings["repeats"]):
            print(f"[bench] timing round {rep + 1}/{settings['repeats']}", flush=True)
            for n in timed:
                prefill[n].append(time_prefill(models[n], prefill_ids))
                if rep == 0 or new_tokens[n] == settings["decode_new_tokens"]:
                    decode[n].append(time_decode(models[n], prompt, new_tokens[n]))
    for row in rows:
        n = row["name"]
        if n in timed:
            row["prefill_s"], row["decode_s"] = prefill[n], decode[n]
            row["prefill_tok_s"] = settings["prefill_tokens"] / statistics.median(prefill[n])
            row["decode_new_tokens"] = new_tokens[n]
            row["decode_tok_s"] = new_tokens[n] / statistics.median(decode[n])
    by = {r["name"]: r for r in rows}
    bf16, rtn = by["bf16"], by["RTN W4 g128"]
    for row in rows:
        if "prefill_tok_s" in row:
            row["prefill_vs_bf16"] = row["prefill_tok_s"] / bf16["prefill_tok_s"]
            row["decode_vs_bf16"] = row["decode_tok_s"] / bf16["decode_tok_s"]
        if "quantize_s" in row and "quantize_s" in rtn:
            row["quantize_vs_rtn"] = row["quantize_s"] / rtn["quantize_s"]

    result = {
        "rows": rows,
        "targets": targets(by),
        "settings": settings,
        "environment": _environment(threads),
        "process_peak_rss_mb": peak_rss_mb(),
        "wall_time_s": time.perf_counter() - start,
        "command": "python eval/bench.py" + (" --quick" if args.quick else ""),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def targets(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The acceptance targets, each with the measured numbers and met / missed / not measurable."""
    out: list[dict[str, Any]] = []

    def ppl(n: str) -> float | None:
        r = by.get(n, {})
        return r["quality"]["perplexity"] if "quality" in r else None

    def add(target: str, ok: bool | None, measured: str) -> None:
        out.append({"target": target, "met": ok, "measured": measured})

    t1, t2, rtn, nf4, fp = (
        ppl("FP=xINT T=1"),
        ppl("FP=xINT T=2"),
        ppl("RTN W4 g128"),
        ppl("bnb NF4"),
        ppl("fp32"),
    )
    b1 = by.get("FP=xINT T=1", {}).get("bits_per_weight")
    if t1 is not None and rtn is not None:
        add("T=1 PPL <= RTN-W4 PPL", t1 <= rtn, f"T=1 {t1:.4f} vs RTN {rtn:.4f} (both bf16)")
    if t1 is not None and nf4 is not None:
        bn = by["bnb NF4"]["bits_per_weight"]
        add(
            "T=1 PPL <= NF4 PPL at no more bits",
            t1 <= nf4 and b1 <= bn,
            f"T=1 {t1:.4f} @ {b1:.3f} b/w vs NF4 {nf4:.4f} @ {bn:.3f} b/w",
        )
    elif t1 is not None:
        add("T=1 PPL <= NF4 PPL at no more bits", None, "NF4 row skipped")
    if t2 is not None and fp is not None:
        rel = t2 / fp - 1
        add(
            "T=2 PPL within 1% of FP",
            abs(rel) <= 0.01,
            f"T=2 {t2:.4f} (bf16) vs FP {fp:.4f} (fp32): {100 * rel:+.2f}%",
        )
        bf = ppl("bf16")
        if bf is not None:
            out[-1]["measured"] += f"; vs bf16 {bf:.4f}: {100 * (t2 / bf - 1):+.2f}%"
    for t, need in ((1, 1.0), (2, 0.8)):
        r = by.get(f"FP=xINT T={t}", {})
        if "decode_vs_bf16" in r:
            add(
                f"decode T={t} >= {need}x bf16",
                r["decode_vs_bf16"] >= need,
                f"{r['decode_vs_bf16']:.3f}x bf16",
            )
    for t in (1, 2, 3):
        r = by.get(f"FP=xINT T={t}", {})
        if "bits_per_weight" in r:
            limit = t * BITS + 0.5
            add(
                f"T={t} linear weights <= (T*X+0.5)/16 of bf16",
                r["bits_per_weight"] <= limit,
                f"{r['bits_per_weight']:.3f} b/w = {r['bits_per_weight'] / 16:.4f} of bf16 (limit {limit / 16:.4f})",
            )
        if "quantize_vs_rtn" in r:
            add(
                f"T={t} quantization time <= 3x RTN",
                r["quantize_vs_rtn"] <= 3,
                f"{r['quantize_vs_rtn']:.2f}x RTN",
            )
    return out


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def to_markdown(res: dict[str, Any]) -> str:
    s, env = res["settings"], res["environment"]
    lines = [
        "# Side-by-side benchmark (one process)",
        "",
        f"`{res['command']}` — SmolLM2-135M-Instruct FP folder (GGUF Q4_1 dequantized to fp32); "
        f"{env.get('cpu', '?')}, {env['cpu_count']} cores, torch {env['torch']} with "
        f"{env['torch_threads']} threads, transformers {env['transformers']}; wall {res['wall_time_s']:.0f} s.",
        "",
        "| method | dtype | bits/weight | PPL | KL vs fp32 | top-1 | quant time (s) | quant vs RTN | "
        "prefill tok/s | prefill vs bf16 | decode tok/s | decode vs bf16 | RSS +MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        q = r["quality"]
        lines.append(
            f"| {r['name']} | {r['compute_dtype']} | {r['bits_per_weight']:.3f} | {q['perplexity']:.3f} | "
            f"{q['kl_vs_fp']:.4f} | {100 * q['top1_agreement']:.1f}% | {r['quantize_s']:.1f} | "
            f"{_f(r.get('quantize_vs_rtn'), '.2f')} | {_f(r.get('prefill_tok_s'), '.0f')} | "
            f"{_f(r.get('prefill_vs_bf16'), '.2f')} | {_f(r.get('decode_tok_s'), '.1f')} | "
            f"{_f(r.get('decode_vs_bf16'), '.2f')} | {_f(r.get('rss_increase_mb'), '.0f')} |"
        )
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for t in res["targets"]:
        met = {True: "yes", False: "**MISSED**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    rtn = next((r for r in res["rows"] if r["name"].startswith("RTN") and "fp32_quality" in r), None)
    lines += [
        "",
        "## Protocol",
        "",
        f"- PPL / KL / top-1: first {s['ppl_tokens']} pydoc tokens in windows of {s['context']} "
        "(`fpxint_hf.evaluation.metrics`), each row in its compute dtype (fp32 row in fp32, all others in bf16), "
        "KL and top-1 against the fp32 model."
        + (
            f" RTN scored in fp32 (fake-quantized weights): PPL {rtn['fp32_quality']['perplexity']:.3f}."
            if rtn
            else ""
        ),
        "- bits/weight: stored bytes of the quantized linear weights (all `nn.Linear` except `lm_head`, which is "
        "tied to the embedding and kept) / their count. FP=xINT: codes + fp16 scales + zeros + term count; RTN: "
        "4 bits + fp16 scale and zero per group; bnb: packed uint8 + fp32 absmax + NF4 code table; HQQ: packed "
        "W_q + bf16 scale + zero; dense rows: 16 / 32.",
        f"- Group size: RTN and FP=xINT {s['group_size']} (64 for the 576-input layers, which 128 does not "
        "divide); bnb NF4 blocksize 64 and HQQ group 64 (their defaults), so they spend more bits on scales.",
        "- Quantization time: wall time of building the row (load from the fp32 safetensors folder + quantize), "
        "ratio to RTN (`fpxint_hf.evaluation.table.rtn_model`: load fp32 + round-to-nearest). The dense rows' "
        "times are plain loads.",
        f"- Prefill: one forward of {s['prefill_tokens']} tokens (batch 1, no cache); decode: greedy `generate` "
        f"of {s['decode_new_tokens']} new tokens after a {s['decode_prompt_tokens']}-token prompt (batch 1; the "
        "time includes the prompt's prefill); median of "
        f"{s['repeats']} repeat(s), rows timed round-robin after one warm-up each.",
        f"- Decode of rows slower than {SLOW_DECODE_TOK_S} tok/s at warm-up: timed once on {SLOW_DECODE_TOKENS} new tokens.",
        "- RSS +MB: process RSS after building the row minus before (earlier rows' models stay resident, freed "
        "allocator memory may be reused, so this is an estimate of the row's resident size). Process peak RSS: "
        f"{res['process_peak_rss_mb']:.0f} MB (getrusage, monotone over the whole run).",
    ]
    for r in res["rows"]:
        for n in r.get("notes", []):
            lines.append(f"- {r['name']}: {n}")
        if "skipped" in r:
            lines.append(f"- {r['name']} skipped: {r['skipped']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
