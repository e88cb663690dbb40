"""Quality per bit: PPL and KL vs bits per weight for FP=xINT configurations and their peers, group 64 everywhere.

    python eval/bench_pareto.py [--tokens 8192] [--out eval/results/pareto]

One process, float32 forward for every row, the same pydoc tokens (windows of 512).  Writes
``<out>.json``, ``<out>.md`` (table + targets met/missed) and ``<out>.png`` (PPL and KL against bits).
Needs the ``bench`` extra (hqq, bitsandbytes; installed with ``--no-deps``) and the SINQ authors' package
(``pip install --no-deps --target DIR sinq==0.2.0``, delete ``DIR/sitecustomize.py``, ``SINQ_AUTO_PATCH=0``,
DIR on ``PYTHONPATH``); the Hadamard and HIGGS peers are written in ``eval/_pareto_peers.py``.

A new FP=xINT row is one line in ``ROWS`` (or ``ABLATIONS``, run with ``--ablations``):
``ours("label", bits=4, terms=1, <any FPxINTConfig field>=...)`` (nested series and the optimized fit unless
given); it takes part in the FP=xINT targets automatically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pareto_peers as peers  # noqa: E402
import _pareto_report as report  # noqa: E402
import _pareto_rows as rows  # noqa: E402

from fpxint_hf.evaluation.metrics import evaluate_against  # noqa: E402
from fpxint_hf.evaluation.results import write_results  # noqa: E402
from fpxint_hf.evaluation.table import quantizable_linears  # noqa: E402
from fpxint_hf.expansion import ExpandOptions, expand  # noqa: E402
from fpxint_hf.hf.probe import probe_second_moments  # noqa: E402

NESTED = {"series": "nested", "fit": "optimized"}
LEGACY = {"series": "legacy", "fit": "minmax"}
DUAL = "FP=xINT dual_scale"  # the opt-in SINQ-style column scales: a curve of its own
INT8 = "FP=xINT int8 bias"  # zero_bits=8 (with or without dual_scale): a curve of its own
PROBE = "FP=xINT probe"  # act_proxy="probe": the fit weighted by the FP model's input energies on random ids


def ours(label: str, family: str = "FP=xINT", active: int | None = None, **cfg: Any) -> tuple[str, str, Any]:
    """A row of FP=xINT quantized with ``FPxINTConfig(group_size=64, **cfg)`` (``NESTED`` unless overridden)."""
    cfg = {**NESTED, **cfg}
    return (label, family, lambda d: rows.fpxint_row(d, active=active, **cfg))


def int8_budget(bits: int, budget: float, **extra: Any) -> tuple[str, str, Any]:
    """``bits=[bits, 2]`` with ``bits_budget``, ``dual_scale`` and ``zero_bits=8``: the opt-in row of each bracket
    (``act_proxy="probe"`` in ``extra``: the same row in the probe family)."""
    probe = extra.get("act_proxy") == "probe"
    label = f"FP=xINT budget {budget} ({bits}+2), dual_scale, int8 bias" + (", probe" if probe else "")
    family = PROBE if probe else INT8
    return ours(
        label, family, bits=[bits, 2], terms=2, bits_budget=budget, dual_scale=True, zero_bits=8, **extra
    )


def probed(label: str, **cfg: Any) -> tuple[str, str, Any]:
    """A row of the probe family: ``label + ", probe"`` quantized with ``act_proxy="probe"``."""
    return ours(f"{label}, probe", PROBE, act_proxy="probe", **cfg)


def peer(fn: Any, bits: int) -> Any:
    """A builder for an ``_pareto_peers`` quantizer ``fn(w, bits, seed)`` (seed: the layer index)."""
    return lambda d: rows.counted_row(d, lambda w, i: fn(w, bits, i))


ROWS: list[tuple[str, str, Any]] = [  # (label, family, builder): the curve and every row a target reads
    ("RTN W3", "RTN", lambda d: rows.rtn_row(d, 3)),
    ("RTN W4", "RTN", lambda d: rows.rtn_row(d, 4)),
    ("RTN W6", "RTN", lambda d: rows.rtn_row(d, 6)),
    ("RTN W8", "RTN", lambda d: rows.rtn_row(d, 8)),
    ("HQQ 3-bit", "HQQ", lambda d: rows.hqq_row(d, 3)),
    ("HQQ 4-bit", "HQQ", lambda d: rows.hqq_row(d, 4)),
    ("bnb NF4", "NF4", rows.nf4_row),
    ("SINQ 3-bit", "SINQ", lambda d: rows.counted_row(d, lambda w, i: peers.sinq(w, 3))),
    ("SINQ 4-bit", "SINQ", lambda d: rows.counted_row(d, lambda w, i: peers.sinq(w, 4))),
    ("Hadamard + RTN W3 (QuaRot)", "Hadamard+RTN", peer(peers.rotated_rtn, 3)),
    ("Hadamard + RTN W4 (QuaRot)", "Hadamard+RTN", peer(peers.rotated_rtn, 4)),
    ("HIGGS 3-bit (Hadamard + Gaussian MSE grid)", "HIGGS", peer(peers.higgs, 3)),
    ("HIGGS 4-bit (Hadamard + Gaussian MSE grid)", "HIGGS", peer(peers.higgs, 4)),
    ours("FP=xINT T=1 (3)", bits=3, terms=1),
    ours("FP=xINT T=1 (3), symmetric", bits=3, terms=1, symmetric=True),
    ours("FP=xINT T=1 (3), dual_scale", DUAL, bits=3, terms=1, dual_scale=True),  # the SINQ-style option
    # zero_bits=8: the bias as an int8 code, 8 bits a group fewer (0.125 bits per weight at group 64)
    ours("FP=xINT T=1 (3), int8 bias", INT8, bits=3, terms=1, zero_bits=8),
    ours("FP=xINT T=1 (3), dual_scale, int8 bias", INT8, bits=3, terms=1, dual_scale=True, zero_bits=8),
    int8_budget(3, 3.5),
    # (bits_budget=3.5 with asymmetric 3+2, or 3.25 with symmetric 3+2, is one 3-bit term in every layer: the
    # T=1 rows above, by construction; tests/test_budget_and_formats.py checks it)
    ours(
        "FP=xINT budget 3.5 (3+2), symmetric",
        "FP=xINT budget",
        bits=[3, 2],
        terms=2,
        symmetric=True,
        bits_budget=3.5,
    ),
    ours("FP=xINT budget 3.25 (2+2+2)", "FP=xINT budget", bits=2, terms=3, bits_budget=3.25),
    ours("FP=xINT budget 3.5 (2+2+2)", "FP=xINT budget", bits=2, terms=3, bits_budget=3.5),
    ours("FP=xINT T=1 (4), symmetric", bits=4, terms=1, symmetric=True),
    ours("FP=xINT T=1 (4)", bits=4, terms=1),
    ours("FP=xINT T=1 (4), dual_scale", DUAL, bits=4, terms=1, dual_scale=True),
    ours("FP=xINT T=1 (4), int8 bias", INT8, bits=4, terms=1, zero_bits=8),
    ours("FP=xINT T=1 (4), dual_scale, int8 bias", INT8, bits=4, terms=1, dual_scale=True, zero_bits=8),
    int8_budget(4, 4.5),
    ours("FP=xINT 2+2", bits=2, terms=2),
    ours("FP=xINT budget 5.0 (4+2+2)", "FP=xINT budget", bits=[4, 2, 2], terms=3, bits_budget=5.0),
    *[
        ours(
            f"FP=xINT budget {b} (4+2+2), dual_scale",
            DUAL,
            bits=[4, 2, 2],
            terms=3,
            bits_budget=b,
            dual_scale=True,
        )
        for b in (5.0, 6.5)
    ],
    ours("FP=xINT 3+2", bits=[3, 2], terms=2),
    ours("FP=xINT 2+2+2", bits=2, terms=3),
    ours("FP=xINT T=2 (4+4)", bits=4, terms=2),
    ours("FP=xINT T=2 (4+4), dual_scale", DUAL, bits=4, terms=2, dual_scale=True),
    ours("FP=xINT T=2 (4+4), int8 bias", INT8, bits=4, terms=2, zero_bits=8),
    ours(
        "FP=xINT budget 8.5 (4+4+2), int8 bias", INT8, bits=[4, 4, 2], terms=3, bits_budget=8.5, zero_bits=8
    ),
    # act_proxy="probe" (run alone with --rerun probe): the opt-in rows above, weighted by measured energies
    probed("FP=xINT T=1 (3)", bits=3, terms=1),
    probed("FP=xINT T=1 (3), dual_scale, int8 bias", bits=3, terms=1, dual_scale=True, zero_bits=8),
    int8_budget(3, 3.5, act_proxy="probe"),
    probed("FP=xINT T=1 (4)", bits=4, terms=1),
    probed("FP=xINT T=1 (4), dual_scale, int8 bias", bits=4, terms=1, dual_scale=True, zero_bits=8),
    int8_budget(4, 4.5, act_proxy="probe"),
    *[
        probed(
            f"FP=xINT budget {b} (4+2+2), dual_scale", bits=[4, 2, 2], terms=3, bits_budget=b, dual_scale=True
        )
        for b in (5.0, 6.5)
    ],  # fmt: skip
    probed("FP=xINT T=2 (4+4)", bits=4, terms=2),
]

ABLATIONS: list[tuple[str, str, Any]] = [  # with --ablations: more points, old rules, one-checkpoint reads
    ("RTN W4 g32 (the GGUF's own Q4_1 grid)", "artefact", lambda d: rows.rtn_row(d, 4, 32)),
    ("RTN W5", "RTN", lambda d: rows.rtn_row(d, 5)),
    ("HQQ 8-bit", "HQQ", lambda d: rows.hqq_row(d, 8)),
    ("int8 row-wise (LLM.int8 weights)", "int8", rows.int8_row),
    ours("FP=xINT legacy T=1 (4)", "FP=xINT legacy", bits=4, terms=1, **LEGACY),
    ours("FP=xINT legacy T=2 (4+4)", "FP=xINT legacy", bits=4, terms=2, **LEGACY),
    ours("FP=xINT T=1 (4), act_proxy=None", "FP=xINT no proxy", bits=4, terms=1, act_proxy=None),
    ours("FP=xINT T=2 (4+4), act_proxy=None", "FP=xINT no proxy", bits=4, terms=2, act_proxy=None),
    ours("FP=xINT 4+2", bits=[4, 2], terms=2),
    ours("FP=xINT 3+3", bits=3, terms=2),
    *[
        ours(f"FP=xINT budget {b} (4+2+2)", "FP=xINT budget", bits=[4, 2, 2], terms=3, bits_budget=b)
        for b in (6.0, 7.0)
    ],
    ours("FP=xINT T=2 checkpoint read at T=1", "one checkpoint", active=1, bits=4, terms=2),
    ("RTN W8 checkpoint, top 4 bits", "one checkpoint", rows.rtn8_top4_row),
]


def quantization_times(fp_dir: Path) -> dict[str, float]:
    """Seconds to quantize every linear weight of the model (weights already in memory), same process."""
    from hqq.core.quantize import Quantizer

    fp = rows.load_fp(fp_dir)
    named = {name: lin.weight.detach().float() for name, lin in quantizable_linears(fp)}
    weights = list(named.values())
    out = {}

    def hqq(nbits: int) -> Any:
        return lambda w: Quantizer.quantize(
            w, nbits=nbits, group_size=64, axis=1, compute_dtype=torch.float32, device="cpu"
        )

    for label, fn in [
        ("HQQ 3-bit", hqq(3)),
        ("HQQ 4-bit", hqq(4)),
        (
            "FP=xINT T=1 (3)",
            lambda w: expand(w, bits=3, terms=1, group_size=64, series="nested", fit="optimized"),
        ),
        (
            "FP=xINT 3+2",
            lambda w: expand(w, bits=(3, 2), terms=2, group_size=64, series="nested", fit="optimized"),
        ),
        (
            "FP=xINT T=1 (4)",
            lambda w: expand(w, bits=4, terms=1, group_size=64, series="nested", fit="optimized"),
        ),
        (
            "FP=xINT T=1 (4), dual_scale",
            lambda w: expand(
                w, bits=4, terms=1, group_size=64, series="nested", fit="optimized", dual_scale=True
            ),
        ),
        (
            "FP=xINT T=1 (4), dual_scale, int8 bias",
            lambda w: expand(
                w,
                bits=4,
                terms=1,
                group_size=64,
                series="nested",
                fit="optimized",
                dual_scale=True,
                zero_bits=8,
            ),
        ),
        (
            "FP=xINT T=2 (4+4)",
            lambda w: expand(w, bits=4, terms=2, group_size=64, series="nested", fit="optimized"),
        ),
        ("RTN W4", lambda w: rows.rtn(w, 4, 64)),
        ("Hadamard + RTN W4 (QuaRot)", lambda w: peers.rotated_rtn(w, 4, 0)),
        ("HIGGS 4-bit", lambda w: peers.higgs(w, 4, 0)),
    ]:
        start = time.perf_counter()
        for w in weights:
            fn(w)
        out[label] = time.perf_counter() - start
    # act_proxy="probe": the FP model rebuilt from its files and run, then the fit
    start = time.perf_counter()
    m2 = probe_second_moments(fp.config, [str(p) for p in Path(fp_dir).glob("*.safetensors")])
    for name, w in named.items():
        expand(
            w,
            options=ExpandOptions(importance=m2[name]),
            bits=4,
            terms=1,
            group_size=64,
            series="nested",
            fit="optimized",
        )
    out["FP=xINT T=1 (4), probe"] = time.perf_counter() - start
    big = torch.randn(4096, 4096) * 0.02
    start = time.perf_counter()
    expand(big, bits=4, terms=2, group_size=64, series="nested", fit="optimized")
    out["FP=xINT T=2 (4+4), one 4096x4096 layer"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="eval/results/pareto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations", action="store_true", help="also the ABLATIONS rows (about 1.5x the time)")
    ap.add_argument(
        "--rerun",
        metavar="TEXT",
        help="measure only the rows whose label contains TEXT and replace them in <out>.json (same tokens; the "
        "other rows and their command are kept; quantization times measured again)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if args.rerun else None
    if old is not None and old["tokens"] != args.tokens:
        ap.error(
            f"--rerun: {out.with_suffix('.json')} was measured on {old['tokens']} tokens, not {args.tokens}"
        )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = rows.fp_baseline(args.tokens)
    fp_dir, ref, fp_m = base.fp_dir, base.ref, base.fp
    results = [{"label": "FP", "family": "FP", "bits": 32.0, "ppl": fp_m.perplexity, "kl": 0.0, "top1": 1.0}]
    for label, family, build in ROWS + (ABLATIONS if args.ablations else []):
        if args.rerun and args.rerun not in label:
            continue
        built = build(fp_dir)
        m = evaluate_against(built.pop("model"), ref)
        results.append(
            {
                "label": label,
                "family": family,
                **built,
                "ppl": m.perplexity,
                "kl": m.kl_vs_fp,
                "top1": m.top1_agreement,
            }
        )
        print(
            f"{label:45s} {results[-1]['bits']:7.3f} b/w  PPL {m.perplexity:8.3f}  KL {m.kl_vs_fp:.4f}",
            flush=True,
        )
    command = "python eval/bench_pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if old is not None:  # the old rows, in their order, with the re-measured ones in their places
        new = {r["label"]: r for r in results[1:]}
        results = [new.pop(r["label"], r) for r in old["rows"]] + list(new.values())
        command = f"{old['command']}, then {command}"
    res = {
        "command": command,
        "model": "SmolLM2-135M-Instruct (FP = its GGUF Q4_1 weights dequantized to float32)",
        "tokens": base.tokens,
        "group_size": rows.GROUP,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": results,
        "quant_seconds": quantization_times(fp_dir),
        "wall_s": None,
    }
    res["wall_s"] = time.perf_counter() - start + (old["wall_s"] if old is not None else 0.0)
    md = write_results(out, res, report.to_markdown)
    report.plot(res, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
