"""Resumable checkpoints under ``<outputDir>/checkpoints/step-<N>/``.

A checkpoint is written into ``.tmp-step-<N>/``, fsynced, completed with a
marker file written last, and only then renamed to ``step-<N>/``
(``trainer.durable``). A pod killed mid-write leaves a ``.tmp-*`` directory that
is never resumed from (and is removed by the next save), so a resume always
starts from a whole checkpoint. A checkpoint that is whole but cannot be loaded
(a damaged disk, a file truncated behind our back) is removed with a warning and
the previous one is used.

Contents: ``accelerator.save_state`` (every prepared model, optimizer and
scheduler, objects registered with ``register_for_checkpointing``, and the RNG
states of python, numpy, torch and cuda for every process) plus
``trainer_state.json`` with the step, the stage's ``extra_state`` (data
position, KL controller ...), the fingerprint of what produced it
(``trainer.provenance``) and the resolved config of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from trainer import provenance
from trainer.durable import publish_directory
from trainer.runtime import COMPLETE_MARKER, PermanentStageFailure, StageContext, StageFailed, stage_config

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


def read_state(path: Path) -> dict | None:
    """The checkpoint's ``trainer_state.json``, or None when it is unreadable (a damaged checkpoint)."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def save_checkpoint(ctx: StageContext, *, step: int, extra_state: dict) -> Path:
    """Write a checkpoint of ``step`` on all processes together; return its directory.

    Every process must call this (each saves its own RNG state); the main
    process writes the rest. Older checkpoints beyond ``keepCheckpoints`` are
    deleted after the new one is complete.
    """
    accelerator = ctx.accelerator
    root = checkpoints_dir(ctx.output_dir)
    temp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".replaced-step-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process's RNG file is in before the marker
    if accelerator.is_main_process:
        state = {
            "step": step,
            "extra_state": extra_state,
            "world_size": accelerator.num_processes,
            "fingerprint": ctx.fingerprint,
            "config": ctx.job.model_dump(mode="json", by_alias=True),
        }
        (temp / STATE_FILE).write_text(json.dumps(state, indent=2))
        publish_directory(temp, final, marker=COMPLETE_MARKER)  # replaces a copy of this step saved before a resume
        _prune(root, keep=stage_config(ctx.job).keep_checkpoints)
    accelerator.wait_for_everyone()
    _maybe_simulate_crash(step)
    return final


def _prune(root: Path, *, keep: int) -> None:
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    for _, old in sorted(found)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _maybe_simulate_crash(step: int) -> None:
    wanted = os.environ.get(FAIL_AT_STEP_ENV)
    if wanted and int(wanted) == step:
        print(f"{FAIL_AT_STEP_ENV}={step}: exiting after checkpoint as if killed", file=sys.stderr, flush=True)
        os._exit(137)


def resume_from_latest(ctx: StageContext) -> tuple[int, dict]:
    """(step to continue from, extra_state) after restoring the newest usable checkpoint; (0, {}) when there is none.

    Every process must call this. A checkpoint whose fingerprint differs from this
    job's in inputs or in a setting that shapes training is refused
    (PermanentStageFailure listing every difference). Settings in the stage's
    ``RESUME_APPLIES`` and ``OPERATIONAL_SETTINGS`` take their new value; the change
    is printed. A checkpoint that cannot be read or loaded on any process is removed
    with a warning and the previous one is tried; when none is left the stage fails
    (retryable: the next attempt starts from step 0 with clean state).
    """
    tried_any = False
    for step, path in reversed(complete_checkpoints(ctx.output_dir)):
        tried_any = True
        state = read_state(path)
        if state is not None:
            _check_resumable(ctx, path, state)
        loaded = state is not None and _load(ctx, path)
        if _on_every_process(ctx, loaded):
            for change in provenance.changed_settings(state["fingerprint"], ctx.fingerprint, stage=ctx.job.stage,
                                                      among=_adjustable(ctx)):
                _say(ctx, f"resuming with a changed setting, applied from now on: {change}")
            _say(ctx, f"resumed from {path} at step {step}")
            return state["step"], state["extra_state"]
        _say(ctx, f"WARNING: checkpoint {path} cannot be {'read' if state is None else 'loaded'}; removed, "
                  "falling back to the previous checkpoint")
        if ctx.accelerator.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
        ctx.accelerator.wait_for_everyone()
    if tried_any:
        raise StageFailed(f"no checkpoint in {checkpoints_dir(ctx.output_dir)} could be loaded (each was removed); "
                          "the next attempt starts from step 0")
    return 0, {}


def _adjustable(ctx: StageContext) -> frozenset[str]:
    cfg = type(stage_config(ctx.job))
    return cfg.RESUME_APPLIES | cfg.OPERATIONAL_SETTINGS


def _check_resumable(ctx: StageContext, path: Path, state: dict) -> None:
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        raise PermanentStageFailure(f"checkpoint {path} records no fingerprint of its inputs (written by an older "
                                    "trainer); delete it or use a new outputDir")
    changed = provenance.differences(saved, ctx.fingerprint, stage=ctx.job.stage, ignore_settings=_adjustable(ctx))
    if changed:
        raise PermanentStageFailure(
            f"checkpoint {path} was written with other inputs or settings ({'; '.join(changed)}); resuming would "
            "continue a different training. Restore them to resume, or start over: delete and re-create the "
            "FineTuneRun (a new run never reuses old outputs), or for a run by hand use a new outputDir")


def _load(ctx: StageContext, path: Path) -> bool:
    try:
        ctx.accelerator.load_state(str(path))
    except Exception as exc:  # a damaged file surfaces as any of several library errors
        print(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def _on_every_process(ctx: StageContext, ok: bool) -> bool:
    """True when ``ok`` holds on every process: all fall back together or none does."""
    if ctx.accelerator.num_processes == 1:
        return ok
    flags = torch.tensor([0.0 if ok else 1.0], device=ctx.device)
    return float(ctx.accelerator.reduce(flags, "sum")) == 0.0


def _say(ctx: StageContext, message: str) -> None:
    if ctx.accelerator.is_main_process:
        print(f"[{ctx.job.stage}] {message}", file=sys.stderr, flush=True)
