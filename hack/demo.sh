#!/usr/bin/env bash
# The demo: a FineTuneRun taken through SFT, reward model and PPO by the operator,
# on a real (local) Kubernetes control plane, on this machine's CPU.
#
#   ./hack/demo.sh                # the tiny model: a minute or two
#   ./hack/demo.sh --real-model   # SmolLM2-135M-Instruct: about 20 minutes on 2 idle cores
#
# First run: installs the virtualenv and the project (hack/setup.sh) and compiles
# the local control plane (about 10 minutes on 2 cores); later runs reuse both and
# take a minute or two. The cluster stays up at the end; stop it with
#   .venv/bin/python -m localcluster down
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[demo] step 0: hack/setup.sh (venv, PyTorch CPU, the project, the local control plane;"
echo "[demo]         the first time this takes about 10 minutes, later runs seconds)"
./hack/setup.sh
exec .venv/bin/python hack/demo.py "$@"
