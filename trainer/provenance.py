"""What produced an output: the fingerprint every checkpoint and every ``final/`` records.

A fingerprint is a JSON object::

    {"runUid": "...",                       # StageJob.runUid (None for a run started by hand)
     "inputs": {"model": "...", "data.sft": "sha256:..."},   # what the stage reads
     "settings": {"learningRate": ..., ...},                  # the stage's settings block, camelCase
     "processes": 1}

Inputs are identified by content where that is cheap enough to be exact and by
listing where it is not:

* a data file: the SHA-256 of its bytes (it is read whole anyway; copying a
  file or touching it does not change it); a directory of shards: the SHA-256
  of its data files' names and digests;
* a model directory written by this trainer (it holds ``fingerprint.json``):
  the SHA-256 of that file, i.e. the exact training that produced it;
* any other model directory, or a GGUF file: every file's path, size and
  modification time (hashing tens of GB of weights at each start would cost minutes);
* ``hf://id@revision``: the string itself (a branch name is not pinned: use a
  commit hash to make a Hub model exact);
* PPO's and GRPO's reward functions: their settings.

``trainer.checkpoint`` and ``trainer.runtime`` decide what a difference means
(docs/trainer.md, "Outputs are never stale"); this module only builds and
compares fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic.alias_generators import to_camel

from trainer.config import HUB_SCHEME, StageJob

FINGERPRINT_FILE = "fingerprint.json"
"""In ``final/``: the fingerprint of the training that wrote it."""
MISSING = "missing"
_DATA_FIELD = {"sft": "sft", "reward": "preferences", "ppo": "prompts", "grpo": "prompts", "dpo": "preferences"}


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of the file's bytes, or ``missing`` when it cannot be read (the stage reports why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return MISSING
    return "sha256:" + digest.hexdigest()


def dataset_digest(path: str | Path) -> str:
    """``file_digest`` of a data file; for a directory of shards, ``sha256:`` over each data file's
    name and digest (the files ``trainer.data.data_files`` reads), so adding, removing, renaming
    or changing a shard changes it. ``missing`` when nothing can be read."""
    from trainer.data import DatasetError, data_files

    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    try:
        files = data_files(path)
    except DatasetError:
        return MISSING
    listing = [[f.name, file_digest(f)] for f in files]
    return "sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def model_identity(source: str | None) -> str | None:
    """How a model source is recognised again: see the module docstring."""
    if source is None:
        return None
    if source.startswith(HUB_SCHEME):
        return source
    path = Path(source)
    if path.is_file():  # a GGUF model file: listed like a directory's files
        stat = path.stat()
        return "files:" + hashlib.sha256(json.dumps([[path.name, stat.st_size, stat.st_mtime_ns]]).encode()).hexdigest()
    if not path.is_dir():
        return MISSING
    if (path / FINGERPRINT_FILE).is_file():
        return file_digest(path / FINGERPRINT_FILE)
    listing = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            listing.append([os.path.relpath(os.path.join(root, name), path), stat.st_size, stat.st_mtime_ns])
    return "files:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def stage_settings(job: StageJob) -> dict[str, Any]:
    settings = getattr(job, job.stage).model_dump(mode="json", by_alias=True)
    if isinstance(settings.get("lora"), dict):
        # What final/ holds besides the merged weights, not how they are trained: never blocks a resume.
        settings["lora"].pop("keepAdapter", None)
    return settings


def job_fingerprint(job: StageJob, *, processes: int) -> dict[str, Any]:
    """The fingerprint of running ``job`` now with ``processes`` training processes."""
    inputs: dict[str, Any] = {"model": model_identity(job.model)}
    data_field = _DATA_FIELD[job.stage]
    data_path = getattr(job.data, data_field)
    inputs[f"data.{data_field}"] = None if data_path is None else dataset_digest(data_path)
    if job.stage in ("ppo", "grpo"):
        # Human-feedback rounds retrain the reward model between attempts on purpose: a checkpoint must not
        # be refused for it (the rounds are in the run's status and in the reward model's feedback.json).
        inputs["rewardModel"] = ("retrained by human-feedback rounds" if job.human_feedback is not None
                                 else model_identity(job.reward_model))
        inputs["reward.functions"] = [f.model_dump(mode="json", by_alias=True, exclude_none=True)
                                      for f in job.reward.functions]
    return {"runUid": job.run_uid, "inputs": inputs, "settings": stage_settings(job), "processes": processes}


def _camel(names: frozenset[str]) -> set[str]:
    return {to_camel(name) for name in names}


def differences(saved: dict[str, Any], current: dict[str, Any], *, stage: str,
                ignore_settings: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable ``what: old -> new`` for every input, setting and process count that differs.

    ``ignore_settings`` are Python field names (``learning_rate``). The run uid is not compared here.
    """
    changed = []
    saved_inputs, current_inputs = saved.get("inputs", {}), current.get("inputs", {})
    for key in sorted(set(saved_inputs) | set(current_inputs)):
        if saved_inputs.get(key) != current_inputs.get(key):
            changed.append(f"{key}: {_short(saved_inputs.get(key))} -> {_short(current_inputs.get(key))}")
    skip = _camel(ignore_settings)
    saved_settings, current_settings = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(set(saved_settings) | set(current_settings)):
        if key not in skip and saved_settings.get(key) != current_settings.get(key):
            changed.append(f"{stage}.{key}: {_short(saved_settings.get(key))} -> {_short(current_settings.get(key))}")
    if saved.get("processes") != current.get("processes"):
        changed.append(f"processes: {saved.get('processes')} -> {current.get('processes')}")
    return changed


def changed_settings(saved: dict[str, Any], current: dict[str, Any], *, stage: str,
                     among: frozenset[str]) -> list[str]:
    """``stage.name: old -> new`` for the settings in ``among`` (Python field names) that differ."""
    names = sorted(_camel(among))
    old, new = saved.get("settings", {}), current.get("settings", {})
    return [f"{stage}.{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in names if old.get(k) != new.get(k)]


def _short(value: Any) -> str:
    """Digests cut to 12 hex digits; other values as JSON (nested settings such as lora included)."""
    if isinstance(value, str) and value.startswith(("sha256:", "files:")):
        scheme, _, hexdigest = value.partition(":")
        return f"{scheme}:{hexdigest[:12]}"
    return json.dumps(value)


def read_final_fingerprint(final: Path) -> dict[str, Any] | None:
    """The fingerprint in ``final/``, or None when there is none (written before fingerprints existed)."""
    try:
        return json.loads((Path(final) / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None
