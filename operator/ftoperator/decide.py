"""What to do next for one FineTuneRun: a pure function of (spec, status, observed children, now).

``decide`` never talks to the API and never reads the clock. It returns the
actions to apply (create an object -- a 409 is fine only for the run's own; delete a pod), the new
status, the Kubernetes events to post and a few observations for metrics.
Applying the same decision twice is harmless, and so is deciding again from
a status that was not saved: pod names are deterministic and the observed
pods win over the recorded attempt number.

Semantics (docs/operator.md has the user's view):

* Stages run as ``stageplan.plan`` says: sft, reward, then ppo, grpo or dpo; a
  disabled or unlisted stage is skipped, and a reward stage without preference
  data is skipped (its functions are still used by ppo or grpo).
* A failed pod is retried with the same output directory (so the trainer
  resumes from its last checkpoint), after an exponential backoff, until the
  stage has failed ``backoffLimit + 1`` times; then the run fails with the
  container's reason, exit code and termination message. A pod that ends with
  the trainer's permanent-error exit code or message fails the stage at once.
* A pod that vanishes (deleted from outside) or is evicted, preempted or
  rejected by its node is replaced at once by a new attempt that does **not**
  count against backoffLimit but against ``disruptionLimit``.
  ``status.stages.<stage>.disruptions`` counts these. A pod stuck terminating
  on a node that stopped reporting is force-deleted, then replaced.
* A pod whose image cannot be pulled fails the stage after
  ``image_pull_timeout_seconds``.
* A create the API server refuses (quota, admission, Pod Security) is passed
  back in as ``refused``: the pass creates nothing, records it in
  ``status.failedCreate``, the ``Succeeded`` condition and a ``FailedCreate``
  event, and the next creates wait for an exponential backoff; the run fails
  after ``create_retry_limit`` refusals in a row.
* ``suspend: true`` deletes the active pod; resuming starts a new attempt.
* ``activeDeadlineSeconds`` counts from the start or the last resume.
* Every pass of an active run re-creates whichever of its ServiceAccount, Role,
  RoleBinding, progress ConfigMap and current stage ConfigMap is missing.
* An object with one of the run's child names that the run does not own (left by a
  deleted run of the same name until the garbage collector removes it), or that is
  being deleted, is not "already there": the run creates nothing and polls until it
  is gone (``WaitingForCleanup``), then creates its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from ftoperator import builders, feedback, gangstage, naming, stageplan
from ftoperator.api import (
    FailedCreate, FineTuneRunSpec, FineTuneRunStatus, StageStatus, Termination, effective_resources, parse_status,
)
from ftoperator.builders import RunRef
from ftoperator.conditions import (
    CONDITION_TYPES, FAILED, RUNNING, SUCCEEDED, SUSPENDED, WAITING_FOR_RESOURCES, is_true, parse_timestamp,
    set_condition, timestamp,
)
from ftoperator.config import OperatorConfig
from ftoperator.gang import gang_pod_name
from ftoperator.observe import IMAGE_PULL_REASONS, ObservedChild, ObservedPod, leftover_reason
from ftoperator.stageplan import STAGE_ORDER
from ftoperator.validation import (
    IN_PROGRESS_STAGE_STATES, TERMINAL_STATES, check_recorded_digests, describe, record_digests, validate_spec,
)

CLEANUP_POLL_SECONDS = 1.0
"""How often a run waiting for leftovers of an earlier run looks again (their deletion may wake no watch)."""
LEFTOVERS_LISTED = 3
"""Leftovers named in the status message; the rest are counted."""


@dataclass(frozen=True)
class CreateObject:
    """Create a namespaced object; AlreadyExists (409) is fine only if the existing one is the run's own."""

    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]


@dataclass(frozen=True)
class DeletePod:
    """Delete a pod; NotFound (404) is fine. ``force``: grace period 0, for a pod whose node is gone."""

    name: str
    reason: str
    force: bool = False


@dataclass(frozen=True)
class RefusedCreate:
    """A create the API server refused (anything but 409): an input of the pass that follows it."""

    kind: str
    name: str
    code: int
    """HTTP status: 403 (quota, Pod Security, RBAC), 422 (invalid), 400, 5xx ..."""
    message: str


Action = CreateObject | DeletePod


