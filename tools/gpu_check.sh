#!/usr/bin/env bash
# GPU check for vLLM's encoder attention on HF towers (verify + speed per backend).
# Usage: tools/gpu_check.sh [--backends FLASH_ATTN FLASHINFER] [--json out.json]
# Needs a CUDA GPU and a CUDA build of vLLM in .venv (tools/setup.sh installs the CPU one);
# without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" tools/gpu_check.py "$@"
