"""The operator's Prometheus metrics: one registry, prefix ``finetune_operator_``, bounded labels only.

Labels are stage names, states, outcomes, causes, verbs and handler names --
never run names or namespaces (those belong in events and status).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ftoperator.api import RunState
from ftoperator.decide import Decision

PREFIX = "finetune_operator"
RUN_STATES: tuple[str, ...] = RunState.__args__  # type: ignore[attr-defined]
_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class OperatorMetrics:
    """All metrics of one operator process; ``registry`` is served by ``serve``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.runs = Gauge(f"{PREFIX}_runs", "FineTuneRuns seen by this operator, by state.", ["state"], registry=r)
        self.stage_transitions = Counter(
            f"{PREFIX}_stage_transitions_total", "Stage state changes.", ["stage", "to_state"], registry=r)
        self.retries = Counter(
            f"{PREFIX}_stage_retries_total",
            "Replacement pods started; cause is failure (counts against backoffLimit) or disruption.",
            ["stage", "cause"], registry=r)
        self.reconcile_errors = Counter(
            f"{PREFIX}_reconcile_errors_total", "Handler invocations that raised.", ["handler"], registry=r)
        self.pod_start_seconds = Histogram(
            f"{PREFIX}_pod_start_seconds", "Seconds from a stage pod's create request to seeing it Running.",
            ["stage"], buckets=_START_BUCKETS, registry=r)
        self.stage_duration_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds", "Seconds from a stage's first pod request to its end.",
            ["stage", "outcome"], buckets=_DURATION_BUCKETS, registry=r)
        self.reconcile_seconds = Histogram(
            f"{PREFIX}_reconcile_duration_seconds", "Wall time of one reconcile pass (API calls included).",
            buckets=_RECONCILE_BUCKETS, registry=r)
        self.api_requests = Counter(
            f"{PREFIX}_api_requests_total", "Kubernetes API requests made by the reconciler.", ["verb"], registry=r)
        self._run_states: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for state in RUN_STATES:
            self.runs.labels(state=state).set(0)

    def observe(self, decision: Decision) -> None:
        """Record what one reconcile pass decided."""
        for transition in decision.transitions:
            self.stage_transitions.labels(stage=transition.stage, to_state=transition.to_state).inc()
        for stage, cause in decision.retries:
            self.retries.labels(stage=stage, cause=cause).inc()
        for stage, seconds in decision.pod_start_seconds:
            self.pod_start_seconds.labels(stage=stage).observe(seconds)
        for stage, outcome, seconds in decision.stage_durations:
            self.stage_duration_seconds.labels(stage=stage, outcome=outcome).observe(seconds)

    def set_run_state(self, key: tuple[str, str], state: str | None) -> None:
        """Track one run's state for the runs gauge; None forgets the run (deleted)."""
        with self._lock:
            if state is None:
                self._run_states.pop(key, None)
            else:
                self._run_states[key] = state
            counts = {s: 0 for s in RUN_STATES}
            for current in self._run_states.values():
                counts[current] = counts.get(current, 0) + 1
            for current, count in counts.items():
                self.runs.labels(state=current).set(count)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)
