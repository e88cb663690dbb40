"""The calibrated GPTQ baseline row (runs in the main .venv; the build itself runs in .venv-gptq).

``gptq_dir`` returns the cached fake-quantized folder, building it with ``eval/_gptq_build.py`` under
``.venv-gptq/bin/python`` (llmcompressor pins its own transformers) when missing; ``gptq_row`` loads it as a
row of ``eval/_pareto_rows.py`` ({"model", "bits", "quant_s"}). The folder is keyed by a hash of the FP
folder's config, the bits, the group size and the calibration settings, under ``<cache>/gptq/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gptq_calib import DEFAULT, Calibration, cache_key  # noqa: E402

from fpxint_hf.evaluation.assets import cache_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "eval" / "_gptq_build.py"


def gptq_python() -> Path:
    """The .venv-gptq interpreter (``$FPXINT_GPTQ_PYTHON`` overrides); a clear error when it is missing."""
    python = Path(os.environ.get("FPXINT_GPTQ_PYTHON") or REPO / ".venv-gptq" / "bin" / "python")
    if not python.is_file():
        raise FileNotFoundError(
            f"GPTQ baseline needs llmcompressor in its own venv: {python} is missing; run scripts/install-gptq.sh"
        )
    return python


def gptq_cache_dir(fp_dir: Path, bits: int, group_size: int, cal: Calibration = DEFAULT) -> Path:
    """Where the GPTQ folder of (``fp_dir``, ``bits``, ``group_size``, ``cal``) lives, built or not."""
    config = json.loads((Path(fp_dir) / "config.json").read_text())
    key = cache_key(config, bits, group_size, cal)
    return cache_root() / "gptq" / f"{Path(fp_dir).name}-w{bits}g{group_size}-{key}"


def gptq_dir(fp_dir: Path, bits: int, group_size: int, cal: Calibration = DEFAULT) -> Path:
    """The cached GPTQ folder, built by a ``.venv-gptq`` subprocess when missing (minutes to hours on a CPU)."""
    out = gptq_cache_dir(fp_dir, bits, group_size, cal)
    if (out / "gptq.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(gptq_python()), str(BUILD), str(fp_dir), str(out), "--bits", str(bits)]
    cmd += ["--group-size", str(group_size), "--samples", str(cal.samples), "--seq-len", str(cal.seq_len)]
    cmd += ["--seed", str(cal.seed)]
    # The build venv has its own site-packages: do not let this venv's PYTHONPATH leak into it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(cmd, check=True, env=env)
    return out


def gptq_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "gptq.json").read_text())


def gptq_model(fp_dir: Path, bits: int, group_size: int, cal: Calibration = DEFAULT) -> nn.Module:
    """The GPTQ model as a plain float32 model (dequantized linear weights), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = gptq_dir(fp_dir, bits, group_size, cal)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def gptq_row(fp_dir: Path, bits: int, group_size: int, cal: Calibration = DEFAULT) -> dict[str, Any]:
    """A row of the accuracy benches: the model, bits per weight as GPTQ stores them, and the build's seconds
    (GPTQ itself, calibration forwards included; loading and saving not)."""
    meta = gptq_meta(gptq_dir(fp_dir, bits, group_size, cal))
    return {
        "model": gptq_model(fp_dir, bits, group_size, cal),
        "bits": meta["bits_per_weight"],
        "quant_s": meta["quant_s"],
    }
