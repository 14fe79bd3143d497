"""A stage with ``resources.nodes`` above 1, wired into ``decide``: its pods, its Service and its status (pure).

``gang.py`` holds the rules (``decide_gang``) and the pieces (names, rendezvous env, Service);
this module turns a spec into those pieces and a ``GangDecision`` into the run's actions and
stage status, using the single-pod pass's own bookkeeping (``attempt_ended``, ``stage_failed``)
so that a gang counts failures, disruptions and backoff exactly like one pod:

* a member the trainer failed -> a failure (backoffLimit), or permanent;
* a member evicted, deleted or lost, a gang released after ``placementTimeoutSeconds`` -> a
  disruption (disruptionLimit), never the trainer's fault;
* a create the API server refused -> the attempt's created members are deleted and the next
  attempt waits for the create backoff (``status.failedCreate``), counted by the refusal limit.

``nodes`` absent or 1 never reaches this module: the single pod, its name and command are unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ftoperator import builders, naming
from ftoperator.api import FineTuneRunSpec, Termination, effective_resources, trainer_processes
from ftoperator.builders import RunRef
from ftoperator.config import OperatorConfig
from ftoperator.gang import (
    LABEL_GANG_SIZE, LABEL_RANK, POD_GROUP_API_VERSIONS, RENDEZVOUS_PORT_NAME, SIGTERM_EXIT_CODE, GangPod,
    GangSettings, decide_gang, gang_pod_labels, gang_pod_name, gang_scheduler_metadata, pod_group, rendezvous_env,
    rendezvous_service, rendezvous_service_name,
)
from ftoperator.observe import ObservedPod
from trainer.multinode import PROGRESS_TIMEOUT_ENV

if TYPE_CHECKING:
    from ftoperator.decide import _Pass

LAUNCH_MODULE = "trainer.gang_launch"
"""Each gang pod runs ``python -m trainer.gang_launch``: torchrun with its arguments from ``PET_*``."""
GANG_ENV = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "PET_MASTER_ADDR",
            "PET_MASTER_PORT", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_RDZV_CONF",
            "FINETUNE_EXPECTED_WORLD_SIZE", "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS",
            "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS", PROGRESS_TIMEOUT_ENV)
"""Variables the operator sets in gang pods (``rendezvous_env``) and the watchdog's: podTemplate.env may not set them."""


def stage_nodes(spec: FineTuneRunSpec, stage: str) -> int:
    """Pods per attempt of ``stage`` (``resources.nodes``, per-stage override first; default 1)."""
    return effective_resources(spec, stage).nodes or 1


def gang_settings(spec: FineTuneRunSpec, stage: str, config: OperatorConfig) -> GangSettings:
    return GangSettings(nodes=stage_nodes(spec, stage),
                        placement_timeout_seconds=float(spec.distributed.placement_timeout_seconds),
                        stuck_terminating_seconds=config.stuck_terminating_seconds)


def gang_command(stage: str) -> list[str]:
    """No shell and no arguments to expand: torchrun reads nodes, rank, address and port from ``PET_*``."""
    return ["python", "-m", LAUNCH_MODULE, "--stage", stage, "--config", f"{naming.CONFIG_DIR}/{builders.JOB_FILE}"]


def gang_pod(spec: FineTuneRunSpec, *, run: RunRef, stage: str, attempt: int, rank: int,
             config: OperatorConfig) -> dict[str, Any]:
    """Rank ``rank`` of one attempt: the single stage pod with the gang's name, labels, env, command and port."""
    nodes = stage_nodes(spec, stage)
    pod = builders.stage_pod(spec, run=run, stage=stage, attempt=attempt, config=config)
    name = gang_pod_name(run.name, stage, attempt, rank)
    meta, container = pod["metadata"], pod["spec"]["containers"][0]
    meta["name"] = name
    meta["labels"] = {**meta["labels"], **gang_pod_labels(run.name, stage, attempt, rank, nodes)}
    distributed = spec.distributed
    if distributed.gang_scheduler != "none":
        extra = gang_scheduler_metadata(scheduler=distributed.gang_scheduler,
                                        group=rendezvous_service_name(run.name, stage, attempt), nodes=nodes)
        meta["labels"] = {**meta["labels"], **extra["labels"]}
        if extra["annotations"]:
            meta["annotations"] = {**(meta.get("annotations") or {}), **extra["annotations"]}
    env = [var for var in container["env"] if var["name"] != "POD_NAME"]
    env.insert(1, {"name": "POD_NAME", "value": name})
    env += rendezvous_env(run=run.name, namespace=run.namespace, stage=stage, attempt=attempt, rank=rank,
                          nodes=nodes, processes_per_node=trainer_processes(effective_resources(spec, stage).gpus),
                          port=distributed.port,
                          rendezvous_timeout_seconds=distributed.rendezvous_timeout_seconds,
                          collective_timeout_seconds=distributed.collective_timeout_seconds)
    container["env"] = env
    if config.stage_command_override is None:
        container["command"] = gang_command(stage)
    container["ports"] = [*container.get("ports", []),
                          {"name": RENDEZVOUS_PORT_NAME, "containerPort": distributed.port, "protocol": "TCP"}]
    # The pod's hostname is its own name (a DNS label), not the 63-character-capped run prefix.
    return pod


