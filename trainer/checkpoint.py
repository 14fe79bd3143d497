"""Resumable checkpoints under ``<outputDir>/checkpoints/step-<N>/``.

A checkpoint is written into ``.tmp-step-<N>/``, completed with a marker file
written last, and only then renamed to ``step-<N>/``. A pod killed mid-write
leaves a ``.tmp-*`` directory that is never resumed from (and is removed by the
next save), so a resume always starts from a whole checkpoint.

Contents: ``accelerator.save_state`` (every prepared model, optimizer and
scheduler, objects registered with ``register_for_checkpointing``, and the RNG
states of python, numpy, torch and cuda for every process) plus
``trainer_state.json`` with the step, the stage's ``extra_state`` (data
position, KL controller ...) and the resolved config of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from trainer.runtime import COMPLETE_MARKER, StageContext

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

FAIL_AT_STEP_ENV = "FINETUNE_FAIL_AT_STEP"
"""Test hook: after the checkpoint of this step is complete, the process exits with 137 as if SIGKILLed."""


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(ctx: StageContext, *, step: int, extra_state: dict) -> Path:
    """Write a checkpoint of ``step`` on all processes together; return its directory.

    Every process must call this (each saves its own RNG state); the main
    process writes the rest. Older checkpoints beyond ``keepCheckpoints`` are
    deleted after the new one is complete.
    """
    from trainer.runtime import stage_config

    accelerator = ctx.accelerator
    root = checkpoints_dir(ctx.output_dir)
    temp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process's RNG file is in before the marker
    if accelerator.is_main_process:
        state = {
            "step": step,
            "extra_state": extra_state,
            "world_size": accelerator.num_processes,
            "config": ctx.job.model_dump(mode="json", by_alias=True),
        }
        (temp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_dir(temp)
        (temp / COMPLETE_MARKER).write_text("")
        if final.exists():  # re-saving a step after a resume: replace the old copy
            shutil.rmtree(final)
        os.replace(temp, final)
        _prune(root, keep=stage_config(ctx.job).keep_checkpoints)
    accelerator.wait_for_everyone()
    _maybe_simulate_crash(step)
    return final


def load_checkpoint(ctx: StageContext, path: Path) -> dict:
    """Restore models, optimizers, schedulers and RNG from ``path``; return the stage's ``extra_state``.

    The checkpoint must come from the same number of processes, since RNG
    states and data shards are per process.
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    saved_world = state.get("world_size", 1)
    if saved_world != ctx.accelerator.num_processes:
        from trainer.runtime import StageFailed

        raise StageFailed(f"checkpoint {path} was written by {saved_world} processes, this run has "
                          f"{ctx.accelerator.num_processes}; resume with the same number of GPUs "
                          "or use a new outputDir")
    ctx.accelerator.load_state(str(path))
    return state["extra_state"]


def _prune(root: Path, *, keep: int) -> None:
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    for _, old in sorted(found)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush file contents before the marker, so a node crash cannot leave a marker over partial files."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())


def _maybe_simulate_crash(step: int) -> None:
    wanted = os.environ.get(FAIL_AT_STEP_ENV)
    if wanted and int(wanted) == step:
        print(f"{FAIL_AT_STEP_ENV}={step}: exiting after checkpoint as if killed", file=sys.stderr, flush=True)
        os._exit(137)


def resume_from_latest(ctx: StageContext, *, expect: dict) -> tuple[int, dict]:
    """(step to continue from, extra_state) after restoring the latest checkpoint; (0, {}) when there is none.

    ``expect`` holds extra_state entries that must match the checkpoint (for
    example the number of examples): a changed dataset cannot continue at the
    saved position, so that is an error rather than a silent restart.
    """
    from trainer.runtime import StageFailed

    path = latest_checkpoint(ctx.output_dir)
    if path is None:
        return 0, {}
    extra = load_checkpoint(ctx, path)
    for key, value in expect.items():
        if extra.get(key) != value:
            raise StageFailed(f"checkpoint {path} has {key}={extra.get(key)!r} but this run has {value!r}; "
                              "the data or settings changed since it was written: restore them or use a new outputDir")
    step = json.loads((path / STATE_FILE).read_text())["step"]
    print(f"resuming from {path} at step {step}", file=sys.stderr, flush=True)
    return step, extra
