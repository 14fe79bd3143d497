#!/usr/bin/env bash
# The project's test command: sets up what is missing, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./hack/setup.sh
exec .venv/bin/pytest "$@"