def gang_member(pod: ObservedPod) -> GangPod | None:
    """The gang view of an observed stage pod (None without a rank label: a single-pod attempt)."""
    if pod.rank is None:
        return None
    return GangPod(rank=pod.rank, pod=pod, node=pod.node, not_ready_since=pod.not_ready_since,
                   finished=pod.finished)


# ----------------------------------------------------------------------------- in decide's pass


def _refused_here(work: _Pass, run: RunRef, stage: str, attempt: int, nodes: int) -> str | None:
    refused = work.refused
    if refused is None:
        return None
    names = {gang_pod_name(run.name, stage, attempt, rank) for rank in range(nodes)}
    names.add(rendezvous_service_name(run.name, stage, attempt))
    return f"{refused.kind} {refused.name}: HTTP {refused.code}: {refused.message}" if refused.name in names else None


def step(work: _Pass, spec: FineTuneRunSpec, stage: str) -> Literal["succeeded", "waiting", "failed"]:
    """Apply ``decide_gang`` to the stage's current attempt (``status.stages.<stage>.attempts``)."""
    from ftoperator.decide import CreateObject, DeletePod

    run, current = work.run, work.status.stage(stage)
    settings = gang_settings(spec, stage, work.config)
    members = [m for m in (gang_member(p) for p in work.pods if p.stage == stage) if m is not None]
    for single in (p for p in work.pods if p.stage == stage and p.rank is None and p.active):
        work.decision.actions.append(DeletePod(single.name, "the stage now runs as a gang of pods"))
    attempt = current.attempts
    refused = _refused_here(work, run, stage, attempt, settings.nodes)
    decision = decide_gang(attempt=attempt, pods=members, settings=settings, now=work.now, create_refused=refused)
    asked = {(a.name, a.force) for a in work.decision.actions if isinstance(a, DeletePod)}
    work.decision.actions.extend(DeletePod(d.name, d.reason, force=d.force) for d in decision.deletes
                                 if (d.name, d.force) not in asked)  # once per pass, when a new attempt follows
    if decision.requeue_after is not None:
        work.decision.requeue(decision.requeue_after)
    current.pod = gang_pod_name(run.name, stage, attempt, 0)

    if decision.create_ranks:
        if not work.may_create:
            return "waiting"
        work.ensure_stage_config(spec, stage)
        if 0 in decision.create_ranks:
            scheduler = spec.distributed.gang_scheduler
            if scheduler in POD_GROUP_API_VERSIONS:  # the scheduler must see the group before any member
                work.decision.actions.append(CreateObject(pod_group(
                    run, scheduler=scheduler, stage=stage, attempt=attempt, nodes=settings.nodes,
                    placement_timeout_seconds=spec.distributed.placement_timeout_seconds)))
            work.decision.actions.append(CreateObject(rendezvous_service(run, stage=stage, attempt=attempt,
                                                                         port=spec.distributed.port)))
        work.decision.actions.extend(
            CreateObject(gang_pod(spec, run=run, stage=stage, attempt=attempt, rank=rank, config=work.config))
            for rank in decision.create_ranks)
        current.state, current.reason, current.message = "Starting", "PodsCreated", decision.message
        return "waiting"

    if decision.state == "Restarting" and refused is not None:
        # Not the trainer's failure nor a disruption: the refusal limit and backoff of
        # status.failedCreate count it; the next attempt's pods are created when creates may resume.
        current.attempts = attempt + 1
        current.pod = gang_pod_name(run.name, stage, attempt + 1, 0)
        current.state, current.reason, current.message = "Starting", "FailedCreate", decision.message
        return "waiting"

    if decision.attempt_over:
        failed = decision.failed
        if failed is None:
            return work.attempt_ended(spec, stage, Termination(
                attempt=attempt, pod=current.pod or "", time=work.stamp,
                reason="GangReleased" if decision.state == "Released" else "PodDeleted",
                message=decision.message), disrupted=True)
        pod = failed.pod
        # A member that stopped on SIGTERM (its checkpoint written) was stopped with its peer, not failed by
        # the trainer: whoever deleted the peer disrupted the gang, even when this member's end is seen first.
        trainer_failed = pod.phase == "Failed" and not pod.disrupted and pod.exit_code != SIGTERM_EXIT_CODE
        return work.attempt_ended(spec, stage, Termination(
            attempt=attempt, pod=pod.name, reason=(pod.reason or "Error") if trainer_failed else "GangMemberLost",
            exit_code=pod.exit_code if trainer_failed else None, message=decision.message,
            permanent=pod.permanent and trainer_failed, time=work.stamp),
            disrupted=not trainer_failed, memory_limit=pod.memory_limit)

    current.waiting_since = None
    if decision.state == "Succeeded":
        return work.stage_succeeded(spec, stage, "PodsSucceeded", decision.message)
    if decision.state == "Running":
        return work.stage_running(stage, "PodsRunning", decision.message)
    if decision.state == "WaitingForPlacement" and any(m.pod.unschedulable for m in members):
        if current.state != "WaitingForResources":
            work.event("Warning", "WaitingForResources", f"stage {stage}: {decision.message}")
        current.state, current.reason, current.message = "WaitingForResources", "Unschedulable", decision.message
        return "waiting"
    current.state, current.reason = "Starting", decision.state
    current.message = decision.message
    previous = current.last_failure
    if decision.state == "WaitingForOldAttempt" and previous is not None and previous.attempt == attempt - 1:
        current.message = f"{previous.message}; {decision.message}"  # keep saying why there is a new attempt
    return "waiting"


