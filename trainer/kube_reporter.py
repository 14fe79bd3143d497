"""Live progress into the run's ``<run>-progress`` ConfigMap, the only object a stage pod may change.

The operator gives each run a ServiceAccount whose Role allows get/patch/update
on that one ConfigMap (by resourceName) and nothing else; it watches the
ConfigMap and copies a sanitised summary into the FineTuneRun's status. The
pod therefore never writes the run itself, and the operator stays the only
writer of conditions. (Kubeflow's progress proposal reached the same
least-privilege goal with an HTTP status server in the controller; a
ConfigMap needs no extra server, port or token audience.)

Data: one key, ``progress.json``, holding::

    {"current": "<stage>", "updated": "<RFC 3339>",
     "stages": {"<stage>": {"kind", "step", "totalSteps", "metrics", "checkpoint", "artifact",
                            "reason", "updated"}},
     "samples": [{"stage", "step", "prompt", "response", "reward", "kl"}]}   # latest 3, truncated

Entries of earlier stages are kept (read back at start), so the ConfigMap
tells the whole run's story.

History (for the console's plots) goes to a second ConfigMap, ``<run>-history``, key
``history.json``, when the operator names one (``history_config_map``); ``MetricHistory``
below describes the document and why it stays under a fixed size. It is a ConfigMap of its
own so that the operator, which watches progress ConfigMaps, is not sent the history
(up to ``HISTORY_BUDGET_BYTES``) every two seconds, and it is written less often
(``history_interval_seconds``; terminal events at once). Updates are throttled to one per
``min_interval_seconds`` except terminal events (succeeded, failed), which are
sent at once; ``close()`` sends what is pending. Errors are printed and never
raised: losing progress must not stop training.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from trainer.reporting import ProgressEvent

DATA_KEY = "progress.json"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_SAMPLES = 3
SAMPLE_CHARS = 500
TERMINAL_KINDS = ("succeeded", "failed", "interrupted", "feedback")  # feedback: the process exits at a round boundary
HISTORY_KEY = "history.json"
POINTS_PER_SERIES = 256
"""A series holds between half this and this many points, evenly spread over its steps."""
MAX_SERIES_PER_STAGE = 32
MAX_HISTORY_SAMPLES = 120
HISTORY_SAMPLE_CHARS = 1000
HISTORY_BUDGET_BYTES = 800_000
"""The history document's JSON stays under this (a ConfigMap holds at most 1 MiB)."""


def own_namespace(namespace_file: Path = NAMESPACE_FILE) -> str:
    """The pod's namespace: the service-account file, else env POD_NAMESPACE; ValueError if neither."""
    try:
        text = namespace_file.read_text().strip()
        if text:
            return text
    except OSError:
        pass
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    raise ValueError(f"cannot tell the pod's namespace: no {namespace_file} and no POD_NAMESPACE variable; "
                     "pass namespace= explicitly")


def _core_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # outside a pod, e.g. a local run against a cluster
    return client.CoreV1Api()


