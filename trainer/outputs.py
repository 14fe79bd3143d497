"""Whose outputs are in a stage's outputDir, and whether its ``final/`` is the result of this job.

The operator gives every stage the same directory on every attempt
(``/artifacts/<namespace>/<run>/<stage>``), also to a run deleted and re-created
under the same name. Two rules keep outputs from being stale or mixed up
(docs/trainer.md, "Outputs are never stale"):

* Outputs of another run (another ``runUid``, or no fingerprint at all) are
  removed before the stage starts: it trains from scratch.
* This run's ``final/`` is reused only when its fingerprint matches the job
  (inputs, settings that shape training, process count); otherwise the stage
  fails permanently saying what changed. Checkpoints are checked the same way
  on resume (``trainer.checkpoint.resume_from_latest``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from trainer import provenance
from trainer.config import StageJob
from trainer.checkpoint import checkpoints_dir, complete_checkpoints, read_state
from trainer.runtime import COMPLETE_MARKER, PermanentStageFailure, StageContext, stage_config

UNKNOWN_RUN = "<no fingerprint>"
"""Owner of an output written before fingerprints existed: never this run's."""
RUN_FILES = ("progress.jsonl", "samples.jsonl")
"""Per-run logs in outputDir, removed with another run's outputs (progress.jsonl only when it is the default)."""


def owners(output_dir: Path) -> dict[str, str | None]:
    """{output: runUid} for ``final/`` and every complete checkpoint that records a fingerprint, and
    {output: UNKNOWN_RUN} for those that do not (written before fingerprints existed: whose they are is unknown).

    A checkpoint whose state file cannot be read is left out: it is damaged, not foreign, and the
    resume falls back past it.
    """
    found: dict[str, str | None] = {}
    final = output_dir / "final"
    if (final / COMPLETE_MARKER).is_file():
        recorded = provenance.read_final_fingerprint(final)
        found["final/"] = recorded.get("runUid") if recorded else UNKNOWN_RUN
    for _, path in complete_checkpoints(output_dir):
        state = read_state(path)
        if state is None:
            continue
        recorded = state.get("fingerprint")
        found[f"checkpoints/{path.name}"] = recorded.get("runUid") if isinstance(recorded, dict) else UNKNOWN_RUN
    return found


def claim_output_dir(job: StageJob, *, output_dir: Path, accelerator) -> None:
    """Remove another run's outputs from ``output_dir`` (main process), before anything is written there.

    Every process must call this; the others wait for the removal.
    """
    foreign = {what: uid for what, uid in owners(output_dir).items() if uid != job.run_uid}
    accelerator.wait_for_everyone()  # everyone has looked before anything is removed
    if foreign and accelerator.is_main_process:
        listed = ", ".join(f"{what} ({'no fingerprint' if uid == UNKNOWN_RUN else f'run {uid}'})"
                           for what, uid in sorted(foreign.items()))
        print(f"[{job.stage}] {output_dir} holds outputs of another run: {listed}; this is run "
              f"{job.run_uid}: removing them and training from scratch", file=sys.stderr, flush=True)
        for name in ("final", "final.tmp", ".replaced-final"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)
        for name in RUN_FILES:
            if name != "progress.jsonl" or job.reporting.progress_file is None:
                (output_dir / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def final_is_current(ctx: StageContext) -> bool:
    """Whether ``final/`` is complete and was produced by exactly this job (nothing to do).

    False when there is no complete ``final/``. PermanentStageFailure when this run's
    ``final/`` was produced from other inputs or settings: retraining would silently
    replace a model later stages may already have used.
    """
    final = ctx.output_dir / "final"
    if not (final / COMPLETE_MARKER).is_file():
        return False
    recorded = provenance.read_final_fingerprint(final) or {}
    changed = provenance.differences(recorded, ctx.fingerprint, stage=ctx.job.stage,
                                     ignore_settings=type(stage_config(ctx.job)).OPERATIONAL_SETTINGS)
    if changed:
        raise PermanentStageFailure(
            f"{final} was produced from other inputs or settings ({'; '.join(changed)}). Restore them, or start "
            "over: delete and re-create the FineTuneRun (a new run never reuses old outputs), or for a run by "
            "hand delete the outputDir or use a new one")
    return True
