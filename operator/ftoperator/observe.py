"""What the reconciler needs to know about a run's children, extracted from the raw objects (pure).

* ``observe_pod``: a stage pod's stage, attempt, phase and why it failed or waits;
* ``observe_child``: any object that has one of a run's child names (pod, ConfigMap,
  ServiceAccount, Role, RoleBinding), who controls it and whether it is being deleted;
  ``leftover_reason`` says why a run may not count such an object as its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ftoperator import naming
from ftoperator.conditions import parse_timestamp

MESSAGE_LIMIT = 1000
"""Characters of a failure or scheduler message kept in status and events."""

DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated"})
"""pod.status.reason values meaning the pod was removed by the cluster, not failed by the trainer."""

_STUCK_WAITING_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError",
})


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Keep the end of a long message (a traceback's last line says the most)."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


@dataclass(frozen=True)
class ObservedPod:
    name: str
    stage: str
    attempt: int
    phase: str
    """Pending, Running, Succeeded, Failed or Unknown."""
    deleting: bool = False
    created: datetime | None = None
    unschedulable: str | None = None
    """The scheduler's message while the pod cannot be placed."""
    waiting: str | None = None
    """Why the container is stuck before running (image pull errors ...)."""
    failure: str | None = None
    """Why the pod failed: the termination message, else reason and exit code."""
    exit_code: int | None = None
    disrupted: bool = False
    """Failed because the cluster removed it (eviction, node shutdown), not because the trainer failed."""

    @property
    def active(self) -> bool:
        """Still running or about to, and not already being deleted."""
        return self.phase in ("Pending", "Running", "Unknown") and not self.deleting


def observe_pod(pod: dict[str, Any]) -> ObservedPod | None:
    """The observation of a stage pod, or None when the pod is not one (labels missing or malformed)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    stage = labels.get(naming.LABEL_STAGE)
    try:
        attempt = int(labels.get(naming.LABEL_ATTEMPT, ""))
    except ValueError:
        return None
    if not stage:
        return None
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"

    unschedulable = None
    for condition in status.get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            unschedulable = shorten(condition.get("message") or "unschedulable")

    waiting = failure = None
    exit_code = None
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if "waiting" in state and (state["waiting"] or {}).get("reason") in _STUCK_WAITING_REASONS:
            detail = state["waiting"]
            waiting = shorten(f"{detail.get('reason')}: {detail.get('message') or ''}".rstrip(": "))
        terminated = state.get("terminated")
        if terminated:
            exit_code = terminated.get("exitCode")
            message = (terminated.get("message") or "").strip()
            reason = terminated.get("reason") or "Error"
            failure = shorten(message) if message else f"{reason} (exit code {exit_code})"

    disrupted = phase == "Failed" and status.get("reason") in DISRUPTION_REASONS
    if phase == "Failed" and failure is None:
        failure = shorten(" ".join(filter(None, [status.get("reason"), status.get("message")])) or "pod failed")

    created = meta.get("creationTimestamp")
    return ObservedPod(
        name=meta.get("name", ""),
        stage=stage,
        attempt=attempt,
        phase=phase,
        deleting=meta.get("deletionTimestamp") is not None,
        created=parse_timestamp(created) if created else None,
        unschedulable=unschedulable if phase == "Pending" else None,
        waiting=waiting if phase == "Pending" else None,
        failure=failure if phase == "Failed" else None,
        exit_code=exit_code,
        disrupted=disrupted,
    )


# ----------------------------------------------------------------------------- any child


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid in the object's controller owner reference, or None when nothing controls it."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


@dataclass(frozen=True)
class ObservedChild:
    """An object that has the name of one of a run's children; it may belong to someone else."""

    kind: str
    name: str
    controller_uid: str | None
    """The uid of the object that controls it: the run's own uid, an earlier run's of the same name, or None."""
    deleting: bool = False


def observe_child(obj: dict[str, Any]) -> ObservedChild:
    meta = obj.get("metadata") or {}
    return ObservedChild(kind=obj.get("kind", ""), name=meta.get("name", ""), controller_uid=controller_uid(obj),
                         deleting=meta.get("deletionTimestamp") is not None)


def leftover_reason(child: ObservedChild, run_uid: str) -> str | None:
    """Why the run with ``run_uid`` may not count ``child`` as its own, or None when it may.

    An object controlled by another uid is typically left by a deleted run of the same name
    that the garbage collector has not removed yet; creating ours answers 409 until it is gone.
    A run's own ServiceAccount, Role, RoleBinding or ConfigMap that is being deleted is about
    to vanish too. A run's own pod that is being deleted is not a leftover: attempts have their
    own names, and the stage logic waits for such a pod by itself.
    """
    what = f"{child.kind} {child.name}"
    if child.controller_uid is None:
        return f"{what} exists but is not owned by this run"
    if child.controller_uid != run_uid:
        return f"{what} belongs to another owner (uid {child.controller_uid}), likely a deleted run of the same name"
    if child.deleting and child.kind != "Pod":
        return f"{what} is being deleted"
    return None