@dataclass(frozen=True)
class Event:
    """A Kubernetes event on the run."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class StageTransition:
    stage: str
    from_state: str
    to_state: str


@dataclass
class Decision:
    status: FineTuneRunStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    transitions: list[StageTransition] = field(default_factory=list)
    pod_start_seconds: list[tuple[str, float]] = field(default_factory=list)
    """(stage, seconds from the pod's create request to seeing it Running)."""
    stage_durations: list[tuple[str, str, float]] = field(default_factory=list)
    """(stage, Succeeded|Failed, seconds from the stage's first pod request to its end)."""
    retries: list[tuple[str, str]] = field(default_factory=list)
    """(stage, failure|disruption) for every replacement pod."""
    requeue_after: float | None = None
    """Reconcile again after this many seconds even if nothing changes (deadlines, leftovers)."""

    def requeue(self, seconds: float) -> None:
        """Ask for a pass within ``seconds`` (the earliest of all requests wins)."""
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def backoff_seconds(count: int, *, config: OperatorConfig) -> float:
    """Delay before retry number ``count`` (1, 2, ...): base, doubled each time, capped (as the Job controller)."""
    return min(config.retry_max_seconds, config.retry_base_seconds * 2 ** max(0, count - 1))


def _seconds(later: datetime, earlier_stamp: str | None) -> float | None:
    return None if earlier_stamp is None else max(0.0, (later - parse_timestamp(earlier_stamp)).total_seconds())


class _Pass:
    """One reconcile pass; methods mutate ``self.status`` (a private copy) and append to the decision."""

    def __init__(self, *, run: RunRef, status: FineTuneRunStatus, pods: list[ObservedPod],
                 children: list[ObservedChild], now: datetime, config: OperatorConfig,
                 refused: RefusedCreate | None = None, label_counts: dict[int, int] | None = None):
        self.run = run
        self.label_counts = label_counts or {}
        """Human-feedback round -> PreferenceLabels preferring A or B (``ftoperator.feedback``)."""
        self.refused = refused
        self.may_create = refused is None
        """False while a refused create backs off, and in the pass that follows a refusal."""
        self.status = status
        self.pods = pods
        self.leftovers = [reason for reason in (leftover_reason(c, run.uid) for c in children) if reason]
        # What exists and is ours; a create of anything else is needed (once per pass).
        self.present = {(c.kind, c.name) for c in children if leftover_reason(c, run.uid) is None}
        self.now = now
        self.stamp = timestamp(now)
        self.config = config
        self.decision = Decision(status=status)

    # ------------------------------------------------------------------ small helpers

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.decision.events.append(Event(type_, reason, message))

    def condition(self, type_: str, status: Literal["True", "False", "Unknown"], reason: str,
                  message: str | None = None) -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_=type_, status=status, reason=reason, message=message,
            now=self.now, generation=self.run.generation)

    def ensure(self, obj: dict[str, Any]) -> None:
        """Create ``obj`` unless the run's own object of that kind and name was observed (or creates wait)."""
        key = (obj["kind"], obj["metadata"]["name"])
        if key not in self.present and self.may_create:
            self.present.add(key)
            self.decision.actions.append(CreateObject(obj))

    def ensure_stage_config(self, spec: FineTuneRunSpec, stage: str) -> None:
        if ("ConfigMap", naming.stage_config_map_name(self.run.name, stage)) not in self.present:
            self.ensure(builders.stage_config_map(spec, run=self.run, stage=stage, config=self.config))

    def delete_active_pods(self, reason: str, stage: str | None = None) -> list[str]:
        names = [p.name for p in self.pods if p.active and (stage is None or p.stage == stage)]
        # A gang's end may already have asked for some of them in this pass: one delete per pod.
        asked = {a.name for a in self.decision.actions if isinstance(a, DeletePod)}
        self.decision.actions.extend(DeletePod(name, reason) for name in names if name not in asked)
        return names

    # ------------------------------------------------------------------ the pass

    def reconcile(self, raw_spec: dict[str, Any] | None) -> None:
        status = self.status
        if self._invalid_spec_was_fixed():
            self.status = status = FineTuneRunStatus()
            self.decision.status = status
        if not status.conditions:
            self.initialize()
        status.observed_generation = self.run.generation

        if status.state in TERMINAL_STATES:
            self.delete_active_pods("the run is finished")
            return

        spec, errors = validate_spec(raw_spec, max_gpus_per_stage=self.config.max_gpus_per_stage,
                                     default_image=self.config.trainer_image)
        if spec is not None:
            errors += check_recorded_digests(spec, status, generation=self.run.generation)
        if errors or spec is None:
            self.fail("InvalidSpec", describe(errors))
            return

        self.plan_stages(spec)
        if spec.suspend:
            self.suspend()
            return
        if is_true(status.conditions, SUSPENDED):
            self.resume()
        if status.active_since is None:  # the deadline counts from the first reconcile, whatever happens next
            status.active_since = self.stamp
        if self.deadline_exceeded(spec):
            return
        if self.wait_for_leftovers():
            return
        if status.start_time is None:
            self.start(spec)
        if self.may_create and self.create_backing_off():
            self.may_create = False
        for obj in builders.run_infrastructure(self.run, feedback_rounds=feedback.round_count(spec)):
            self.ensure(obj)
        self.advance_stages(spec)
        record_digests(spec, self.status, generation=self.run.generation)
        self.report_failed_create()

    def advance_stages(self, spec: FineTuneRunSpec) -> None:
        while True:
            stage = self.next_stage(spec)
            if stage is None:
                self.succeed(spec)
                return
            outcome = self.advance(spec, stage)
            if outcome == "failed":
                return
            if outcome == "waiting":
                self.summarize(stage)
                return

    # ------------------------------------------------------------------ refused creates

    def create_backing_off(self) -> bool:
        """True while the creates after a refused one must wait (``status.failedCreate.retryAfter``)."""
        failed = self.status.failed_create
        if failed is None or failed.retry_after is None:
            return False
        wait = (parse_timestamp(failed.retry_after) - self.now).total_seconds()
        if wait <= 0:
            return False
        self.decision.requeue(wait)
        return True

    def report_failed_create(self) -> None:
        """Record a refusal passed in, keep reporting one that backs off, forget one once creates succeed."""
        if self.status.state in TERMINAL_STATES:
            return
        refused, failed = self.refused, self.status.failed_create
        if refused is None and failed is not None and self.may_create:
            if any(isinstance(a, CreateObject) for a in self.decision.actions):
                self.status.failed_create = None  # this status is saved only if every create succeeded
            return
        if refused is not None:
            count = (failed.count if failed is not None else 0) + 1
            limit = self.config.create_retry_limit
            what = (f"the API server refused to create {refused.kind} {refused.name} "
                    f"(HTTP {refused.code}): {refused.message}")
            if count > limit:
                self.fail("FailedCreate", f"{what}; refused {count} times in a row (--create-retry-limit {limit})")
                return
            delay = backoff_seconds(count, config=self.config)
            failed = self.status.failed_create = FailedCreate(
                kind=refused.kind, name=refused.name, code=refused.code, message=refused.message, count=count,
                retry_after=timestamp(self.now + timedelta(seconds=delay)))
            self.decision.requeue(delay)
            self.event("Warning", "FailedCreate", f"{what}; retry {count} of {limit} in {delay:.0f}s")
        if failed is None:
            return
        message = (f"the API server refused to create {failed.kind} {failed.name} (HTTP {failed.code}): "
                   f"{failed.message}; retrying at {failed.retry_after} ({failed.count} of "
                   f"{self.config.create_retry_limit} refusals in a row)")
        self.status.message = message
        self.condition(SUCCEEDED, "Unknown", "FailedCreate", message)

    def _invalid_spec_was_fixed(self) -> bool:
        # A run rejected as InvalidSpec before any pod ran gets another chance when its spec changes.
        status = self.status
        failed = next((c for c in status.conditions if c.type == FAILED), None)
        return (status.state == "Failed" and failed is not None and failed.reason == "InvalidSpec"
                and status.observed_generation != self.run.generation
                and all(getattr(status.stages, s) is None or getattr(status.stages, s).attempts == 0
                        for s in STAGE_ORDER))

    def initialize(self) -> None:
        """Every condition type exists from the first reconcile (API conventions; Kubeflow #2713)."""
        self.condition(SUCCEEDED, "Unknown", "Initializing", "the run has not started yet")
        self.condition(RUNNING, "False", "NotRunning")
        self.condition(WAITING_FOR_RESOURCES, "False", "NotWaiting")
        self.condition(SUSPENDED, "False", "NotSuspended")
        self.condition(FAILED, "False", "NotFailed")
        assert [c.type for c in self.status.conditions] == list(CONDITION_TYPES)
        self.status.state = "Pending"

    def plan_stages(self, spec: FineTuneRunSpec) -> None:
        """Mark stages that have not started as Pending or Skipped from the current spec."""
        plan = stageplan.plan(spec)
        for stage in STAGE_ORDER:
            current = getattr(self.status.stages, stage)
            if current is not None and current.state not in ("Pending", "Skipped"):
                continue  # started: its status is history now
            if getattr(spec.stages, stage) is None:
                setattr(self.status.stages, stage, None)
                continue
            current = self.status.stage(stage)
            skip = plan.skip(stage)
            if skip is None:
                current.state, current.reason, current.message = "Pending", None, None
            else:
                current.state, current.reason, current.message = "Skipped", skip.reason, skip.message

    def start(self, spec: FineTuneRunSpec) -> None:
        self.status.start_time = self.stamp

    def wait_for_leftovers(self) -> bool:
        """True (create nothing this pass) while objects with the run's child names are not its own."""
        if not self.leftovers:
            return False
        listed = "; ".join(self.leftovers[:LEFTOVERS_LISTED])
        more = len(self.leftovers) - LEFTOVERS_LISTED
        message = (f"waiting for objects with this run's child names to be deleted before creating its own: {listed}"
                   f"{f' (and {more} more)' if more > 0 else ''}. The garbage collector removes a deleted run's "
                   "objects within seconds; delete any that stays")
        if self.status.message != message:
            self.event("Normal", "WaitingForCleanup", message)
        self.status.message = message
        self.condition(SUCCEEDED, "Unknown", "WaitingForCleanup", message)
        self.decision.requeue(CLEANUP_POLL_SECONDS)
        return True

    def suspend(self) -> None:
        deleted = self.delete_active_pods("the run is suspended")
        for stage in STAGE_ORDER:
            current = getattr(self.status.stages, stage)
            if current is not None and current.state in IN_PROGRESS_STAGE_STATES:
                current.state, current.reason = "Suspended", "Suspended"
                current.message = "spec.suspend is true"
        if not is_true(self.status.conditions, SUSPENDED):
            detail = f"; deleted pod {', '.join(deleted)}" if deleted else ""
            self.event("Normal", "RunSuspended", f"spec.suspend is true{detail}")
        self.condition(SUSPENDED, "True", "Suspended", "spec.suspend is true")
        self.condition(RUNNING, "False", "Suspended")
        self.condition(WAITING_FOR_RESOURCES, "False", "Suspended")
        self.condition(SUCCEEDED, "Unknown", "Suspended", "the run is suspended")
        self.status.state = "Suspended"
        self.status.message = "suspended: set spec.suspend to false to resume from the last checkpoint"

    def resume(self) -> None:
        self.event("Normal", "RunResumed", "spec.suspend is false; the run resumes from its last checkpoint")
        self.condition(SUSPENDED, "False", "Resumed", "spec.suspend is false")
        self.status.active_since = self.stamp

    def deadline_exceeded(self, spec: FineTuneRunSpec) -> bool:
        limit = spec.active_deadline_seconds
        elapsed = _seconds(self.now, self.status.active_since)
        if limit is None or elapsed is None:
            return False
        if elapsed < limit:
            self.decision.requeue(limit - elapsed)
            return False
        self.fail("DeadlineExceeded",
                  f"the run was active for {elapsed:.0f}s, longer than spec.activeDeadlineSeconds ({limit}s)")
        return True

    def next_stage(self, spec: FineTuneRunSpec) -> str | None:
        for stage in stageplan.plan(spec).stages:
            if self.status.stage(stage).state != "Succeeded":
                return stage
        return None

    # ------------------------------------------------------------------ one stage

    def advance(self, spec: FineTuneRunSpec, stage: str) -> Literal["succeeded", "waiting", "failed"]:
        """Move ``stage`` forward from what its pods show."""
        if gangstage.stage_nodes(spec, stage) > 1:
            return gangstage.advance(self, spec, stage)
        current = self.status.stage(stage)
        mine = [p for p in self.pods if p.stage == stage]
        attempt = max([current.attempts, *(p.attempt for p in mine)])
        if any(p.rank is not None for p in mine) or current.pod == gang_pod_name(self.run.name, stage, attempt, 0):
            return self.leave_gang(spec, stage, [p for p in mine if p.rank is not None], attempt)
        for stale in mine:
            if stale.attempt < attempt and stale.active:
                self.decision.actions.append(DeletePod(stale.name, f"superseded by attempt {attempt}"))
        if spec.human_feedback is not None and stage in stageplan.ONLINE_STAGES:
            outcome = feedback.advance_online(self, spec, stage, self.label_counts)
            if outcome is not None:
                return outcome

        if attempt == 0:
            if self.start_attempt(spec, stage, 1):
                self.event("Normal", "StageStarted", f"stage {stage} started: pod {current.pod}")
            return "waiting"

        pod = next((p for p in mine if p.attempt == attempt), None)
        if attempt > current.attempts:
            # The pod was created but the status that said so was never saved (operator restart).
            current.attempts, current.pod = attempt, naming.pod_name(self.run.name, stage, attempt)
            current.start_time = current.start_time or self.stamp
            current.attempt_start_time = current.attempt_start_time or self.stamp
            if current.state in ("Pending", "Skipped"):
                current.state = "Starting"

        ended = current.last_failure is not None and current.last_failure.attempt == attempt
        if ended:  # this attempt's end is recorded: wait for the backoff, then start the next one
            return self.retry_when_due(spec, stage)

        if pod is None:
            if current.state == "Suspended":
                if self.start_attempt(spec, stage, attempt + 1):
                    self.event("Normal", "StageStarted", f"stage {stage} resumed: pod {current.pod}")
                return "waiting"
            name = naming.pod_name(self.run.name, stage, attempt)
            return self.attempt_ended(spec, stage, Termination(
                attempt=attempt, pod=name, reason="PodDeleted", time=self.stamp,
                message=f"pod {name} disappeared (deleted from outside, or its node was removed)"), disrupted=True)

        if pod.active:
            self.ensure_stage_config(spec, stage)  # a pending pod cannot start without it

        if pod.deleting and pod.phase != "Succeeded":
            # Deleted by someone (or by a suspension): whatever phase it ends in is not the trainer's
            # failure. Wait until it is gone, then start a new attempt -- unless its node is gone and
            # nothing will ever finish the deletion.
            if self.stuck_terminating(pod):
                self.decision.actions.append(DeletePod(
                    pod.name, f"still terminating {self.config.stuck_terminating_seconds:.0f}s after its grace "
                    "period on a node that stopped reporting", force=True))
                current.message = f"pod {pod.name} was stuck terminating on an unreachable node: force-deleted"
                self.event("Warning", "PodForceDeleted", f"stage {stage}: {current.message}; a new attempt replaces it")
            else:
                current.message = f"pod {pod.name} is being deleted"
            return "waiting"

        if pod.phase == "Pending":
            if pod.unschedulable:
                if current.state != "WaitingForResources":
                    self.event("Warning", "WaitingForResources", f"pod {pod.name} cannot be scheduled: {pod.unschedulable}")
                current.state, current.reason, current.message = "WaitingForResources", "Unschedulable", pod.unschedulable
                current.waiting_since = None
            elif pod.waiting_reason:
                return self.container_stuck(spec, stage, pod)
            else:
                current.state, current.reason = "Starting", "PodPending"
                current.message = f"pod {pod.name} is starting"
                current.waiting_since = None
            return "waiting"

        current.waiting_since = None
        if pod.phase == "Running":
            return self.stage_running(stage, "PodRunning", f"pod {pod.name} is running")

        if pod.phase == "Succeeded":
            return self.stage_succeeded(spec, stage, "PodSucceeded", "")

        if pod.phase == "Failed":
            return self.attempt_ended(spec, stage, Termination(
                attempt=pod.attempt, pod=pod.name, reason=pod.reason or "Error", exit_code=pod.exit_code,
                message=pod.message, permanent=pod.permanent, time=self.stamp),
                disrupted=pod.disrupted, memory_limit=pod.memory_limit)
        return "waiting"  # Unknown: the node is not reporting; wait for it or for the pod to vanish

    def stage_running(self, stage: str, reason: str, message: str) -> Literal["waiting"]:
        """The attempt's pod (or whole gang) runs; the first time, record how long it took to start."""
        current = self.status.stage(stage)
        current.state, current.reason, current.message = "Running", reason, message
        if current.running_time is None:
            current.running_time = self.stamp
            latency = _seconds(self.now, current.attempt_start_time)
            if latency is not None:
                self.decision.pod_start_seconds.append((stage, latency))
        return "waiting"

    def stage_succeeded(self, spec: FineTuneRunSpec, stage: str, reason: str, detail: str) -> Literal["succeeded"]:
        """The stage's final model is written: point the status at it and record the stage's duration."""
        current = self.status.stage(stage)
        current.state, current.reason = "Succeeded", reason
        current.completion_time = self.stamp
        current.retry_after = None
        current.artifact = builders.stage_artifact_uri(spec, self.run, stage)
        current.message = f"{detail + '; ' if detail else ''}final model at {current.artifact}"
        duration = _seconds(self.now, current.start_time)
        if duration is not None:
            self.decision.stage_durations.append((stage, "Succeeded", duration))
        self.event("Normal", "StageSucceeded", f"stage {stage} succeeded; final model at {current.artifact}")
        return "succeeded"

    def leave_gang(self, spec: FineTuneRunSpec, stage: str, members: list[ObservedPod],
                   attempt: int) -> Literal["waiting"]:
        """``resources.nodes`` went from N > 1 back to 1 while the stage ran as a gang: stop the gang (its
        pods checkpoint on SIGTERM), and once every member is gone start one pod that resumes from the
        checkpoint. A change the user asked for: counted neither as a failure nor as a disruption."""
        current = self.status.stage(stage)
        if members:
            for member in members:
                if member.active and not member.deleting:
                    self.decision.actions.append(DeletePod(member.name, "the stage now runs as one pod "
                                                           "(resources.nodes is 1)"))
            current.message = (f"stopping the {len(members)} pods of attempt {attempt}: the stage now runs as one "
                               "pod and resumes from the latest checkpoint")
            return "waiting"
        if self.start_attempt(spec, stage, attempt + 1):
            self.event("Normal", "StageStarted", f"stage {stage} attempt {attempt + 1}: one pod {current.pod} "
                       "(resources.nodes changed to 1) resumes from the latest checkpoint")
        return "waiting"

    def stuck_terminating(self, pod: ObservedPod) -> bool:
        """Deleted, its grace period long over, and its node not reporting: no kubelet will finish it."""
        if pod.deletion_time is None or pod.ready is True:
            return False
        overdue = (self.now - pod.deletion_time).total_seconds() - self.config.stuck_terminating_seconds
        if overdue < 0:
            self.decision.requeue(-overdue)
            return False
        return True

    def container_stuck(self, spec: FineTuneRunSpec, stage: str, pod: ObservedPod) -> Literal["waiting", "failed"]:
        """The container cannot start (image pull, container config): say so, and fail after a while."""
        current = self.status.stage(stage)
        pulling = pod.waiting_reason in IMAGE_PULL_REASONS
        what = f"cannot pull image {pod.image}" if pulling else f"cannot create the trainer container of pod {pod.name}"
        message = f"{what}: {pod.waiting}"
        if current.reason != pod.waiting_reason:
            self.event("Warning", "ImagePullFailed" if pulling else "ContainerCreateFailed", f"stage {stage}: {message}")
        current.state, current.reason, current.message = "Starting", pod.waiting_reason, message
        current.waiting_since = current.waiting_since or self.stamp
        waited = _seconds(self.now, current.waiting_since) or 0.0
        limit = self.config.image_pull_timeout_seconds
        if waited < limit:
            self.decision.requeue(limit - waited)
            return "waiting"
        reason = "ImagePullFailed" if pulling else "ContainerCreateFailed"
        return self.stage_failed(stage, reason, f"{message} (for {waited:.0f}s; the operator gives up after "
                                 f"{limit:.0f}s, --image-pull-timeout-seconds)")

    def describe_end(self, spec: FineTuneRunSpec, stage: str, end: Termination, memory_limit: str | None) -> str:
        """One line: the reason, exit code and message together; OOMKilled says what to change."""
        head = end.reason + (f" (exit code {end.exit_code})" if end.exit_code is not None else "")
        if end.reason == "OOMKilled":
            limit = memory_limit or effective_resources(spec, stage).memory or "none set"
            head = (f"OOMKilled: pod {end.pod} ran out of memory (limit {limit}, exit code {end.exit_code}); raise "
                    f"spec.resources.memory or spec.stages.{stage}.resources.memory (the next attempt uses the new "
                    "value), or lower batchSize or maxSeqLengthTokens")
            return f"{head}. Last log lines: {end.message}" if end.message else head
        if end.permanent:
            head = f"permanent error, not retried: {head}"
        return f"{head}: {end.message}" if end.message else head

    def attempt_ended(self, spec: FineTuneRunSpec, stage: str, end: Termination, *, disrupted: bool,
                      memory_limit: str | None = None) -> Literal["waiting", "failed"]:
        """Count a failed or disrupted attempt once, then fail the stage or back off before the next attempt."""
        current = self.status.stage(stage)
        current.last_failure = end
        detail = self.describe_end(spec, stage, end, memory_limit)
        if disrupted:
            current.disruptions += 1
            if current.disruptions > spec.disruption_limit:
                return self.stage_failed(stage, "DisruptionLimitExceeded", (
                    f"stage {stage} was disrupted {current.disruptions} times (spec.disruptionLimit "
                    f"{spec.disruption_limit}); last: {detail}"))
            self.decision.retries.append((stage, "disruption"))
            current.retry_after = self.stamp
            current.state, current.reason = "BackingOff", "Disrupted"
            current.message = f"{detail}; a new attempt starts from the last checkpoint"
            self.event("Warning", "StageRetrying", f"pod {end.pod} was removed by the cluster ({detail}); a new "
                       f"attempt starts from the last checkpoint (disruption {current.disruptions} of "
                       f"{spec.disruption_limit} allowed; not counted against backoffLimit)")
            return self.retry_when_due(spec, stage, announce=False)
        current.failures += 1
        if end.permanent:
            return self.stage_failed(stage, "PermanentError", f"stage {stage} failed: {detail}")
        if current.failures > spec.backoff_limit:
            return self.stage_failed(stage, "BackoffLimitExceeded", (
                f"stage {stage} failed {current.failures} times (spec.backoffLimit {spec.backoff_limit}); "
                f"last: {detail}"))
        delay = backoff_seconds(current.failures, config=self.config)
        self.decision.retries.append((stage, "failure"))
        current.retry_after = timestamp(self.now + timedelta(seconds=delay))
        current.state, current.reason = "BackingOff", "OOMKilled" if end.reason == "OOMKilled" else "PodFailed"
        current.message = f"{detail}; attempt {end.attempt + 1} starts at {current.retry_after}"
        self.event("Warning", "StageRetrying",
                   f"pod {end.pod} failed ({current.failures} of {spec.backoff_limit + 1} allowed failures): "
                   f"{detail}; attempt {end.attempt + 1} starts in {delay:.0f}s from the last checkpoint")
        return self.retry_when_due(spec, stage)

    def retry_when_due(self, spec: FineTuneRunSpec, stage: str, *, announce: bool = True) -> Literal["waiting"]:
        """Start the next attempt once ``retryAfter`` has passed (and creates are allowed).

        ``announce``: post StageStarted (not when StageRetrying said so in the same pass).
        """
        current = self.status.stage(stage)
        due = parse_timestamp(current.retry_after) if current.retry_after else self.now
        wait = (due - self.now).total_seconds()
        if wait > 0:
            self.decision.requeue(wait)
            return "waiting"
        previous = current.last_failure
        if self.start_attempt(spec, stage, current.attempts + 1):
            current.retry_after = None
            if announce:
                    self.event("Normal", "StageStarted", f"stage {stage} attempt {current.attempts}: pod {current.pod} "
                           f"(after {previous.reason if previous else 'a failure'} of pod "
                           f"{previous.pod if previous else '?'})")
        return "waiting"

    def stage_failed(self, stage: str, reason: str, message: str) -> Literal["failed"]:
        current = self.status.stage(stage)
        current.state, current.reason, current.message = "Failed", reason, message
        current.completion_time = self.stamp
        current.retry_after = None
        duration = _seconds(self.now, current.start_time)
        if duration is not None:
            self.decision.stage_durations.append((stage, "Failed", duration))
        self.event("Warning", "StageFailed", message)
        self.fail("StageFailed", message, stage=stage)
        return "failed"

    def start_attempt(self, spec: FineTuneRunSpec, stage: str, attempt: int) -> bool:
        """Create the pod of ``attempt``; False (nothing changed) while creates must wait."""
        if not self.may_create:
            return False
        current = self.status.stage(stage)
        current.start_time = current.start_time or self.stamp
        current.attempts = attempt
        current.pod = naming.pod_name(self.run.name, stage, attempt)
        current.state, current.reason = "Starting", "PodCreated"
        current.message = f"pod {current.pod} created"
        current.attempt_start_time = self.stamp
        current.running_time = None
        current.waiting_since = None
        if gangstage.stage_nodes(spec, stage) > 1:
            gangstage.start_attempt(self, spec, stage, attempt)
            return True
        self.ensure_stage_config(spec, stage)
        pod = builders.stage_pod(spec, run=self.run, stage=stage, attempt=attempt, config=self.config)
        self.decision.actions.append(CreateObject(feedback.with_round_env(pod, self.status.feedback_rounds, stage)))
        return True

    # ------------------------------------------------------------------ the run's summary

    def summarize(self, stage: str) -> None:
        current = self.status.stage(stage)
        self.status.current_stage = stage
        self.status.message = f"{stage}: {current.message}" if current.message else stage
        running = current.state == "Running"
        waiting = current.state == "WaitingForResources"
        self.status.state = ("Running" if running else "WaitingForResources" if waiting
                             else "AwaitingFeedback" if current.state == "AwaitingFeedback" else "Pending")
        if current.state == "BackingOff" and current.retry_after:
            self.status.message = f"{stage}: {current.message}"
        self.condition(RUNNING, "True" if running else "False", "StageRunning" if running else "NotRunning",
                       f"stage {stage}: pod {current.pod}" if running else None)
        self.condition(WAITING_FOR_RESOURCES, "True" if waiting else "False",
                       "Unschedulable" if waiting else "NotWaiting", current.message if waiting else None)
        self.condition(SUCCEEDED, "Unknown", f"Stage{current.state}", f"stage {stage} is {current.state}")

    def succeed(self, spec: FineTuneRunSpec) -> None:
        last = stageplan.plan(spec).last
        artifact = self.status.stage(last).artifact if last else None
        self.status.state = "Succeeded"
        self.status.current_stage = last
        self.status.completion_time = self.stamp
        self.status.message = f"all stages succeeded; final model at {artifact}"
        self.condition(SUCCEEDED, "True", "AllStagesSucceeded", self.status.message)
        self.condition(RUNNING, "False", "Completed")
        self.condition(WAITING_FOR_RESOURCES, "False", "Completed")
        self.event("Normal", "RunSucceeded", self.status.message)

    def fail(self, reason: str, message: str, *, stage: str | None = None) -> None:
        self.delete_active_pods(f"the run failed: {reason}")
        for name in STAGE_ORDER:
            current = getattr(self.status.stages, name)
            if current is not None and current.state in IN_PROGRESS_STAGE_STATES:
                current.state, current.reason, current.message = "Failed", reason, message
                current.completion_time = self.stamp
                stage = stage or name
        self.status.state = "Failed"
        self.status.current_stage = stage or self.status.current_stage
        self.status.completion_time = self.stamp
        self.status.message = message
        self.condition(FAILED, "True", reason, message)
        self.condition(SUCCEEDED, "False", reason, message)
        self.condition(RUNNING, "False", reason)
        self.condition(WAITING_FOR_RESOURCES, "False", reason)
        self.event("Warning", "RunFailed", message)


