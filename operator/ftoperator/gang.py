"""Gang semantics for a stage that runs as N pods (issue 13): pure decisions, no I/O, no clock.

The pods of one attempt of a multi-node stage live and die together:

* **All or none.** An attempt is N pods ``<run>-<stage>-<attempt>-<rank>`` with rank labels
  0..N-1, created in one pass. If the API server refuses one of them (quota, admission), the
  ones already created are deleted and the next attempt creates all N again: a partial gang
  would hold GPUs while waiting for a peer that never comes.
* **One ends, all end.** When a member fails, is evicted, is deleted from outside, or its node
  stops reporting, the others are deleted and the attempt is over. The next attempt starts only
  once every pod of the old one is gone, because an old rank may still be writing the checkpoint
  the next attempt resumes from (and it still holds its GPUs).
* **Placement.** While some members are unscheduled the decision says how many of N are placed
  and quotes the scheduler. After ``placement_timeout_seconds`` with some but not all placed, the
  whole attempt is released, so a partial gang does not hold GPUs forever; with none placed
  nothing is held and the gang simply waits.

Rank 0 is reachable as ``<service>.<namespace>.svc``: a headless Service per attempt that selects
the attempt's rank-0 pod and publishes its address before it is ready (``rendezvous_service``).
``rendezvous_env`` gives each pod what ``torchrun`` reads (``PET_*``, as Kubeflow Trainer sets
them) and the plain names (``MASTER_ADDR`` ...) that ``accelerate`` and humans read.

The caller (``decide``, next) turns a ``GangDecision`` into actions and status: it counts a
``failed`` member against backoffLimit or disruptionLimit as it does for one pod today, and
records attempt + 1 as soon as ``attempt_over`` is set (the old attempt's pods are then deleted
and waited for by the next decisions; deciding again for the same attempt would create its names again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Sequence

from ftoperator import GROUP, naming
from ftoperator.builders import RunRef, owner_reference
from ftoperator.conditions import parse_timestamp
from ftoperator.observe import ObservedPod, observe_pod
from trainer.multinode import COLLECTIVE_TIMEOUT_ENV, EXPECTED_WORLD_SIZE_ENV, RENDEZVOUS_TIMEOUT_ENV

LABEL_RANK = naming.LABEL_RANK
"""Node rank of a gang member (0..N-1); rank 0 hosts the rendezvous."""
LABEL_GANG_SIZE = f"{GROUP}/nodes"
"""How many pods the member's attempt has."""
DEFAULT_MASTER_PORT = 29500
"""torch.distributed's customary rendezvous port on rank 0."""
RENDEZVOUS_PORT_NAME = "rendezvous"
SIGTERM_EXIT_CODE = 128 + 15
"""The trainer's exit code after a SIGTERM (``runtime.INTERRUPTED_EXIT_CODE``; not imported: it loads torch)."""


GangState = Literal["Creating", "WaitingForOldAttempt", "WaitingForPlacement", "Starting", "Running",
                    "Succeeded", "Restarting", "Released"]


@dataclass(frozen=True)
class GangSettings:
    """How a gang behaves; every duration in seconds."""

    nodes: int
    """Pods per attempt (spec ``nodes``)."""
    placement_timeout_seconds: float = 600.0
    """Some but not all members placed for this long (counted from the attempt's first pod): release them all."""
    node_lost_seconds: float = 120.0
    """A running member not Ready for this long (its node stopped reporting) counts as lost."""
    stuck_terminating_seconds: float = 300.0
    """A member still there this long after its deletion was due, on a node not reporting, is force-deleted."""


@dataclass(frozen=True)
class GangPod:
    """One observed member of a gang: its rank, where it runs, and the single-pod observation."""

    rank: int
    pod: ObservedPod
    node: str | None = None
    """spec.nodeName: set once the scheduler has placed the pod."""
    not_ready_since: datetime | None = None
    """When the Ready condition last turned False (None while Ready or before it has one)."""
    finished: datetime | None = None
    """When the trainer container terminated (picks the first failure when several ranks fail)."""

    @property
    def name(self) -> str:
        return self.pod.name

    @property
    def attempt(self) -> int:
        return self.pod.attempt


def _stamp(value: Any) -> datetime | None:
    return parse_timestamp(value) if value else None


