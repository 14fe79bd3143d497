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
tells the whole run's story. Updates are throttled to one per
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
TERMINAL_KINDS = ("succeeded", "failed", "interrupted")


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
    ):
        """``api`` (a CoreV1Api) and ``clock`` are for tests; by default the in-cluster client is used."""
        self.config_map = config_map
        self.namespace = namespace or own_namespace()
        self.min_interval_seconds = min_interval_seconds
        self._api = api if api is not None else _core_api()
        self._clock = clock
        self._last_sent: float | None = None
        self._pending = False
        self._document: dict[str, Any] = self._read_existing()

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

    def _send(self, *, attempts: int = 1) -> None:
        body = {"data": {DATA_KEY: json.dumps(self._document, separators=(",", ":"))}}
        for attempt in range(attempts):
            try:
                self._api.patch_namespaced_config_map(self.config_map, self.namespace, body)
                self._pending = False
                self._last_sent = self._clock()
                return
            except Exception as exc:  # best effort; the next report or close() tries again
                if attempt == attempts - 1:
                    print(f"progress: cannot update ConfigMap {self.namespace}/{self.config_map}: {exc}",
                          file=sys.stderr, flush=True)
                    self._pending = True
                else:
                    time.sleep(0.5 * (attempt + 1))

    def close(self) -> None:
        """Send what the throttle held back."""
        if self._pending:
            self._send(attempts=2)
