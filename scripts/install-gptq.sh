#!/usr/bin/env bash
# Creates .venv-gptq: llmcompressor (GPTQModifier) for the calibrated GPTQ baseline row in eval/ only.
# Separate from .venv: llmcompressor pins transformers<=5.17 and compressed-tensors. torch is installed first
# (the CPU build) and then held by a constraints file, so no later install can swap it for a CUDA build.
# Idempotent: re-running skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}
LLMC=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
[ -x .venv-gptq/bin/python ] || "$PY" -m venv .venv-gptq
. .venv-gptq/bin/activate
PIP=(pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==$TORCH"
CONSTRAINTS=.venv-gptq/constraints.txt
echo "torch==$TORCH" >"$CONSTRAINTS"
# Refuse to go on if the resolver would touch torch or pull CUDA wheels (nvidia-ml-py, a pure-Python NVML
# binding that llmcompressor imports, is allowed).
plan=$(pip install --dry-run --disable-pip-version-check -c "$CONSTRAINTS" "llmcompressor==$LLMC" 2>&1)
if grep -Eiq 'Would install.*( torch-[0-9]| triton-|nvidia-[a-z0-9_-]*-cu[0-9])' <<<"$plan"; then
    echo "$plan" >&2
    echo "install-gptq.sh: llmcompressor would replace torch or pull CUDA packages; stopping" >&2
    exit 1
fi
"${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==$LLMC"
python -c "import torch, transformers, llmcompressor; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'llmcompressor', llmcompressor.__version__)"
