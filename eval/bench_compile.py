"""Is decode bound by Python overhead or by the kernels?  Eager against ``torch.compile`` decode, in ONE process.

    python eval/bench_compile.py [--threads 2] [--steps 48]

For the bf16 model and FP=xINT W4A16 T=1 on the int4 kernel (``bench_speed``'s rows, SmolLM2-135M, ``lm_head``
bf16): a 32-token prompt, then ``--steps`` greedy one-token forwards with a ``StaticCache`` (fixed shapes, what
``torch.compile`` needs to compile the step once), first eager, then through ``torch.compile(model.forward)``
(inductor, default mode, ``dynamic=False``).  The first 5 steps of each run are warm-up (and compilation); the
compiled run is repeated and the faster of two taken; both must produce the same tokens.  Writes
``eval/results/compile.json`` and ``.md`` (``--rerender``: the markdown again from the JSON).  If compilation removed Python and dispatch overhead, the compiled
step would approach the kernels' own time; that it does not is the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

import bench_speed  # noqa: E402

from fpxint_hf.evaluation.results import write_results  # noqa: E402

OUT = ROOT / "eval" / "results" / "compile"
ROWS = ("bf16", "FP=xINT W4A16 T=1 int4")
WARMUP = 5


@torch.inference_mode()
def decode(model, forward, prompt: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Tokens/s of ``steps - WARMUP`` timed greedy steps through ``forward``, and every token produced."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)
    pos = torch.arange(prompt.shape[1])
    out = model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
    nxt, tokens, start = out.logits[:, -1:].argmax(-1), [], 0.0
    for i in range(steps):
        if i == WARMUP:
            start = time.perf_counter()
        position = torch.tensor([prompt.shape[1] + i])
        out = forward(input_ids=nxt, past_key_values=cache, cache_position=position, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
    return (steps - WARMUP) / (time.perf_counter() - start), tokens


def to_markdown(res: dict) -> str:
    lines = [
        "# Decode: eager against torch.compile",
        "",
        f"`{res['command']}`: SmolLM2-135M, {res['steps']} greedy steps after a 32-token prompt ({WARMUP} warm-up),"
        f" StaticCache, {res['threads']} threads, torch {res['torch']}, {res['wall_s'] / 60:.1f} min.",
        "",
        "| row | eager tok/s | compiled tok/s | compiled / eager | compile + first run s | same tokens as eager |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['row']} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | "
            f"{r['compiled_tok_s'] / r['eager_tok_s']:.2f}x | {r['compile_s']:.0f} | "
            + ("yes" if r["same_tokens"] else f"no: from step {r['first_different_step']} on")
            + " |"
        )
    lines += [
        "",
        "A compiled step still reads every weight the eager one reads; what compilation removes is Python and",
        "dispatch overhead between the kernels. Greedy tokens of a bf16 model can change where fused kernels round",
        "in another order. `compile + first run s` is short when inductor's on-disk cache holds the graphs of an",
        "earlier run (cold: about a minute on these 2 cores).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rerender", action="store_true", help="rewrite OUT.md from OUT.json and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rerender:
        out.with_suffix(".md").write_text(to_markdown(json.loads(out.with_suffix(".json").read_text())))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    fp_dir = bench_speed.fp_model_dir()
    from transformers import AutoTokenizer

    from fpxint_hf.evaluation.metrics import pydoc_windows

    prompt = pydoc_windows(AutoTokenizer.from_pretrained(fp_dir), 1024, 512)[0:1, :32]
    rows = []
    for name in ROWS:
        model = bench_speed.build({r.name: r for r in bench_speed.ROWS}[name], fp_dir)
        eager, tokens = decode(model, model.forward, prompt, args.steps)
        t = time.perf_counter()
        compiled = torch.compile(model.forward, dynamic=False)
        first, c_tokens = decode(model, compiled, prompt, args.steps)
        compile_s = time.perf_counter() - t
        second, c2_tokens = decode(model, compiled, prompt, args.steps)
        diff = [
            i for i, (a, b, c) in enumerate(zip(tokens, c_tokens, c2_tokens, strict=True)) if not a == b == c
        ]
        rows.append(dict(row=name, eager_tok_s=eager, compiled_tok_s=max(first, second), compile_s=compile_s,
                         same_tokens=not diff, first_different_step=diff[0] if diff else None))  # fmt: skip
        print(rows[-1], flush=True)
        torch._dynamo.reset()
    command = "python eval/bench_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = dict(command=command.strip(), steps=args.steps, threads=args.threads, torch=torch.__version__, rows=rows,
               wall_s=time.perf_counter() - start)  # fmt: skip
    print(write_results(out, res, to_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
