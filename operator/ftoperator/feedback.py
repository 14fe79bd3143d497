"""Human-feedback rounds (``spec.humanFeedback``): the decisions, pure like the rest of ``decide``.

A round goes through these states (``status.feedbackRounds[]``, docs/console.md):

1. The online stage's pod (ppo or grpo) checkpoints at a round boundary, writes the round's candidate
   pairs into the ``<run>-feedback-<round>`` ConfigMap and exits with ``FEEDBACK_ROUND_EXIT_CODE`` and a
   termination message ``FeedbackRound: round <N> ...``. The pass that sees it records the round as
   ``AwaitingLabels`` (the run's state is ``AwaitingFeedback``); nothing about it counts as a failure.
2. Each pass counts the round's PreferenceLabels that prefer A or B (``label_counts``, listed by the
   reconciler). With ``labelsNeeded`` of them -- or at the timeout with ``onTimeout: Continue`` and
   at least one -- the round is ``Retraining``: a new attempt of the reward stage, with
   ``FEEDBACK_ROUND_ENV`` set, continues from the reward model on the original and the human
   preferences and reports its accuracy on the held-out human labels. At the timeout with
   ``onTimeout: Fail`` the run fails; with ``Continue`` and no label the round is ``TimedOut``.
3. Once the reward stage has succeeded again (and its metrics carry the round), or after a timeout
   without labels, the round is ``Done`` and the online stage starts a new attempt, which resumes
   from the checkpoint of the boundary with the new reward model.

Everything a pass needs is in the status, the observed pods and the label counts, so an operator
restart in the middle of a round loses nothing; a round is keyed by the online stage's attempt that
opened it, so deciding twice never opens it twice.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from ftoperator import builders, naming
from ftoperator.api import FeedbackRoundStatus, FineTuneRunSpec
from ftoperator.conditions import parse_timestamp
from ftoperator.observe import ObservedPod
from ftoperator.stageplan import ONLINE_STAGES
from trainer.config import FEEDBACK_ROUND_ENV, FEEDBACK_ROUND_EXIT_CODE, FEEDBACK_ROUND_PREFIX

if TYPE_CHECKING:  # decide imports this module
    from ftoperator.decide import _Pass

AWAITING_FEEDBACK = "AwaitingFeedback"
"""Condition type set on runs with spec.humanFeedback: True while a round waits for labels."""
LABEL_POLL_SECONDS = 5.0
"""How often a run waiting for labels counts them again (creating a label wakes no watch of the operator)."""
METRICS_WAIT_SECONDS = 30.0
"""How long after the retraining pod succeeded the round waits for its accuracy to reach the status
(the progress ConfigMap is copied separately) before it continues without it."""
ROUND_MESSAGE = re.compile(r"round (\d+)\b(?:.*?\bstep (\d+))?(?:.*?\b(\d+) candidate)?")

Outcome = Literal["waiting", "failed"]


def round_count(spec: FineTuneRunSpec) -> int:
    """Rounds the run's online stage opens (0 without spec.humanFeedback or an online stage)."""
    return builders.feedback_rounds(spec)


def opened_round(pod: ObservedPod) -> tuple[int, int | None, int | None] | None:
    """(round, step, candidates) when ``pod`` ended at a round boundary, else None.

    Both the exit code and the message prefix are needed when the exit code is the trainer's own;
    ``accelerate launch`` exits 1 whatever its processes returned, so the prefix alone also counts.
    """
    if pod.phase != "Failed" or pod.deleting or pod.disrupted or not pod.message:
        return None
    if not pod.message.startswith(FEEDBACK_ROUND_PREFIX) or pod.exit_code not in (FEEDBACK_ROUND_EXIT_CODE, 1):
        return None
    match = ROUND_MESSAGE.search(pod.message)
    if match is None:
        return None
    step, candidates = match.group(2), match.group(3)
    return int(match.group(1)), int(step) if step else None, int(candidates) if candidates else None


def with_round_env(pod: dict[str, Any], status_rounds: list[FeedbackRoundStatus], stage: str) -> dict[str, Any]:
    """The reward stage's pod gets ``FEEDBACK_ROUND_ENV`` while a round retrains it (its retries too)."""
    retraining = next((r for r in status_rounds if r.state == "Retraining"), None)
    if stage != "reward" or retraining is None:
        return pod
    for container in pod["spec"]["containers"]:
        if container["name"] == naming.TRAINER_CONTAINER:
            container.setdefault("env", []).append({"name": FEEDBACK_ROUND_ENV, "value": str(retraining.round)})
    return pod


def _latest_pod(work: "_Pass", stage: str) -> tuple[int, ObservedPod | None]:
    current = work.status.stage(stage)
    mine = [p for p in work.pods if p.stage == stage]
    attempt = max([current.attempts, *(p.attempt for p in mine)])
    return attempt, next((p for p in mine if p.attempt == attempt), None)


def advance_online(work: "_Pass", spec: FineTuneRunSpec, stage: str, label_counts: dict[int, int]) -> Outcome | None:
    """Move the round of the online ``stage`` forward; None when no round concerns its latest attempt
    (``decide`` then handles the stage as usual)."""
    attempt, pod = _latest_pod(work, stage)
    rounds = work.status.feedback_rounds
    record = next((r for r in rounds if r.stage == stage and r.attempt == attempt), None)
    if record is None:
        for earlier in rounds:  # resumed by a pod whose status was never saved (operator restart)
            if earlier.stage == stage and earlier.attempt < attempt and earlier.completion_time is None \
                    and earlier.state in ("Done", "TimedOut"):
                earlier.completion_time = work.stamp
        opened = opened_round(pod) if pod is not None else None
        if opened is None:
            return None
        record = _open(work, spec, stage, attempt, opened)
    if record.state == "AwaitingLabels":
        return _await_labels(work, spec, stage, record, label_counts.get(record.round, 0))
    if record.state == "Retraining":
        return _retraining(work, spec, stage, record)
    if record.state in ("Done", "TimedOut") and record.completion_time is None:
        return _resume(work, spec, stage, record)
    return None