def _stage_transitions(before: FineTuneRunStatus, after: FineTuneRunStatus) -> list[StageTransition]:
    transitions = []
    for stage in STAGE_ORDER:
        old: StageStatus | None = getattr(before.stages, stage)
        new: StageStatus | None = getattr(after.stages, stage)
        old_state = old.state if old is not None else "Pending"
        if new is not None and new.state != old_state:
            transitions.append(StageTransition(stage, old_state, new.state))
    return transitions


def decide(
    *,
    run: RunRef,
    spec: dict[str, Any] | None,
    status: dict[str, Any] | None,
    pods: list[ObservedPod],
    children: list[ObservedChild],
    now: datetime,
    config: OperatorConfig,
    refused: RefusedCreate | None = None,
    label_counts: dict[int, int] | None = None,
) -> Decision:
    """The next step for one run. ``spec`` and ``status`` are the raw object's fields.

    ``pods`` are the run's own stage pods (controlled by ``run.uid``). ``children`` is every
    object observed under one of the run's child names -- pods, ConfigMaps, the ServiceAccount,
    Role and RoleBinding -- whoever owns it: what is the run's own is not created again, what is
    not holds the run in ``WaitingForCleanup``. ``refused``: the API server refused a create of the
    decision made from the same inputs; this decision creates nothing and records the refusal.
    ``label_counts``: for a run with spec.humanFeedback, the PreferenceLabels preferring A or B per round.
    """
    before = parse_status(status)
    work = _Pass(run=run, status=before.model_copy(deep=True), pods=pods, children=children, now=now,
                 config=config, refused=refused, label_counts=label_counts)
    work.reconcile(spec)
    work.decision.transitions = _stage_transitions(before, work.status)
    return work.decision
