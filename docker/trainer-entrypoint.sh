#!/bin/sh
# Entry point of the trainer image: runs one stage.
#
#   trainer-entrypoint --stage sft|reward|ppo --config FILE
#
# For `docker run`: in the cluster the operator sets the pod command directly
# (operator/ftoperator/builders.py trainer_command) with the same choice as here.
# NUM_PROCESSES (the GPUs to use, default 1):
#   1  -> `python -m trainer ...` directly, so SIGTERM from the kubelet reaches
#         the trainer (it checkpoints on SIGTERM) without a launcher in between.
#   >1 -> `accelerate launch` with one process per GPU on this node.
set -eu
NUM_PROCESSES="${NUM_PROCESSES:-1}"
case "$NUM_PROCESSES" in
  ''|*[!0-9]*) echo "trainer-entrypoint: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2; exit 2 ;;
esac
if [ "$NUM_PROCESSES" -le 1 ]; then
  exec python -m trainer "$@"
fi
# Precision is chosen by the trainer's config (precision: auto|bf16|...), not
# by accelerate: --mixed_precision no keeps accelerate from overriding it.
exec accelerate launch \
  --num_machines 1 \
  --num_processes "$NUM_PROCESSES" \
  --mixed_precision no \
  --dynamo_backend no \
  -m trainer "$@"