def _iso(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truncate(value: Any) -> Any:
    if isinstance(value, str) and len(value) > SAMPLE_CHARS:
        return value[: SAMPLE_CHARS - 3] + "..."
    return value


# ----------------------------------------------------------------------------- bounded history

Point = list  # [step, value] for one raw value; [step, mean, min, max, count] once merged


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def merge_points(first: Point, second: Point) -> Point:
    """One point standing for two neighbours: the later step, the count-weighted mean, and the
    min/max envelope, so a spike (KL blowing up) stays visible after downsampling."""
    s1, m1, lo1, hi1, n1 = first if len(first) == 5 else (*first, first[1], first[1], 1)
    s2, m2, lo2, hi2, n2 = second if len(second) == 5 else (*second, second[1], second[1], 1)
    n = n1 + n2
    return [s2, _round((m1 * n1 + m2 * n2) / n), min(lo1, lo2), max(hi1, hi2), n]


def halve(points: list[Point]) -> list[Point]:
    """Merge neighbours pairwise (an odd last point stays as it is): half the points, same span."""
    merged = [merge_points(points[i], points[i + 1]) for i in range(0, len(points) - 1, 2)]
    if len(points) % 2:
        merged.append(points[-1])
    return merged


def _count(point: Point) -> int:
    return point[4] if len(point) == 5 else 1


def append_point(points: list[Point], step: int, value: float, *, limit: int = POINTS_PER_SERIES) -> list[Point]:
    """``points`` with (step, value) added, at most ``limit`` long.

    Every point but the last stands for the same number of raw values (the bucket, a power of
    two); the last is the bucket being filled, so its step is always the newest. Past the limit
    neighbours are merged pairwise and the bucket doubles: size stays bounded however long the
    stage runs, and resolution stays even over all its steps.

    A step not after the last one means the stage restarted from an earlier checkpoint: points
    from that step on are dropped first, so the series reads as the run that continued.
    """
    if points and step <= points[-1][0]:
        points = [p for p in points if p[0] < step]
    bucket = max((_count(p) for p in points), default=1)
    new: Point = [step, _round(value)]
    if points and _count(points[-1]) < bucket:
        points = [*points[:-1], merge_points(points[-1], new)]
    else:
        points = [*points, new]
    while len(points) > limit:
        points = halve(points)
    return points


class MetricHistory:
    """Every stage's metrics per step, downsampled, plus sample generations over time and stage events.

    Document (key ``history.json``)::

        {"version": 1, "updated": "<RFC 3339>",
         "stages": {"<stage>": {"series": {"<metric>": [[step, value] | [step, mean, min, max, n], ...]},
                                "events": [{"kind", "step", "time", "reason"?}]}},
         "samples": [{"stage", "step", "time", "prompt", "response", "reward", "kl"}]}

    Bounds: POINTS_PER_SERIES points per series, MAX_SERIES_PER_STAGE series per stage (further
    metric names are ignored), MAX_HISTORY_SAMPLES samples (thinned: the oldest half loses every
    other step), texts cut at HISTORY_SAMPLE_CHARS; ``document()`` halves every series again while
    the JSON is over HISTORY_BUDGET_BYTES.
    """

    def __init__(self, document: dict[str, Any] | None = None):
        document = document if isinstance(document, dict) else {}
        stages = document.get("stages") if isinstance(document.get("stages"), dict) else {}
        self.stages: dict[str, dict[str, Any]] = {
            name: {"series": dict(entry.get("series") or {}), "events": list(entry.get("events") or [])}
            for name, entry in stages.items() if isinstance(entry, dict)}
        samples = document.get("samples")
        self.samples: list[dict[str, Any]] = list(samples) if isinstance(samples, list) else []
        self.updated: str | None = document.get("updated")

    def add(self, event: ProgressEvent) -> None:
        stage = self.stages.setdefault(event.stage, {"series": {}, "events": []})
        series = stage["series"]
        if event.kind == "progress":
            for name, value in event.metrics.items():
                value = float(value)
                if value != value or value in (float("inf"), float("-inf")):
                    continue  # JSON has no NaN; a gap in the plot says enough
                if name not in series and len(series) >= MAX_SERIES_PER_STAGE:
                    continue
                series[name] = append_point(series.get(name, []), event.step, value)
        if event.kind != "progress" and event.kind != "samples":
            entry = {"kind": event.kind, "step": event.step, "time": _iso(event.time)}
            if event.reason:
                entry["reason"] = _truncate(event.reason)
            stage["events"] = (stage["events"] + [entry])[-50:]
        if event.samples:
            for sample in event.samples:
                row = {"stage": event.stage, "step": event.step, "time": _iso(event.time)}
                for key, value in sample.items():
                    row[key] = value[:HISTORY_SAMPLE_CHARS] if isinstance(value, str) else value
                self.samples.append(row)
            self.samples = thin_samples(self.samples, limit=MAX_HISTORY_SAMPLES)
        self.updated = _iso(event.time)

    def document(self) -> dict[str, Any]:
        """The JSON-ready document, halved until it fits HISTORY_BUDGET_BYTES."""
        while True:
            document = {"version": 1, "updated": self.updated, "stages": self.stages, "samples": self.samples}
            if len(json.dumps(document, separators=(",", ":"))) <= HISTORY_BUDGET_BYTES:
                return document
            longest = max((len(points) for stage in self.stages.values() for points in stage["series"].values()),
                          default=0)
            if longest > 16:
                for stage in self.stages.values():
                    stage["series"] = {name: halve(points) for name, points in stage["series"].items()}
            elif self.samples:
                self.samples = self.samples[len(self.samples) // 2 + 1:]
            else:
                return document


def thin_samples(samples: list[dict[str, Any]], *, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` samples: while over, the older half keeps only every other step's samples,
    so early behaviour stays visible next to the latest."""
    while len(samples) > limit:
        steps = list(dict.fromkeys((s.get("stage"), s.get("step")) for s in samples))  # in order
        older = steps[: len(steps) // 2]
        if len(older) < 2:
            return samples[-limit:]
        dropped = set(older[1::2])
        samples = [s for s in samples if (s.get("stage"), s.get("step")) not in dropped]
    return samples


class KubernetesReporter:
    """A ``trainer.reporting.Reporter`` that merges each event into the run's progress ConfigMap."""

    def __init__(
        self,
        *,
        config_map: str,
        min_interval_seconds: float = 2.0,
        namespace: str | None = None,
        api: Any = None,
        clock: Callable[[], float] = time.monotonic,
        history_config_map: str | None = None,
        history_interval_seconds: float = 10.0,
    ):
        """``api`` (a CoreV1Api) and ``clock`` are for tests; by default the in-cluster client is used.
        ``history_config_map``: where ``MetricHistory`` goes (None: no history)."""
        self.config_map = config_map
        self.history_config_map = history_config_map
        self.history_interval_seconds = history_interval_seconds
        self.namespace = namespace or own_namespace()
        self.min_interval_seconds = min_interval_seconds
        self._api = api if api is not None else _core_api()
        self._clock = clock
        self._last_sent: float | None = None
        self._pending = False
        self._document: dict[str, Any] = self._read_existing()
        self._history_sent: float | None = None
        self._history_pending = False
        self.history = MetricHistory(self._read_history()) if history_config_map else None

    @property
    def document(self) -> dict[str, Any]:
        """The progress document as it will be (or was last) sent."""
        return self._document

    def _read_existing(self) -> dict[str, Any]:
        try:
            config_map = self._api.read_namespaced_config_map(self.config_map, self.namespace)
            text = (config_map.data or {}).get(DATA_KEY)
            document = json.loads(text) if text else {}
        except Exception as exc:  # a missing or unreadable ConfigMap: start afresh, say so
            print(f"progress: cannot read ConfigMap {self.namespace}/{self.config_map}: {exc}",
                  file=sys.stderr, flush=True)
            document = {}
        if not isinstance(document, dict) or not isinstance(document.get("stages"), dict):
            document = {"stages": {}}
        return document

    def _read_history(self) -> dict[str, Any] | None:
        # A restarted pod continues the history it left (the series drop steps it redoes).
        try:
            config_map = self._api.read_namespaced_config_map(self.history_config_map, self.namespace)
            text = (config_map.data or {}).get(HISTORY_KEY)
            return json.loads(text) if text else None
        except Exception as exc:
            print(f"progress: cannot read ConfigMap {self.namespace}/{self.history_config_map}: {exc}",
                  file=sys.stderr, flush=True)
            return None

    def _merge(self, event: ProgressEvent) -> None:
        stages = self._document.setdefault("stages", {})
        entry = stages.setdefault(event.stage, {})
        entry["kind"] = event.kind
        # A stage that finds its output complete reports succeeded with 0/0; keep the real count.
        if event.total_steps or "totalSteps" not in entry:
            entry["step"] = event.step
            entry["totalSteps"] = event.total_steps
        entry.setdefault("metrics", {}).update({k: float(v) for k, v in event.metrics.items()})
        for key, value in (("checkpoint", event.checkpoint), ("artifact", event.artifact),
                           ("reason", event.reason)):
            if value is not None:
                entry[key] = _truncate(value)
        entry["updated"] = _iso(event.time)
        self._document["current"] = event.stage
        self._document["updated"] = entry["updated"]
        if event.samples:
            fresh = [{"stage": event.stage, "step": event.step,
                      **{k: _truncate(v) for k, v in sample.items()}} for sample in event.samples]
            self._document["samples"] = (self._document.get("samples", []) + fresh)[-MAX_SAMPLES:]

    def report(self, event: ProgressEvent) -> None:
        self._merge(event)
        now = self._clock()
        due = self._last_sent is None or now - self._last_sent >= self.min_interval_seconds
        if event.kind in TERMINAL_KINDS or due:
            self._send(attempts=3 if event.kind in TERMINAL_KINDS else 1)
        else:
            self._pending = True
        if self.history is not None:
            self.history.add(event)
            history_due = (self._history_sent is None
                           or now - self._history_sent >= self.history_interval_seconds)
            if event.kind in TERMINAL_KINDS or history_due:
                self._send_history(attempts=3 if event.kind in TERMINAL_KINDS else 1)
            else:
                self._history_pending = True

    def _send_history(self, *, attempts: int = 1) -> None:
        assert self.history is not None and self.history_config_map is not None
        body = {"data": {HISTORY_KEY: json.dumps(self.history.document(), separators=(",", ":"))}}
        if self._patch(self.history_config_map, body, attempts=attempts):
            self._history_pending = False
            self._history_sent = self._clock()
        else:
            self._history_pending = True

    def _send(self, *, attempts: int = 1) -> None:
        body = {"data": {DATA_KEY: json.dumps(self._document, separators=(",", ":"))}}
        if self._patch(self.config_map, body, attempts=attempts):
            self._pending = False
            self._last_sent = self._clock()
        else:
            self._pending = True

    def _patch(self, name: str, body: dict[str, Any], *, attempts: int) -> bool:
        for attempt in range(attempts):
            try:
                self._api.patch_namespaced_config_map(name, self.namespace, body)
                return True
            except Exception as exc:  # best effort; the next report or close() tries again
                if attempt == attempts - 1:
                    print(f"progress: cannot update ConfigMap {self.namespace}/{name}: {exc}",
                          file=sys.stderr, flush=True)
                else:
                    time.sleep(0.5 * (attempt + 1))
        return False

    def close(self) -> None:
        """Send what the throttles held back."""
        if self._pending:
            self._send(attempts=2)
        if self._history_pending:
            self._send_history(attempts=2)