def observe_gang_pod(pod: dict[str, Any]) -> GangPod | None:
    """The gang observation of a stage pod, or None when it is not a gang member (no valid rank label)."""
    observed = observe_pod(pod)
    labels = (pod.get("metadata") or {}).get("labels") or {}
    try:
        rank = int(labels.get(LABEL_RANK, ""))
    except ValueError:
        return None
    if observed is None or rank < 0:
        return None
    status = pod.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    not_ready_since = _stamp(ready.get("lastTransitionTime")) if ready and ready.get("status") == "False" else None
    finished = None
    for container in status.get("containerStatuses") or []:
        if container.get("name") in (None, naming.TRAINER_CONTAINER):
            finished = _stamp(((container.get("state") or {}).get("terminated") or {}).get("finishedAt"))
    return GangPod(rank=rank, pod=observed, node=(pod.get("spec") or {}).get("nodeName") or None,
                   not_ready_since=not_ready_since, finished=finished)


# ----------------------------------------------------------------------------- names and objects


def gang_pod_name(run: str, stage: str, attempt: int, rank: int) -> str:
    """``<run>-<stage>-<attempt>-<rank>``, shortened with a hash when the run name is long."""
    return naming.bounded(run, f"-{stage}-{attempt}-{rank}")


def gang_pod_labels(run: str, stage: str, attempt: int, rank: int, nodes: int) -> dict[str, str]:
    """A stage pod's labels plus its rank and the gang size."""
    return {**naming.pod_labels(run, stage, attempt), LABEL_RANK: str(rank), LABEL_GANG_SIZE: str(nodes)}


def rendezvous_service_name(run: str, stage: str, attempt: int) -> str:
    """The headless Service of one attempt: a DNS-1035 label (starts with a letter, no dots, <= 63)."""
    base = run.replace(".", "-")
    if not "a" <= base[:1] <= "z":
        base = "r-" + base
    return naming.bounded(base, f"-{stage}-{attempt}")


def master_address(run: str, namespace: str, stage: str, attempt: int) -> str:
    """``<service>.<namespace>.svc``: rank 0's name on any conformant cluster, whatever its cluster domain
    (pods resolve it through the search path the kubelet writes into resolv.conf)."""
    return f"{rendezvous_service_name(run, stage, attempt)}.{namespace}.svc"


def attempt_object_metadata(run: RunRef, *, stage: str, attempt: int) -> dict[str, Any]:
    """Metadata of an object that serves one attempt (its Service, its PodGroup): named after the attempt,
    labelled with run, stage and attempt, owned by the run (deleted with it by the garbage collector)."""
    return {
        "name": rendezvous_service_name(run.name, stage, attempt),
        "namespace": run.namespace,
        "labels": {**naming.run_labels(run.name), naming.LABEL_STAGE: stage, naming.LABEL_ATTEMPT: str(attempt)},
        "ownerReferences": [owner_reference(run)],
    }


