"""Peak anonymous memory (``RssAnon``) of quantize-on-load, each config in a fresh process (eval/bench_default.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

FLOOR = "imports only: torch, transformers, fpxint_hf (no model)"
CONFIGS = {
    FLOOR: "",
    "default": "FPxINTConfig()",
    "act_proxy='norm', second_order=False (no probe)": "FPxINTConfig(act_proxy='norm', second_order=False)",
}

CHILD = r"""
import json, sys, threading, time
import torch
from transformers import AutoModelForCausalLM
from fpxint_hf import FPxINTConfig

peak = [0]
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if sys.argv[2]:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=eval(sys.argv[2]), dtype=torch.float32)
else:
    time.sleep(0.1)
secs = time.perf_counter() - start
stop.set()
peak[0] = max(peak[0], rss_anon())
print(json.dumps({"peak_rss_anon": peak[0], "seconds": secs}))
"""


def measure(fp_dir: Path, names: list[str] | None = None) -> dict[str, Any]:
    """``{config name: {peak_rss_anon, seconds}}`` and the float32 checkpoint's size in bytes, for the ``CONFIGS``
    named in ``names`` (all by default; the ``FLOOR``, what the process holds before it reads a weight, always)."""
    out: dict[str, Any] = {
        "checkpoint_bytes": sum(p.stat().st_size for p in Path(fp_dir).glob("*.safetensors"))
    }
    for name, expr in CONFIGS.items():
        if names is not None and name not in names and name != FLOOR:
            continue
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(fp_dir), expr], capture_output=True, text=True, check=True
        )
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, out[name], flush=True)
    return out
