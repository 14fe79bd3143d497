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
from ftoperator.naming import TRAINER_CONTAINER
from trainer.config import PERMANENT_FAILURE_EXIT_CODE, PERMANENT_FAILURE_PREFIX

MESSAGE_LIMIT = 1000
"""Characters of a failure or scheduler message kept in status and events."""

DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated"})
"""pod.status.reason values meaning the pod was removed by the cluster, not failed by the trainer."""

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
"""Container waiting reasons that mean the trainer image cannot be pulled."""
STUCK_WAITING_REASONS = IMAGE_PULL_REASONS | {"CreateContainerConfigError", "CreateContainerError"}
"""Container waiting reasons that do not go away by themselves."""


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
    """Why the container is stuck before running (image pull errors ...): reason and message."""
    waiting_reason: str | None = None
    """The container's waiting reason when it is one of ``STUCK_WAITING_REASONS``."""
    image: str | None = None
    """The trainer container's image."""
    reason: str | None = None
    """Why a failed pod ended: the container's terminated reason (OOMKilled, Error, ContainerCannotRun ...),
    else the pod's reason (Evicted, DeadlineExceeded ...)."""
    exit_code: int | None = None
    message: str | None = None
    """The termination message (the trainer's, or the log tail the kubelet took when there was none),
    without the trainer's permanent-error prefix; or the pod's status message."""
    permanent: bool = False
    """The trainer said retrying cannot help (exit code or termination message prefix)."""
    disrupted: bool = False
    """Failed because the cluster removed it (eviction, preemption, node shutdown, kubelet admission),
    not because the trainer failed."""
    memory_limit: str | None = None
    """The trainer container's memory limit, as written in the pod."""
    deletion_time: datetime | None = None
    """metadata.deletionTimestamp: when a graceful deletion should be over."""
    ready: bool | None = None
    """The pod's Ready condition (None when it has none); False on a node that stopped reporting."""
    rank: int | None = None
    """Node rank of a pod of a multi-node stage (label finetune.dev/rank); None for a single pod."""
    node: str | None = None
    """spec.nodeName: set once the scheduler has placed the pod."""
    not_ready_since: datetime | None = None
    """When the Ready condition last turned False (None while Ready or before it has one)."""
    finished: datetime | None = None
    """When the trainer container terminated."""

    @property
    def active(self) -> bool:
        """Still running or about to, and not already being deleted."""
        return self.phase in ("Pending", "Running", "Unknown") and not self.deleting

    @property
    def failure(self) -> str | None:
        """One line saying how the pod ended: reason, exit code and message together."""
        if self.reason is None and self.message is None:
            return None
        head = self.reason or "Failed"
        if self.exit_code is not None:
            head += f" (exit code {self.exit_code})"
        return f"{head}: {self.message}" if self.message else head


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


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
    scheduled = _condition(status, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = shorten(scheduled.get("message") or "unschedulable")
    elif scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "SchedulingGated":
        # A queue (Kueue's pod integration, podTemplate.labels kueue.x-k8s.io/queue-name) holds the pod
        # until it admits it: waiting for resources, not stuck.
        gates = [g.get("name") for g in (pod.get("spec") or {}).get("schedulingGates") or [] if g.get("name")]
        unschedulable = shorten(f"waiting for scheduling gates {', '.join(gates) or '(unnamed)'} to be removed "
                                "(e.g. admission by a Kueue queue)")

    containers = (pod.get("spec") or {}).get("containers") or []
    trainer = next((c for c in containers if c.get("name") == TRAINER_CONTAINER), containers[0] if containers else {})
    image = trainer.get("image")
    memory_limit = ((trainer.get("resources") or {}).get("limits") or {}).get("memory")

    waiting = waiting_reason = None
    reason = message = None
    exit_code = None
    finished = None
    for container in status.get("containerStatuses") or []:
        if container.get("name") not in (None, TRAINER_CONTAINER):
            continue
        state = container.get("state") or {}
        image = image or container.get("image")
        detail = state.get("waiting") or {}
        if detail.get("reason") in STUCK_WAITING_REASONS:
            waiting_reason = detail["reason"]
            waiting = shorten(f"{waiting_reason}: {detail.get('message') or ''}".rstrip(": "))
        terminated = state.get("terminated")
        if terminated:
            # The reason is kept whatever the message says: with FallbackToLogsOnError the message of an
            # OOMKilled container is the tail of its log, which never says it was killed.
            exit_code = terminated.get("exitCode")
            finished = terminated.get("finishedAt")
            reason = terminated.get("reason") or "Error"
            message = (terminated.get("message") or "").strip() or None

    permanent = exit_code == PERMANENT_FAILURE_EXIT_CODE or bool(message and message.startswith(PERMANENT_FAILURE_PREFIX))
    if message is not None:
        message = shorten(message.removeprefix(PERMANENT_FAILURE_PREFIX))

    disruption = _condition(status, "DisruptionTarget")
    disrupted = phase == "Failed" and (
        status.get("reason") in DISRUPTION_REASONS
        or (disruption is not None and disruption.get("status") == "True")
        or reason is None  # rejected by the kubelet (OutOfnvidia.com/gpu ...) before the trainer ran
    )
    if phase == "Failed" and reason is None:
        reason = status.get("reason") or (disruption or {}).get("reason") or "PodFailed"
        message = shorten(status.get("message") or (disruption or {}).get("message") or "") or None

    ready = _condition(status, "Ready")
    try:
        rank: int | None = int(labels[naming.LABEL_RANK])
    except (KeyError, ValueError):
        rank = None
    not_ready = ready is not None and ready.get("status") == "False" and ready.get("lastTransitionTime")
    created = meta.get("creationTimestamp")
    deletion = meta.get("deletionTimestamp")
    return ObservedPod(
        name=meta.get("name", ""),
        stage=stage,
        attempt=attempt,
        phase=phase,
        deleting=deletion is not None,
        created=parse_timestamp(created) if created else None,
        unschedulable=unschedulable if phase == "Pending" else None,
        waiting=waiting if phase == "Pending" else None,
        waiting_reason=waiting_reason if phase == "Pending" else None,
        image=image,
        reason=reason if phase == "Failed" else None,
        exit_code=exit_code,
        message=message if phase == "Failed" else None,
        permanent=permanent and phase == "Failed" and not disrupted,
        disrupted=disrupted,
        memory_limit=memory_limit,
        deletion_time=parse_timestamp(deletion) if deletion else None,
        ready=None if ready is None else ready.get("status") == "True",
        rank=rank if rank is None or rank >= 0 else None,
        node=(pod.get("spec") or {}).get("nodeName") or None,
        not_ready_since=parse_timestamp(not_ready) if not_ready else None,
        finished=parse_timestamp(finished) if finished else None,
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