def rendezvous_service(run: RunRef, *, stage: str, attempt: int, port: int = DEFAULT_MASTER_PORT) -> dict[str, Any]:
    """Headless Service whose DNS name resolves to the attempt's rank-0 pod.

    ``publishNotReadyAddresses``: stage pods have no readiness probe worth waiting for, and the
    other ranks must reach rank 0 while it is still starting. One Service per attempt, so a name
    never points at an older attempt's rank 0; it is owned by the run and deleted with it.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": attempt_object_metadata(run, stage=stage, attempt=attempt),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {naming.LABEL_RUN: naming.run_label_value(run.name), naming.LABEL_STAGE: stage,
                         naming.LABEL_ATTEMPT: str(attempt), LABEL_RANK: "0"},
            "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def rendezvous_env(*, run: str, namespace: str, stage: str, attempt: int, rank: int, nodes: int,
                   processes_per_node: int, port: int = DEFAULT_MASTER_PORT,
                   rendezvous_timeout_seconds: int = 900, collective_timeout_seconds: int = 1800,
                   ) -> list[dict[str, str]]:
    """The environment of gang member ``rank``: the rendezvous for ``torchrun`` and the trainer's checks.

    ``PET_*`` are what ``torchrun`` (``python -m torch.distributed.run``) reads for its arguments,
    the names Kubeflow Trainer's torch plugin sets; ``PET_RDZV_CONF`` gives its agents the same
    rendezvous timeout as the trainer. The unprefixed names are for ``accelerate launch``
    (``--machine_rank`` and friends) and for people reading ``kubectl describe``. RANK and
    WORLD_SIZE are not set: torchrun sets them per process.
    """
    address = master_address(run, namespace, stage, attempt)
    values = {
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
        "NNODES": str(nodes),
        "NODE_RANK": str(rank),
        "NPROC_PER_NODE": str(processes_per_node),
        "PET_MASTER_ADDR": address,
        "PET_MASTER_PORT": str(port),
        "PET_NNODES": str(nodes),
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": str(processes_per_node),
        "PET_RDZV_CONF": f"timeout={rendezvous_timeout_seconds}",
        EXPECTED_WORLD_SIZE_ENV: str(nodes * processes_per_node),
        RENDEZVOUS_TIMEOUT_ENV: str(rendezvous_timeout_seconds),
        COLLECTIVE_TIMEOUT_ENV: str(collective_timeout_seconds),
    }
    return [{"name": key, "value": value} for key, value in values.items()]


def gang_scheduler_metadata(*, scheduler: Literal["kueue", "coscheduling", "volcano"], group: str,
                            nodes: int) -> dict[str, dict[str, str]]:
    """Labels and annotations that make a gang scheduler treat the attempt's pods as one group.

    * kueue: plain-pod groups (the pods also need the queue label ``kueue.x-k8s.io/queue-name``
      from podTemplate.labels); Kueue admits all N pods' quota at once and ungates them together.
    * coscheduling (scheduler-plugins): the pods join PodGroup ``group`` (a PodGroup object with
      ``minMember: N`` must exist, and ``schedulerName`` must name that scheduler).
    * volcano: the pods join Volcano PodGroup ``group`` (``minMember: N``; schedulerName volcano).
    """
    if scheduler == "kueue":
        return {"labels": {"kueue.x-k8s.io/pod-group-name": group},
                "annotations": {"kueue.x-k8s.io/pod-group-total-count": str(nodes)}}
    if scheduler == "coscheduling":
        return {"labels": {"scheduling.x-k8s.io/pod-group": group}, "annotations": {}}
    if scheduler == "volcano":
        return {"labels": {}, "annotations": {"scheduling.k8s.io/group-name": group}}
    raise ValueError(f"unknown gang scheduler {scheduler!r}: kueue, coscheduling or volcano")


POD_GROUP_API_VERSIONS = {"coscheduling": "scheduling.x-k8s.io/v1alpha1", "volcano": "scheduling.volcano.sh/v1beta1"}
"""The PodGroup each pod-group scheduler reads (scheduler-plugins' coscheduling, Volcano)."""


def pod_group(run: RunRef, *, scheduler: Literal["coscheduling", "volcano"], stage: str, attempt: int, nodes: int,
              placement_timeout_seconds: int) -> dict[str, Any]:
    """The attempt's PodGroup, named like its rendezvous Service: bind all ``nodes`` pods or none.

    coscheduling's ``scheduleTimeoutSeconds`` is the placement timeout, so both give up together (our
    gang rules release the pods then). Volcano's queue is its ``default`` one; owned by the run, so the
    garbage collector deletes it with the run.
    """
    spec: dict[str, Any] = {"minMember": nodes}
    if scheduler == "coscheduling":
        spec["scheduleTimeoutSeconds"] = placement_timeout_seconds
    return {
        "apiVersion": POD_GROUP_API_VERSIONS[scheduler],
        "kind": "PodGroup",
        "metadata": attempt_object_metadata(run, stage=stage, attempt=attempt),
        "spec": spec,
    }


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class GangDelete:
    """Delete one member; ``force`` (grace period 0) only for a pod whose node will never confirm."""

    name: str
    reason: str
    force: bool = False


@dataclass(frozen=True)
class GangDecision:
    state: GangState
    message: str
    create_ranks: tuple[int, ...] = ()
    """Ranks to create now (with the rendezvous Service when rank 0 is among them)."""
    deletes: tuple[GangDelete, ...] = ()
    placed: int = 0
    """Members the scheduler has bound to a node."""
    attempt_over: bool = False
    """The attempt has ended (failure, loss, refused create, released): the caller records attempt + 1 now;
    its pods are created once every pod of this attempt is gone."""
    failed: GangPod | None = None
    """The member whose end ended the attempt (the caller classifies it: permanent, disruption, failure)."""
    requeue_after: float | None = None
    """Decide again after this many seconds even if nothing changes (a timeout falls due)."""
    unplaced: tuple[int, ...] = field(default=())
    """Ranks the scheduler could not place yet."""


def _lost(member: GangPod, *, now: datetime, settings: GangSettings) -> bool:
    """The member's node stopped reporting: phase Unknown, or Running but not Ready for too long."""
    pod = member.pod
    if pod.phase == "Unknown":
        return True
    return (pod.phase == "Running" and member.not_ready_since is not None
            and (now - member.not_ready_since).total_seconds() >= settings.node_lost_seconds)


def _stuck(member: GangPod, *, now: datetime, settings: GangSettings) -> bool:
    pod = member.pod
    return (pod.deletion_time is not None and pod.ready is not True
            and (now - pod.deletion_time).total_seconds() >= settings.stuck_terminating_seconds)


def _end_of(member: GangPod, *, now: datetime, settings: GangSettings) -> str | None:
    """Why this member ends the attempt, or None while it is fine."""
    pod = member.pod
    if pod.phase == "Failed":
        return pod.failure or "Failed"
    if _lost(member, now=now, settings=settings):
        return f"its node {member.node or '(unknown)'} stopped reporting"
    if pod.deleting and pod.phase != "Succeeded":
        return "it was deleted (eviction, preemption, node drain or by hand)"
    return None


def _delete_all(members: Sequence[GangPod], reason: str, *, now: datetime,
                settings: GangSettings) -> tuple[GangDelete, ...]:
    """Deletes for every member not already being deleted, plus a force-delete for each one stuck terminating."""
    out = []
    for member in members:
        if not member.pod.deleting:
            out.append(GangDelete(member.name, reason))
        elif _stuck(member, now=now, settings=settings):
            out.append(GangDelete(member.name, "stuck terminating on a node that stopped reporting", force=True))
    return tuple(out)


def decide_gang(*, attempt: int, pods: Sequence[GangPod], settings: GangSettings, now: datetime,
                create_refused: str | None = None) -> GangDecision:
    """What to do with the gang of ``attempt`` given every observed member of the stage (any attempt).

    ``pods`` are the stage's gang members as observed now (``observe_gang_pod``); members of
    older attempts are deleted and waited for. ``create_refused`` is the API server's message when
    a create of this attempt was refused in the previous pass. Never reads the clock: ``now``.
    """
    n = settings.nodes
    attempt = max([attempt, *(m.attempt for m in pods)])  # the observed pods win over a stale record
    old = [m for m in pods if m.attempt < attempt]
    if old:
        deletes = _delete_all(old, f"attempt {old[0].attempt} is over; attempt {attempt} replaces it",
                              now=now, settings=settings)
        return GangDecision(
            state="WaitingForOldAttempt", deletes=deletes,
            message=f"waiting for {len(old)} pod(s) of an earlier attempt to be gone before starting all {n} "
                    f"of attempt {attempt} (a rank may still be writing the checkpoint it resumes from)")

    members: dict[int, GangPod] = {}
    for member in sorted(pods, key=lambda m: m.rank):
        if member.rank < n:
            members.setdefault(member.rank, member)
    extra = [m for m in pods if m.rank >= n]
    placed = sum(1 for m in members.values() if m.node)

    if create_refused is not None:
        deletes = _delete_all(list(members.values()), "another pod of its gang could not be created",
                              now=now, settings=settings)
        return GangDecision(
            state="Restarting", deletes=deletes, attempt_over=True, placed=placed,
            message=f"a pod of attempt {attempt} was refused ({create_refused}); its {len(members)} created "
                    f"pod(s) are deleted and the next attempt creates all {n} again")

    ended = [(m, why) for m in members.values() if (why := _end_of(m, now=now, settings=settings))]
    started = any(m.pod.phase in ("Running", "Succeeded", "Failed", "Unknown") for m in members.values())
    missing = [rank for rank in range(n) if rank not in members]
    if not ended and missing and started and not all(m.pod.phase == "Succeeded" for m in members.values()):
        # A member vanished after the gang started: the survivors can only hang at the next collective.
        first = missing[0]
        reason = f"rank {first} of attempt {attempt} disappeared (deleted from outside, or its node was removed)"
        deletes = _delete_all(list(members.values()), f"{reason}; the gang restarts together",
                              now=now, settings=settings)
        return GangDecision(state="Restarting", deletes=deletes, attempt_over=True, placed=placed, message=reason)

    if ended:
        def order(item: tuple[GangPod, str]) -> tuple[int, datetime, int]:
            member = item[0]
            # A failure the trainer reported names the cause; the others usually died of losing it.
            # A member stopped by SIGTERM (with its checkpoint) was stopped, not failed: whatever else ended
            # (a peer deleted or evicted) is the cause, whichever end was seen first.
            stopped = member.pod.phase == "Failed" and member.pod.exit_code == SIGTERM_EXIT_CODE
            reported = member.pod.phase == "Failed" and not member.pod.disrupted and not stopped
            return (0 if reported else 2 if stopped else 1, member.finished or now, member.rank)

        first, why = min(ended, key=order)
        reason = f"rank {first.rank} ({first.name}) ended: {why}"
        deletes = _delete_all(list(members.values()), f"{reason}; the gang restarts together",
                              now=now, settings=settings)
        # A lost member is deleted gracefully first and forced only once stuck terminating: a pod on a
        # partitioned node may still be running and writing the checkpoint.
        return GangDecision(state="Restarting", deletes=deletes, attempt_over=True, failed=first, placed=placed,
                            # Only the cause and the gang's end: whether a next attempt follows (and resumes)
                            # is the stage's decision, said by its retry message or its failure.
                            message=f"{reason}; all {n} pods of attempt {attempt} are stopped")

    if members and len(members) == n and all(m.pod.phase == "Succeeded" for m in members.values()):
        return GangDecision(state="Succeeded", placed=placed, message=f"all {n} pods succeeded")

    deletes = tuple(GangDelete(m.name, f"rank {m.rank} is outside a gang of {n}") for m in extra
                    if not m.pod.deleting)
    if missing and not started:
        return GangDecision(state="Creating", create_ranks=tuple(missing), deletes=deletes, placed=placed,
                            message=f"creating {len(missing)} of {n} pods of attempt {attempt}")

    unplaced = tuple(sorted(r for r, m in members.items() if not m.node))
    if unplaced:
        scheduler = next((members[r].pod.unschedulable for r in unplaced if members[r].pod.unschedulable), None)
        message = f"{placed} of {n} pods placed"
        if scheduler:
            message += f"; rank {unplaced[0]} waits: {scheduler}"
        if placed == 0:
            return GangDecision(state="WaitingForPlacement", deletes=deletes, placed=0, unplaced=unplaced,
                                message=message)
        created = [m.pod.created for m in members.values() if m.pod.created is not None]
        waited = (now - min(created)).total_seconds() if created else 0.0
        left = settings.placement_timeout_seconds - waited
        if left <= 0 and scheduler:
            release = _delete_all(list(members.values()),
                                  f"gang placement timed out: {placed} of {n} placed after {waited:.0f}s",
                                  now=now, settings=settings)
            return GangDecision(
                state="Released", deletes=deletes + release, attempt_over=True, placed=placed, unplaced=unplaced,
                message=f"{message}; released the {placed} placed pod(s) after {waited:.0f}s "
                        f"(placementTimeoutSeconds {settings.placement_timeout_seconds:.0f}) so they do not hold "
                        "resources; the next attempt asks for all of them again")
        return GangDecision(state="WaitingForPlacement", deletes=deletes, placed=placed, unplaced=unplaced,
                            message=message, requeue_after=max(left, 0.0) or None)

    running = sum(1 for m in members.values() if m.pod.phase in ("Running", "Succeeded"))
    if running == n:
        return GangDecision(state="Running", deletes=deletes, placed=placed, message=f"{n} of {n} pods running")
    return GangDecision(state="Starting", deletes=deletes, placed=placed,
                        message=f"{running} of {n} pods running, all placed")
