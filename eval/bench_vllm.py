"""Decode speed and memory: bf16 vs FP=xINT T=1 / T=2 in vLLM (CPU build) and in transformers, same prompts.

    .venv-vllm/bin/python eval/bench_vllm.py [--fp-dir DIR] [--tokens 64] [--out eval/results/vllm]

Runs in .venv-vllm (scripts/install-vllm.sh).  Every (engine, model) pair runs in a fresh child process, so its
peak RSS (the child and the engine processes it started) is its own.  Greedy decoding of the same 4 prompts, one
at a time, ``--tokens`` new tokens each; tokens/s counts the generated tokens over the generation wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "The three laws of motion are",
]
CACHE_FP = Path.home() / ".cache" / "fpxint_hf" / "smollm2-135m-instruct-q4_1-dequant-f32-v0.1.2"


class PeakRSS:
    """The largest summed RSS of this process and all its descendants (vLLM's engine runs in child processes),
    sampled every 0.2 s in a thread."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak, self._stop = 0, threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except Exception:  # a child exiting between listing and reading
                pass
            self._stop.wait(0.2)

    def stop_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(self.peak, own) / 2**20


def run_vllm(path: str, tokens: int, forward: str) -> dict:
    import vllm

    os.environ["FPXINT_VLLM_FORWARD"] = forward
    llm = vllm.LLM(path, dtype="bfloat16", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.15)
    params = vllm.SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens)
    llm.generate(PROMPTS[:1], vllm.SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start, n, texts = time.perf_counter(), 0, []
    for p in PROMPTS:
        out = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
        n += len(out.token_ids)
        texts.append(out.text)
    secs = time.perf_counter() - start
    del llm
    return {"tokens": n, "seconds": secs, "first_text": texts[0][:80]}


def run_transformers(path: str, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fpxint_hf  # noqa: F401  (registers "fpxint")

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=4, do_sample=False)  # warm-up
        start, n, texts = time.perf_counter(), 0, []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt")
            out = model.generate(**ids, **kw)[0, ids["input_ids"].shape[1] :]
            n += out.numel()
            texts.append(tok.decode(out))
    return {"tokens": n, "seconds": time.perf_counter() - start, "first_text": texts[0][:80]}


def child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    rss = PeakRSS()
    if args.engine == "vllm":
        res = run_vllm(args.path, args.tokens, args.forward)
    else:
        res = run_transformers(args.path, args.tokens)
    res["peak_rss_mb"] = rss.stop_mb()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def quantize(fp_dir: Path, out: Path, terms: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fpxint_hf

    if not (out / "config.json").is_file():
        cfg = fpxint_hf.FPxINTConfig(bits=4, terms=terms, group_size=64)
        AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=cfg, dtype=torch.float32
        ).save_pretrained(out)
        AutoTokenizer.from_pretrained(fp_dir).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp-dir", default=str(CACHE_FP), help="float SmolLM2 folder (made by `fpxint eval`)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/results/vllm")
    ap.add_argument("--work", default="/tmp/fpxint-bench-vllm")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="vllm", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--forward", default="dense", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    fp_dir, work = Path(args.fp_dir), Path(args.work)
    if not (fp_dir / "config.json").is_file():
        raise SystemExit(
            f"{fp_dir} is not a model folder: run `.venv/bin/fpxint eval --limit 0` once to build it"
        )
    models = {
        "bf16": fp_dir,
        "FP=xINT T=1": quantize(fp_dir, work / "t1", 1),
        "FP=xINT T=2": quantize(fp_dir, work / "t2", 2),
    }
    runs = [("transformers", name, "-") for name in models] + [("vllm", name, "dense") for name in models]
    runs += [("vllm", name, "int4") for name in models if name != "bf16"]
    rows, start = [], time.perf_counter()
    for engine, name, forward in runs:
        cmd = [sys.executable, __file__, "--child", "--engine", engine, "--path", str(models[name])]
        cmd += ["--forward", forward, "--tokens", str(args.tokens), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{engine} {name} {forward} failed:\n{done.stderr[-3000:]}")
        res = json.loads(line[len("RESULT ") :])
        rows.append(
            {
                "engine": engine,
                "model": name,
                "forward": forward,
                **res,
                "tok_s": res["tokens"] / res["seconds"],
            }
        )
        print(
            f"{engine:12s} {name:12s} {forward:6s} {rows[-1]['tok_s']:6.2f} tok/s  {res['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    import torch
    import vllm

    out = Path(args.out)
    res = {
        "command": "python eval/bench_vllm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (FP = its GGUF Q4_1 weights dequantized); FP=xINT: 4-bit terms, group 64",
        "prompts": PROMPTS,
        "tokens_per_prompt": args.tokens,
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__},
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    from fpxint_hf.evaluation.results import write_results

    print(write_results(out, res, to_markdown))
    return 0


def to_markdown(res: dict) -> str:
    base = {r["engine"]: r["tok_s"] for r in res["rows"] if r["model"] == "bf16"}
    lines = [
        "# Serving speed: vLLM (CPU build) and transformers",
        "",
        f"`{res['command']}`: {res['model']}; greedy, {len(res['prompts'])} prompts one at a time, "
        f"{res['tokens_per_prompt']} new tokens each, bf16 activations, {res['threads']} threads; "
        f"torch {res['versions']['torch']}, vLLM {res['versions']['vllm']}; {res['wall_s'] / 60:.1f} min.",
        "",
        "| engine | model | forward | tokens/s | vs bf16 (same engine) | peak RSS (MB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['engine']} | {r['model']} | {r['forward']} | {r['tok_s']:.2f} | "
            f"{r['tok_s'] / base[r['engine']]:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        'transformers rows use `forward_mode="auto"` (packed int8/int4 CPU kernels for bf16); vLLM `dense` dequantizes',
        "once after loading, `int4` keeps the packed codes and runs all of a layer's terms in one int4 kernel call.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