def advance(work: _Pass, spec: FineTuneRunSpec, stage: str) -> Literal["succeeded", "waiting", "failed"]:
    """``decide``'s ``advance`` for a gang stage: attempts, backoff and suspension as for one pod, then ``step``."""
    current = work.status.stage(stage)
    attempts = [p.attempt for p in work.pods if p.stage == stage and p.rank is not None]
    attempt = max([current.attempts, *attempts])
    if attempt == 0:
        if work.start_attempt(spec, stage, 1):
            work.event("Normal", "StageStarted", f"stage {stage} started: {stage_nodes(spec, stage)} pods, "
                       f"rank 0 {current.pod}")
        return "waiting"
    if attempt > current.attempts:
        # The pods were created but the status that said so was never saved (operator restart).
        current.attempts = attempt
        current.start_time = current.start_time or work.stamp
        current.attempt_start_time = current.attempt_start_time or work.stamp
        if current.state in ("Pending", "Skipped"):
            current.state = "Starting"
    if current.last_failure is not None and current.last_failure.attempt == attempt:
        return work.retry_when_due(spec, stage)
    if current.state == "Suspended" and not any(a == attempt for a in attempts):
        if work.start_attempt(spec, stage, attempt + 1):
            work.event("Normal", "StageStarted", f"stage {stage} resumed: rank 0 {current.pod}")
        return "waiting"
    return step(work, spec, stage)


def start_attempt(work: _Pass, spec: FineTuneRunSpec, stage: str, attempt: int) -> None:
    """Record ``attempt`` and create its pods now unless pods of an older attempt are still there."""
    current = work.status.stage(stage)
    current.pod = gang_pod_name(work.run.name, stage, attempt, 0)
    step(work, spec, stage)


__all__ = ["LABEL_GANG_SIZE", "LABEL_RANK", "advance", "gang_pod", "gang_settings", "stage_nodes", "step",
           "start_attempt"]
