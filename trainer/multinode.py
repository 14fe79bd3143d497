"""A stage across several processes and pods: the rendezvous, its timeouts and the world-size check.

Multi-node launches fail in two quiet ways (issue 13): a process that cannot reach rank 0 waits
for torch's default 30 minutes, and a launcher that ignores the multi-node settings trains
alone at world size 1. Here the process group is set up by us, before ``accelerate`` would do it,
with two timeouts the operator sets per stage:

* ``FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS``: how long a process waits to reach rank 0's store
  (or rank 0 waits for the others); then it fails naming the address and port.
* ``FINETUNE_COLLECTIVE_TIMEOUT_SECONDS``: how long one collective may hang (the gloo timeout,
  and NCCL's watchdog) before the process fails instead of hanging forever.

and the stage fails at start when fewer processes came up than ``FINETUNE_EXPECTED_WORLD_SIZE``.

The module imports no torch at load time: the operator reads the variable names from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

EXPECTED_WORLD_SIZE_ENV = "FINETUNE_EXPECTED_WORLD_SIZE"
"""Processes the whole stage must have (nodes x processes per node); set by the operator."""
RENDEZVOUS_TIMEOUT_ENV = "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS"
COLLECTIVE_TIMEOUT_ENV = "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS"
PROGRESS_TIMEOUT_ENV = "FINETUNE_PROGRESS_TIMEOUT_SECONDS"
"""The progress watchdog's timeout (``trainer.watchdog``); set by the operator from spec.distributed."""
DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 900.0
"""Pods of one gang can start minutes apart (image pulls on different nodes)."""
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 1800.0
"""torch's own default for gloo; long enough for a rank-0-only step (saving final/, evaluation)."""


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    from trainer.runtime import PermanentStageFailure

    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise PermanentStageFailure(f"{name}={raw!r} is not a positive number of seconds")
    return value


def timeouts(env: Mapping[str, str] = os.environ) -> tuple[timedelta, timedelta]:
    """(rendezvous, collective) timeouts from the environment, or their defaults."""
    return (timedelta(seconds=_seconds(env, RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS)),
            timedelta(seconds=_seconds(env, COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)))


def check_world_size(*, expected: str | None, actual: int) -> None:
    """PermanentStageFailure when the stage came up with another number of processes than the operator asked for.

    ``expected`` is ``FINETUNE_EXPECTED_WORLD_SIZE`` (None or empty: no check), ``actual`` the
    process group's size. Fewer processes would train alone, with other data shards and another
    effective batch size, and look healthy; a retry with the same launcher does the same.
    """
    from trainer.runtime import PermanentStageFailure

    if not expected:
        return
    try:
        wanted = int(expected)
    except ValueError:
        raise PermanentStageFailure(f"{EXPECTED_WORLD_SIZE_ENV}={expected!r} is not a number of processes") from None
    if actual != wanted:
        raise PermanentStageFailure(
            f"world size mismatch: the stage expects {wanted} processes ({EXPECTED_WORLD_SIZE_ENV}, nodes x processes "
            f"per node) but {actual} came up; the launcher did not get the multi-node settings (torchrun reads "
            "PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_MASTER_ADDR, PET_MASTER_PORT; a custom command "
            "must pass them on)")


def _where(address: str) -> str:
    """What the name resolves to, for the error message (the usual cause is a name that does not resolve)."""
    import socket

    try:
        ips = sorted({info[4][0] for info in socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)})
    except OSError as exc:
        return f"{address} does not resolve ({exc.strerror or exc}): check the rendezvous Service and cluster DNS"
    return f"{address} resolves to {', '.join(ips)} but nothing accepted the connection in time"


def init_distributed(*, cuda: bool, env: Mapping[str, str] = os.environ) -> None:
    """Join the process group with our timeouts when this process is one of several (WORLD_SIZE > 1).

    A no-op for one process or when a group already exists. Raises StageFailed (retryable: rank 0
    may come back in the next attempt) naming rank 0's address and port when the rendezvous times
    out. Backend: NCCL for CUDA tensors plus gloo for CPU ones (FSDP's CPU offload and CPU-side
    gathers need it), gloo alone without CUDA.
    """
    import torch.distributed as dist

    from trainer.runtime import StageFailed

    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or dist.is_initialized():
        return
    rendezvous, collective = timeouts(env)
    rank = int(env.get("RANK", "0") or 0)
    address, port = env.get("MASTER_ADDR", "?"), env.get("MASTER_PORT", "?")
    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=rendezvous))
    except (dist.DistError, RuntimeError, ValueError) as exc:
        waited = f"{rendezvous.total_seconds():g}s"
        if rank == 0:
            reason = (f"rank 0 of {world} waited {waited} at {address}:{port} for the other processes to join "
                      f"({RENDEZVOUS_TIMEOUT_ENV}); they could not reach it or did not start (see their pods)")
        else:
            reason = (f"rank {rank} of {world} could not reach rank 0 at {address}:{port} within {waited} "
                      f"({RENDEZVOUS_TIMEOUT_ENV}): {_where(address)}")
        raise StageFailed(f"{reason} [{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]") from exc
    backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
    if cuda:
        import torch

        # Before any collective: NCCL binds a communicator to the current device, and every process
        # would otherwise start on GPU 0 (accelerate sets it later, after the group exists).
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0") or 0))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=collective)
