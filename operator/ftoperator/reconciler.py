"""Fetch -> decide -> apply, for one run at a time; and the per-run loops that drive it.

``RunReconciler.reconcile`` is synchronous (the Kubernetes client blocks) and
level-based: it reads the run and its children afresh (pods and ConfigMaps by the
run's label, the ServiceAccount, Role and RoleBinding by name -- whoever owns
them), asks ``decide`` what to do, creates and deletes, then patches the status
with the minimal merge patch, keeping status fields this operator version does not know.
A create the API server refuses (quota, admission, Pod Security: anything but 409) ends
the applying; ``decide`` runs again with the refusal as an input, and that decision's
status (which records it) is the one saved.
Objects are created before the status that records them is written, so a
crash in between leaves a pod that the next pass adopts (names are
deterministic), never a status that points at nothing. A create that answers
409 for an object the run does not own (one that appeared since it was listed,
or carries no run label) ends the pass before the status is written
(``ChildConflict``); the next pass sees the object and waits for it to go.

``RunLoops`` runs one asyncio loop per run (``ensure`` starts it when the
run's watch event -- or kopf's initial listing -- shows the run): reconcile,
then sleep until nudged by a watch event (the run's spec, one of its pods) or
until the resync interval. One loop per run means one writer per run: two
passes for the same run never overlap. The loop ends when the run is gone or
being deleted. It is not a kopf daemon on purpose: kopf puts a finalizer on
every object with a daemon, and a finalizer would keep runs from being deleted
while the operator is scaled to zero or uninstalled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from ftoperator import builders, naming, progress
from ftoperator.api import dump, keep_unknown_fields
from ftoperator.builders import RunRef
from ftoperator.config import OperatorConfig
from ftoperator.decide import CreateObject, Decision, DeletePod, RefusedCreate, decide
from ftoperator.kubeapi import ApiError, KubeApi, type_key
from ftoperator.mergepatch import diff
from ftoperator.metrics import OperatorMetrics
from ftoperator.observe import ObservedChild, controller_uid, leftover_reason, observe_child, observe_pod
from ftoperator.validation import TERMINAL_STATES

log = logging.getLogger("ftoperator.reconciler")

RunKey = tuple[str, str]  # (namespace, name)


class ChildConflict(Exception):
    """A create answered 409 for an object the run cannot count as its own; the pass is abandoned."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class RunReconciler:
    """One level-based pass for one run."""

    def __init__(self, *, api: KubeApi, config: OperatorConfig, metrics: OperatorMetrics,
                 clock: Callable[[], datetime] = utc_now):
        self.api = api
        self.config = config
        self.metrics = metrics
        self.clock = clock

    def reconcile(self, namespace: str, name: str) -> Decision | None:
        """Do one pass; returns the decision, or None when the run is gone or being deleted."""
        started = time.monotonic()
        obj = self.api.get_run(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        meta = obj["metadata"]
        run = RunRef(name=name, namespace=namespace, uid=meta["uid"], generation=meta.get("generation", 1))
        raw_pods = self.api.list_pods(namespace, label_selector=naming.run_selector(name))
        pods = [p for p in (observe_pod(raw) for raw in raw_pods if controller_uid(raw) == run.uid) if p is not None]
        children = self._observe_other_children(run) + [observe_child(raw) for raw in raw_pods]
        old_status = obj.get("status") or {}
        now = self.clock()
        inputs = dict(run=run, spec=obj.get("spec"), status=old_status, pods=pods, children=children, now=now,
                      config=self.config, label_counts=self._count_labels(run, obj.get("spec")))
        decision = decide(**inputs)
        refused = self._apply(run, decision)
        if refused is not None:
            # The status of a refused pass is never saved: decide again, knowing the refusal, so the
            # run shows it (condition, event, backoff) instead of staying without a status.
            log.warning("%s/%s: the API server refused %s %s (HTTP %s): %s", namespace, name, refused.kind,
                        refused.name, refused.code, refused.message)
            decision = decide(**inputs, refused=refused)
            self._apply(run, decision)

        patch = diff(old_status, keep_unknown_fields(old_status, dump(decision.status)))
        if patch:
            self.api.patch_run_status(namespace, name, patch)
        for event in decision.events:
            log.info("%s/%s: %s %s: %s", namespace, name, event.type, event.reason, event.message)
            try:
                self.api.post_event(obj, type_=event.type, reason=event.reason, message=event.message, now=now)
            except ApiError as exc:  # an event lost is not worth a failed pass
                log.warning("%s/%s: cannot post event %s: %s", namespace, name, event.reason, exc)

        self.metrics.observe(decision)
        self.metrics.set_run_state((namespace, name), decision.status.state)
        self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        return decision

    def _apply(self, run: RunRef, decision: Decision) -> RefusedCreate | None:
        """Create and delete in order; stop at the first create the API server refuses and return it."""
        for action in decision.actions:
            if isinstance(action, CreateObject):
                try:
                    created = self.api.create(action.obj)
                except ApiError as exc:
                    message = exc.message.strip()
                    if exc.status == 404 and action.kind == "PodGroup":
                        message += (f" (the {action.obj['apiVersion']} PodGroup CRD is not installed: "
                                    "spec.distributed.gangScheduler needs its scheduler)")
                    return RefusedCreate(kind=action.kind, name=action.name, code=exc.status, message=message)
                if not created:
                    self._check_existing_is_ours(run, action)
            elif isinstance(action, DeletePod):
                log.info("%s/%s: deleting pod %s%s: %s", run.namespace, run.name, action.name,
                         " (force)" if action.force else "", action.reason)
                self.api.delete_pod(run.namespace, action.name, force=action.force)
        return None

    def _observe_other_children(self, run: RunRef) -> list[ObservedChild]:
        """The run's ConfigMaps (by label) and its ServiceAccount, Role and RoleBinding (by name)."""
        selector = naming.run_selector(run.name)
        found = [observe_child(raw) for raw in self.api.list_objects("ConfigMap", run.namespace,
                                                                     label_selector=selector)]
        for access in builders.trainer_access(run):
            raw = self.api.get_object(access["kind"], run.namespace, access["metadata"]["name"])
            if raw is not None:
                found.append(observe_child(raw))
        return found

    def _count_labels(self, run: RunRef, spec: dict[str, Any] | None) -> dict[int, int] | None:
        """Round -> PreferenceLabels preferring A or B, for a run with spec.humanFeedback (else None)."""
        if not isinstance(spec, dict) or spec.get("humanFeedback") is None:
            return None
        from ftconsole import labels  # the console's pure model of a label: one reading of them

        try:
            found = self.api.list_objects("PreferenceLabel", run.namespace,
                                          label_selector=f"{labels.LABEL_RUN}={labels.run_label_value(run.name)}")
        except ApiError as exc:  # e.g. the PreferenceLabel CRD is not installed: the round waits
            log.warning("%s/%s: cannot list PreferenceLabels: %s", run.namespace, run.name, exc)
            return {}
        return labels.preferences_per_round(labels.run_labels(found, run=run.name))

    def _check_existing_is_ours(self, run: RunRef, action: CreateObject) -> None:
        """After a 409: fine if the existing object is the run's own, else raise ``ChildConflict``."""
        existing = self.api.get_object(type_key(action.obj), run.namespace, action.name)
        reason = (f"{action.kind} {action.name} was deleted right after the create answered 409"
                  if existing is None else leftover_reason(observe_child(existing), run.uid))
        if reason is not None:
            raise ChildConflict(f"{run.namespace}/{run.name}: {reason}; the run's own is created once it is gone "
                                "(delete it if it stays)")
        log.debug("%s/%s: %s %s already exists", run.namespace, run.name, action.kind, action.name)

    def copy_progress(self, namespace: str, run_name: str, config_map: dict[str, Any]) -> bool:
        """Copy a progress ConfigMap's data into the status of ``run_name`` (the name its owner reference
        gives); False if there was nothing to copy or the ConfigMap is not that run's (``progress.run_owns``).
        """
        patch = progress.status_patch(dict(config_map.get("data") or {}))
        if patch is None:
            return False
        run = self.api.get_run(namespace, run_name)
        if not progress.run_owns(config_map, run):
            log.warning("%s/%s: ignoring ConfigMap %s: it is not that run's progress ConfigMap (name or uid "
                        "differ)", namespace, run_name, (config_map.get("metadata") or {}).get("name"))
            return False
        return self.api.patch_run_status(namespace, run_name, patch) is not None


class StopFlag:
    """Set when a run's loop must end (the run was deleted, the operator is stopping)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> bool:
        return await self._event.wait()


class RunLoops:
    """One reconcile loop per run, woken by nudges; at most one pass per run at a time."""

    def __init__(self, reconciler: RunReconciler, *, resync_seconds: float = 30.0,
                 finished_resync_seconds: float = 600.0, debounce_seconds: float = 0.2,
                 max_backoff_seconds: float = 60.0, workers: int = 16):
        self.reconciler = reconciler
        # Passes block on HTTP, not on CPU: more threads than asyncio's default (cores + 4) keep
        # a burst of runs from queueing behind each other's API round trips.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                              thread_name_prefix="reconcile")
        self.resync_seconds = resync_seconds
        self.finished_resync_seconds = finished_resync_seconds
        self.debounce_seconds = debounce_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._wakeups: dict[RunKey, asyncio.Event] = {}
        self._tasks: dict[RunKey, tuple[asyncio.Task, StopFlag]] = {}

    def ensure(self, namespace: str, name: str) -> bool:
        """Start the run's loop unless it is running (call from the event loop); True if started."""
        key = (namespace, name)
        current = self._tasks.get(key)
        if current is not None and not current[0].done():
            return False
        stop = StopFlag()
        task = asyncio.get_running_loop().create_task(self.run(namespace=namespace, name=name, stopped=stop),
                                                      name=f"reconcile {namespace}/{name}")
        self._tasks[key] = (task, stop)
        task.add_done_callback(lambda done: self._tasks.pop(key, None) if self._tasks.get(key, (None,))[0] is done
                               else None)
        return True

    async def stop_all(self) -> None:
        """Stop every loop (operator shutdown) and wait for passes in flight."""
        tasks = list(self._tasks.values())
        for _, stop in tasks:
            stop.set()
        if tasks:
            await asyncio.wait([task for task, _ in tasks], timeout=10)

    def nudge(self, namespace: str, name: str) -> None:
        """Wake the run's loop now (no-op if it has none yet: the loop's first pass is immediate)."""
        wakeup = self._wakeups.get((namespace, name))
        if wakeup is not None:
            wakeup.set()

    def _next_wait(self, decision: Decision | None) -> float:
        if decision is None:
            return self.resync_seconds
        if decision.status.state in TERMINAL_STATES:
            return self.finished_resync_seconds
        if decision.requeue_after is not None:
            return max(0.5, min(self.resync_seconds, decision.requeue_after + 0.5))
        return self.resync_seconds

    async def run(self, *, namespace: str, name: str, stopped: Any, logger: logging.Logger | Any = log) -> None:
        """The loop of one run, until kopf stops the daemon (deletion or operator exit)."""
        key = (namespace, name)
        wakeup = self._wakeups.setdefault(key, asyncio.Event())
        # Return when kopf says stop (deletion, shutdown) instead of being cancelled mid-wait.
        stopping = asyncio.ensure_future(stopped.wait())
        failures = 0
        try:
            while not stopped:
                wakeup.clear()
                try:
                    decision = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self.reconciler.reconcile, namespace, name)
                    if decision is None:
                        return  # the run is gone or being deleted; its children go with it (owner references)
                    wait = self._next_wait(decision)
                    failures = 0
                except Exception as exc:  # keep the loop alive; the next pass starts from scratch
                    failures += 1
                    wait = min(self.max_backoff_seconds, 2.0 ** failures)
                    self.reconciler.metrics.reconcile_errors.labels(handler="reconcile").inc()
                    logger.warning(f"reconcile of {namespace}/{name} failed ({exc!r}); retrying in {wait:.0f}s")
                woken = asyncio.ensure_future(wakeup.wait())
                done, _ = await asyncio.wait({woken, stopping}, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if woken in done and stopping not in done:
                    await asyncio.sleep(self.debounce_seconds)  # let a burst of pod events coalesce
                woken.cancel()
        finally:
            stopping.cancel()
            if self._wakeups.get(key) is wakeup:
                del self._wakeups[key]

    def forget(self, namespace: str, name: str) -> None:
        """The run is deleted: stop its loop and drop it from the state gauge."""
        current = self._tasks.get((namespace, name))
        if current is not None:
            current[1].set()
            self.nudge(namespace, name)
        self.reconciler.metrics.set_run_state((namespace, name), None)