def _open(work: "_Pass", spec: FineTuneRunSpec, stage: str, attempt: int,
          opened: tuple[int, int | None, int | None]) -> FeedbackRoundStatus:
    number, step, candidates = opened
    record = FeedbackRoundStatus(round=number, stage=stage, step=step, attempt=attempt, candidates=candidates,
                                 needed=spec.human_feedback.labels_needed, since=work.stamp)
    work.status.feedback_rounds = [r for r in work.status.feedback_rounds if r.round != number] + [record]
    where = naming.feedback_config_map_name(work.run.name, number)
    work.event("Normal", "FeedbackRoundOpened",
               f"stage {stage} stopped after step {step}: round {number} has {candidates} candidate pairs in "
               f"ConfigMap {where}; label them in the console ({record.needed} labels needed)")
    return record


def _await_labels(work: "_Pass", spec: FineTuneRunSpec, stage: str, record: FeedbackRoundStatus,
                  labels: int) -> Outcome:
    feedback = spec.human_feedback
    record.labels = labels
    record.needed = feedback.labels_needed  # the user may lower it while the round waits
    current = work.status.stage(stage)
    waited = (work.now - parse_timestamp(record.since)).total_seconds()
    if labels >= record.needed:
        return _start_retraining(work, spec, stage, record, why=f"{labels}/{record.needed} labels")
    if waited >= feedback.timeout_seconds:
        what = (f"round {record.round} got {labels}/{record.needed} labels in spec.humanFeedback.timeoutSeconds "
                f"({feedback.timeout_seconds}s)")
        if feedback.on_timeout == "Fail":
            record.state = "Failed"
            work.stage_failed(stage, "FeedbackTimeout", f"{what}; spec.humanFeedback.onTimeout is Fail")
            return "failed"
        if labels > 0:
            return _start_retraining(work, spec, stage, record, why=f"{what}; onTimeout Continue")
        record.state = "TimedOut"
        work.event("Warning", "FeedbackRoundTimedOut", f"{what}; onTimeout Continue: {stage} resumes with the "
                   "unchanged reward model")
        return _resume(work, spec, stage, record)
    message = f"round {record.round}: {labels}/{record.needed} labels"
    current.state, current.reason, current.message = AWAITING_FEEDBACK, "LabelsNeeded", message
    work.condition(AWAITING_FEEDBACK, "True", "LabelsNeeded", message)
    work.decision.requeue(min(LABEL_POLL_SECONDS, feedback.timeout_seconds - waited))
    return "waiting"


def _start_retraining(work: "_Pass", spec: FineTuneRunSpec, stage: str, record: FeedbackRoundStatus, *,
                      why: str) -> Outcome:
    reward = work.status.stage("reward")
    record.state = "Retraining"  # before start_attempt: the pod gets the round's environment variable
    if not work.start_attempt(spec, "reward", reward.attempts + 1):
        record.state = "AwaitingLabels"  # creates must wait (a refused create backs off); try again then
        return "waiting"
    record.reward_attempt = reward.attempts
    message = f"round {record.round}: retraining the reward model ({why})"
    current = work.status.stage(stage)
    current.state, current.reason, current.message = AWAITING_FEEDBACK, "RetrainingRewardModel", message
    work.condition(AWAITING_FEEDBACK, "False", "RetrainingRewardModel", message)
    work.event("Normal", "FeedbackRoundRetraining", f"{message}: pod {reward.pod}")
    return "waiting"


def _retraining(work: "_Pass", spec: FineTuneRunSpec, stage: str, record: FeedbackRoundStatus) -> Outcome:
    # decide reaches the online stage only once the reward stage has succeeded again.
    reward = work.status.stage("reward")
    metrics = reward.metrics
    if metrics.get("feedback_round") == record.round:
        record.held_out_accuracy_before = metrics.get("human_accuracy_before")
        record.held_out_accuracy = metrics.get("human_accuracy_after")
    else:
        waited = (work.now - parse_timestamp(reward.completion_time or work.stamp)).total_seconds()
        if waited < METRICS_WAIT_SECONDS:
            work.decision.requeue(1.0)
            return "waiting"
    record.state = "Done"
    return _resume(work, spec, stage, record)


def _resume(work: "_Pass", spec: FineTuneRunSpec, stage: str, record: FeedbackRoundStatus) -> Outcome:
    current = work.status.stage(stage)
    if not work.start_attempt(spec, stage, current.attempts + 1):
        return "waiting"
    record.completion_time = work.stamp
    accuracy = ""
    if record.held_out_accuracy is not None:
        before = record.held_out_accuracy_before
        accuracy = (f"; reward model accuracy on held-out human labels "
                    f"{'?' if before is None else f'{before:.2f}'} -> {record.held_out_accuracy:.2f}")
    work.condition(AWAITING_FEEDBACK, "False", "RoundClosed", f"round {record.round} {record.state.lower()}")
    work.event("Normal", "FeedbackRoundClosed", f"round {record.round} {record.state.lower()}{accuracy}; stage "
               f"{stage} resumes from its checkpoint: pod {current.pod}")
    return "waiting"

