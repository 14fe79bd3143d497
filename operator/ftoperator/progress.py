"""Copy a trainer's progress ConfigMap into the run's status: sanitised, bounded, pure.

The trainer (``trainer.kube_reporter.KubernetesReporter``) writes one JSON
document under the key ``progress.json``::

    {"current": "ppo", "updated": "...",
     "stages": {"ppo": {"kind": "progress", "step": 120, "totalSteps": 500,
                        "metrics": {"reward_mean": 0.4, ...}, "checkpoint": "...", "updated": "..."}},
     "samples": [{"stage": "ppo", "step": 120, "prompt": "...", "response": "...", "reward": 0.3, "kl": 0.1}]}

(DPO's samples carry "chosen", "rejected", "chosen_reward" and "rejected_reward" instead of reward and KL.)

A pod can write anything there, so nothing is trusted: unknown stages and
malformed values are dropped, metric names must look like metric names, the
number of metrics and samples is capped, strings are truncated and stripped of
control characters (terminal escapes, bidirectional overrides) that would
garble ``kubectl`` output. Which run the ConfigMap belongs to is decided by the
reconciler from the run's uid and the ConfigMap's name (``run_owns``), never
from fields the pod could rewrite. The result
is a JSON merge patch for ``status`` touching only progress fields, which the
reconciler never writes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ftoperator import naming
from ftoperator.stageplan import ONLINE_STAGES, STAGE_ORDER

PROGRESS_KEY = "progress.json"
MAX_METRICS = 32
MAX_SAMPLES = 3
SAMPLE_CHARS = 500
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_./-]{0,63}$")
# The first of these present in the online stage's metrics (ppo or grpo) fills the Reward and KL printer
# columns. PPO reports score_mean (the reward model and functions) and reward_mean (score minus the KL
# penalty); GRPO/RLOO report reward_mean (the score: their KL is a loss term, not a reward penalty). The
# column shows the score, the KL has its own column (GRPO/RLOO measure it only with klCoef > 0). KL prefers
# kl_k3, the non-negative estimate the run-health checks report: the k1 mean ("kl") of one batch can be
# negative, which reads as a bug in a column.
REWARD_METRICS = ("score_mean", "reward_mean", "eval_reward_mean")
KL_METRICS = ("kl_k3", "kl", "eval_kl")
# DPO's columns: held-out pairs first (the training batch's numbers rise with overfitting too), else the
# latest training batch when no pairs are held out (dpo.evalFraction 0) or none were measured yet.
PREFERENCE_ACCURACY_METRICS = ("eval_preference_accuracy", "preference_accuracy")
REWARD_MARGIN_METRICS = ("eval_reward_margin", "reward_margin")
_COLUMN_METRICS = (*REWARD_METRICS, *KL_METRICS, *PREFERENCE_ACCURACY_METRICS, *REWARD_MARGIN_METRICS)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


# C0 and C1 control characters but newline and tab, and the bidirectional embedding/override/isolate marks.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = _CONTROL.sub("", value)
    if not value:
        return None  # left out: the local API server rejects "" in a custom resource as null
    return value if len(value) <= SAMPLE_CHARS else value[: SAMPLE_CHARS - 3] + "..."


def run_owns(config_map: dict[str, Any], run: dict[str, Any] | None) -> bool:
    """Whether ``config_map`` is the progress ConfigMap of ``run`` (the object as read from the API).

    The trainer may patch its ConfigMap, owner references included, so those are only a hint: the
    ConfigMap's name (which the trainer cannot change, and its Role names no other) must be the
    run's progress ConfigMap name, and the run's uid must be the one the reference names.
    """
    if run is None or run.get("metadata", {}).get("deletionTimestamp"):
        return False
    meta = config_map.get("metadata") or {}
    run_meta = run.get("metadata") or {}
    if meta.get("namespace") != run_meta.get("namespace"):
        return False
    if meta.get("name") != naming.progress_config_map_name(run_meta.get("name", "")):
        return False
    return any(ref.get("uid") == run_meta.get("uid") and ref.get("controller")
               for ref in meta.get("ownerReferences") or [])


def sanitize_metrics(raw: Any) -> dict[str, float]:
    """At most MAX_METRICS finite numbers with metric-like names; the metrics of the printer columns first,
    then by name, so the cut is stable."""
    if not isinstance(raw, dict):
        return {}
    clean = {}
    preferred = [k for k in _COLUMN_METRICS if k in raw]
    names = preferred + sorted(k for k in raw if isinstance(k, str) and _METRIC_NAME.match(k) and k not in preferred)
    for name in names:
        number = _number(raw[name])
        if number is not None:
            clean[name] = number
        if len(clean) == MAX_METRICS:
            break
    return clean


def _sample(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or raw.get("stage") not in STAGE_ORDER:
        return None
    sample: dict[str, Any] = {"stage": raw["stage"], "step": _count(raw.get("step")) or 0}
    for key in ("prompt", "response", "chosen", "rejected"):  # the last two: DPO's pair beside its answer
        text = _text(raw.get(key))
        if text is not None:
            sample[key] = text
    for key, target in (("reward", "reward"), ("kl", "kl"), ("chosen_reward", "chosenReward"),
                        ("rejected_reward", "rejectedReward")):
        number = _number(raw.get(key))
        if number is not None:
            sample[target] = number
    return sample


def _first(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((metrics[name] for name in names if name in metrics), None)


def progress_text(stage: str, step: int | None, total: int | None) -> str:
    """The Progress printer column: "ppo 120/500"."""
    if step is None:
        return stage
    return f"{stage} {step}/{total}" if total else f"{stage} {step}"


def status_patch(data: dict[str, str] | None) -> dict[str, Any] | None:
    """A merge patch for the run's status from the ConfigMap's data, or None if there is nothing usable."""
    try:
        document = json.loads((data or {}).get(PROGRESS_KEY) or "null")
    except (TypeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None

    stages: dict[str, Any] = {}
    raw_stages = document.get("stages") if isinstance(document.get("stages"), dict) else {}
    for stage in STAGE_ORDER:
        entry = raw_stages.get(stage)
        if not isinstance(entry, dict):
            continue
        clean: dict[str, Any] = {"metrics": sanitize_metrics(entry.get("metrics"))}
        for source, target in (("step", "step"), ("totalSteps", "totalSteps")):
            count = _count(entry.get(source))
            if count is not None:
                clean[target] = count
        stages[stage] = clean
    if not stages:
        return None

    patch: dict[str, Any] = {"stages": stages}
    current = document.get("current")
    if current in stages:
        patch["progress"] = progress_text(current, stages[current].get("step"), stages[current].get("totalSteps"))
    columns = (("reward", REWARD_METRICS, ONLINE_STAGES), ("kl", KL_METRICS, ONLINE_STAGES),
               ("preferenceAccuracy", PREFERENCE_ACCURACY_METRICS, ("dpo",)),
               ("rewardMargin", REWARD_MARGIN_METRICS, ("dpo",)))
    for field, names, sources in columns:
        # A run has one policy stage; the first present is it.
        source = next((stage for stage in sources if stage in stages), None)
        value = None if source is None else _first(stages[source]["metrics"], names)
        if value is not None:
            patch[field] = round(value, 4)
    raw_samples = document.get("samples") if isinstance(document.get("samples"), list) else []
    samples = [s for s in (_sample(raw) for raw in raw_samples[-MAX_SAMPLES:]) if s is not None]
    if samples:
        patch["samples"] = samples
    return patch
