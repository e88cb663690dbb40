"""Error of the FP=xINT series against the number of terms, and quantization time against plain RTN.

    python eval/series_report.py            # writes eval/results/series.{json,md}

- Relative Frobenius error ||M - M_T|| / ||M|| for T = 1..4 on a heavy-tailed (Student-t, 3 dof) 4096x4096
  matrix at LLM weight scale, for 2/3/4/8-bit terms (group 128), next to one RTN pass of 4 and 8 bits
  (the paper's Figure 4b, for weights).
- Wall time of ``expand`` (4-bit, group 128, T = 1, 2, 3) as a ratio to one ``rtn`` pass over the same
  matrix, measured side by side in this process (median of repeats, interleaved).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fpxint_hf.expansion import expand, reconstruct, relative_error, rtn

OUT = Path(__file__).resolve().parent / "results" / "series"
# the rule these results measure (fpxint_hf 0.1's); the default nested series is measured by bench_pareto.py
LEGACY = {"series": "legacy", "fit": "minmax"}


def error_table(w: torch.Tensor) -> dict:
    table = {}
    for bits in (2, 3, 4, 8):
        e = expand(w, bits=bits, terms=4, group_size=128, **LEGACY)
        table[f"{bits}-bit"] = [relative_error(reconstruct(e, k), w) for k in range(1, 5)]
    table["rtn"] = {"4-bit": relative_error(rtn(w, 4, 128), w), "8-bit": relative_error(rtn(w, 8, 128), w)}
    return table


def timing(w: torch.Tensor, repeats: int = 7) -> dict:
    jobs = {
        "rtn W4": lambda: rtn(w, 4, 128),
        **{
            f"expand T={t}": (lambda t=t: expand(w, bits=4, terms=t, group_size=128, **LEGACY))
            for t in (1, 2, 3)
        },
    }
    samples = {name: [] for name in jobs}
    for job in jobs.values():  # warm-up
        job()
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            samples[name].append(time.perf_counter() - start)
    med = {name: statistics.median(s) for name, s in samples.items()}
    return {name: {"median_s": m, "ratio_to_rtn": m / med["rtn W4"]} for name, m in med.items()}


def weight_matrix() -> torch.Tensor:
    """The seeded heavy-tailed 4096x4096 matrix every committed number is measured on."""
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample((4096, 4096)) * 0.02


def main() -> None:
    w = weight_matrix()
    errors, times = error_table(w), timing(w)
    info = {
        "matrix": "4096x4096 Student-t(3) * 0.02, group 128",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    result = {"errors": errors, "timing": times, "info": info}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    OUT.with_suffix(".md").write_text(md)
    print(md, end="")


def to_markdown(result: dict) -> str:
    errors, times, info = result["errors"], result["timing"], result["info"]
    lines = ["# FP=xINT series: error vs terms, quantization time vs RTN", "", f"{info}", ""]
    lines += ["| term bits | T=1 | T=2 | T=3 | T=4 | fall per term |", "|---|---:|---:|---:|---:|---:|"]
    for name, errs in errors.items():
        if name == "rtn":
            continue
        fall = errs[0] / errs[1]
        lines.append(f"| {name} | " + " | ".join(f"{x:.3e}" for x in errs) + f" | {fall:.1f}x |")
    lines += [
        "",
        f"RTN (min-max, group 128): 4-bit {errors['rtn']['4-bit']:.3e}, 8-bit {errors['rtn']['8-bit']:.3e}",
    ]
    lines += ["", "| quantizer | median s | ratio to one RTN W4 pass |", "|---|---:|---:|"]
    lines += [f"| {n} | {t['median_s']:.3f} | {t['ratio_to_rtn']:.2f} |" for n, t in times.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
