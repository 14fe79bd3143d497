#!/bin/sh
# Make a virtualenv holding one TRL version for the *_vs_trl.py benchmarks, outside the project's install.
#
#   benchmarks/trl_venv.sh 1.12.0   # PPO (trl.experimental.ppo; gone after 1.12)
#   benchmarks/trl_venv.sh 1.16.0   # GRPO, RLOO, DPO
#
# The venv (~/.cache/finetune-bench/trl-VERSION) sees the project's .venv through a .pth file, so
# torch, transformers and accelerate are the project's own (TRL 1.12 and 1.16 both accept
# transformers >= 4.56.2); it adds only TRL and datasets (pinned) and what datasets needs.
# Then: ~/.cache/finetune-bench/trl-VERSION/bin/python benchmarks/<name>_vs_trl.py
set -eu
version=${1:?usage: trl_venv.sh TRL_VERSION}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FINETUNE_BENCH_CACHE:-$HOME/.cache/finetune-bench}/trl-$version
site=$("$repo/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$repo/.venv/bin/python" -m venv "$venv"
"$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" | {
    read -r own; echo "$site" > "$own/finetune-project-venv.pth"; }
"$venv/bin/python" -m pip install --quiet "trl==$version" "datasets==5.2.0"
"$venv/bin/python" -c "import trl, transformers; print('trl', trl.__version__, 'transformers', transformers.__version__)"
echo "$venv/bin/python"
