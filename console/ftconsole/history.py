"""Read a run's ``<run>-history`` ConfigMap (written by trainer.kube_reporter.MetricHistory).

A pod writes that document, so nothing is trusted: unknown shapes are dropped, numbers must be
finite, texts are strings (escaped later, when rendered). Also: the pairs a person can label
from the samples (the same prompt answered at two different steps).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

HISTORY_KEY = "history.json"
MAX_SERIES = 64
MAX_POINTS = 1024
MAX_SAMPLES = 500


@dataclass
class Series:
    name: str
    steps: list[int]
    values: list[float]
    low: list[float]  # min of each point's bucket (== value for raw points)
    high: list[float]


@dataclass
class StageHistory:
    series: list[Series] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class History:
    stages: dict[str, StageHistory] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    updated: str | None = None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(name: str, raw: Any) -> Series | None:
    if not isinstance(raw, list):
        return None
    series = Series(name, [], [], [], [])
    for point in raw[:MAX_POINTS]:
        if not isinstance(point, list) or len(point) not in (2, 5):
            continue
        numbers = [_finite(v) for v in point]
        if any(n is None for n in numbers):
            continue
        step, value = int(numbers[0]), numbers[1]
        low, high = (numbers[2], numbers[3]) if len(point) == 5 else (value, value)
        series.steps.append(step)
        series.values.append(value)
        series.low.append(low)
        series.high.append(high)
    return series if series.steps else None


# The plots a person looks for first; everything else follows by name.
PREFERRED = ("score_mean", "reward_mean", "kl", "eval_reward_mean", "eval_kl", "loss", "policy_loss",
             "value_loss", "learning_rate", "tokens_per_second")


def _order(name: str) -> tuple[int, str]:
    return (PREFERRED.index(name) if name in PREFERRED else len(PREFERRED), name)


def parse_history(data: dict[str, str] | None) -> History:
    """The history in a ConfigMap's data; an empty History when missing or malformed."""
    try:
        document = json.loads((data or {}).get(HISTORY_KEY) or "null")
    except ValueError:
        return History()
    if not isinstance(document, dict):
        return History()
    history = History(updated=document.get("updated") if isinstance(document.get("updated"), str) else None)
    stages = document.get("stages") if isinstance(document.get("stages"), dict) else {}
    for stage, entry in stages.items():
        if not isinstance(stage, str) or not isinstance(entry, dict):
            continue
        raw_series = entry.get("series") if isinstance(entry.get("series"), dict) else {}
        parsed = [s for name, raw in sorted(raw_series.items(), key=lambda kv: _order(str(kv[0])))[:MAX_SERIES]
                  if (s := _series(str(name), raw)) is not None]
        events = [e for e in entry.get("events") or [] if isinstance(e, dict)][-50:]
        history.stages[stage] = StageHistory(series=parsed, events=events)
    for raw in (document.get("samples") or [])[-MAX_SAMPLES:]:
        if isinstance(raw, dict):
            history.samples.append({
                "stage": raw.get("stage") if isinstance(raw.get("stage"), str) else "?",
                "step": int(_finite(raw.get("step")) or 0),
                "prompt": raw.get("prompt") if isinstance(raw.get("prompt"), str) else "",
                "response": raw.get("response") if isinstance(raw.get("response"), str) else "",
                "reward": _finite(raw.get("reward")),
                "kl": _finite(raw.get("kl")),
            })
    return history


@dataclass(frozen=True)
class Pair:
    """Two responses to one prompt, as the labelling page shows them (A first)."""

    prompt: str
    a: str
    b: str
    source_a: str
    source_b: str


def candidate_pairs(samples: list[dict[str, Any]]) -> list[Pair]:
    """For each prompt answered at two or more steps with different text: its earliest and latest
    answers, in an order fixed by a digest of the prompt (so A is not always the older one and a
    person cannot learn "B is newer"), most recent prompts first."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        if sample.get("prompt") and sample.get("response"):
            by_prompt.setdefault(sample["prompt"], []).append(sample)
    pairs = []
    for prompt, answers in by_prompt.items():
        first, last = answers[0], answers[-1]
        if first["response"] == last["response"]:
            continue
        older = (first["response"], f"{first['stage']}@{first['step']}")
        newer = (last["response"], f"{last['stage']}@{last['step']}")
        swap = hashlib.sha256(prompt.encode()).digest()[0] % 2 == 1
        (a, sa), (b, sb) = (newer, older) if swap else (older, newer)
        pairs.append((last["step"], Pair(prompt=prompt, a=a, b=b, source_a=sa, source_b=sb)))
    return [pair for _, pair in sorted(pairs, key=lambda item: -item[0])]


def open_round(run: dict[str, Any]) -> dict[str, Any] | None:
    """The run's human-feedback round waiting for labels (``status.feedbackRounds``), if any."""
    rounds = ((run.get("status") or {}).get("feedbackRounds") or [])
    waiting = [r for r in rounds if isinstance(r, dict) and r.get("state") == "AwaitingLabels"
               and isinstance(r.get("round"), int)]
    return waiting[-1] if waiting else None


def round_pairs(data: dict[str, str] | None) -> list[Pair]:
    """The candidate pairs of a round's ``<run>-feedback-<round>`` ConfigMap (key ``candidates.json``, written
    by the trainer: ``trainer.feedback``), in the trainer's order; anything malformed is left out."""
    try:
        document = json.loads((data or {}).get("candidates.json") or "{}")
    except ValueError:
        return []
    pairs = []
    for raw in (document.get("pairs") or []) if isinstance(document, dict) else []:
        responses = raw.get("responses") if isinstance(raw, dict) else None
        if not (isinstance(raw.get("prompt"), str) and isinstance(responses, list) and len(responses) == 2
                and all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in responses)):
            continue
        a, b = responses
        pairs.append(Pair(prompt=raw["prompt"], a=a["text"], b=b["text"], source_a=str(a.get("source") or ""),
                          source_b=str(b.get("source") or "")))
    return pairs
