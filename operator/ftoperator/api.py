"""The FineTuneRun API: spec and status as pydantic models.

The stage specs *are* the trainer's stage configs (``trainer.config``) plus two
operator fields, ``enabled`` and ``resources``; ``crdgen`` turns these models
into the CRD's OpenAPI schema, so what ``kubectl explain`` shows, what the
API server validates and what the trainer reads cannot drift apart.

Spec models forbid unknown fields (a typo is an error naming the field);
status models ignore unknown fields so that an older operator can read a
status written by a newer one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from ftoperator.podapi import (  # noqa: F401  (label_value_problem, qualified_name_problem: re-exported)
    PodTemplate, Quantity, Toleration, label_value_problem, qualified_name_problem,
)
from trainer.config import (
    HUB_SCHEME, HUB_SOURCE_PATTERN, ApiModel, DPOConfig, GRPOConfig, HumanFeedbackConfig, PPOConfig, RewardConfig,
    SFTConfig, parse_hub_source,
)

# A PVC claim name is a DNS-1123 subdomain; the path after it is relative to the claim's root.
CLAIM_PATTERN = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
MODEL_SOURCE_PATTERN = rf"^(pvc://{CLAIM_PATTERN}(/.*)?|{HUB_SOURCE_PATTERN}|/.*)$"

DATA_URI_PATTERN = rf"^(pvc://{CLAIM_PATTERN}/.+|/.+)$"


# --------------------------------------------------------------------------- spec


class ModelSpec(ApiModel):
    """The base model the first enabled stage starts from."""

    source: str = Field(json_schema_extra={"pattern": MODEL_SOURCE_PATTERN})
    """pvc://<claim>/<path> (the claim is mounted read-only), hf://[<org>/]<name>[@<revision>] (downloaded by the trainer; needs network; revision is a branch, tag or commit), or an absolute path inside the trainer image."""

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, source: str) -> str:
        if source.startswith(HUB_SCHEME):
            parse_hub_source(source)  # the trainer parses it the same way
        elif not re.fullmatch(MODEL_SOURCE_PATTERN, source):
            raise ValueError(f"{source!r} is not pvc://<claim>/<path>, hf://[<org>/]<name>[@<revision>] "
                             "or an absolute path in the image")
        return source


class DataSpec(ApiModel):
    """Datasets, each pvc://<claim>/<file.jsonl> (claim mounted read-only) or an absolute path in the image."""

    sft: str | None = Field(None, pattern=DATA_URI_PATTERN)
    """Supervised data: {"prompt", "completion"} or {"messages"} rows. Required when stages.sft is enabled."""
    preferences: str | None = Field(None, pattern=DATA_URI_PATTERN)
    """Preference pairs: {"prompt", "chosen", "rejected"} rows. Required to train a reward model, and when stages.dpo is enabled."""
    prompts: str | None = Field(None, pattern=DATA_URI_PATTERN)
    """Prompts for PPO, GRPO and RLOO: {"prompt"} rows; other fields of a row (e.g. "answer") go to the reward functions. Required when stages.ppo or stages.grpo is enabled."""


class ResourcesSpec(ApiModel):
    """Compute resources of a stage pod; requests equal limits. Unset fields are not requested."""

    gpus: int | None = Field(None, ge=0)
    """Accelerators per pod, of the resource spec.podTemplate.acceleratorResource (default nvidia.com/gpu). With more than one, the trainer runs under accelerate, one process per GPU."""
    cpu: Quantity | None = None
    """CPU cores, a Kubernetes quantity such as 4 or 500m."""
    memory: Quantity | None = None
    """Memory, a Kubernetes quantity such as 64Gi."""
    nodes: int | None = Field(None, ge=1, le=256)
    """Pods of the stage (default 1), each with these gpus, cpu and memory; above 1 the pods form one torch.distributed world of nodes x max(gpus, 1) processes, launched by torchrun, created and replaced together (spec.distributed)."""


class _StageControls(ApiModel):
    enabled: bool = True
    """Run this stage. A disabled stage is skipped and the next stage starts from the previous model."""
    resources: ResourcesSpec | None = None
    """Per-stage override of spec.resources, field by field."""


class SFTStageSpec(SFTConfig, _StageControls):
    """Supervised fine-tuning stage: the trainer's SFT settings plus enabled and resources."""


class RewardStageSpec(RewardConfig, _StageControls):
    """Reward stage: trains a reward model when spec.data.preferences is set; its functions score PPO and GRPO/RLOO either way."""


class PPOStageSpec(PPOConfig, _StageControls):
    """PPO stage: the trainer's PPO settings plus enabled and resources."""


class GRPOStageSpec(GRPOConfig, _StageControls):
    """GRPO or RLOO stage (algorithm: grpo or rloo): the trainer's GRPO settings plus enabled and resources."""


class DPOStageSpec(DPOConfig, _StageControls):
    """DPO stage: the trainer's DPO settings plus enabled and resources. Trains on spec.data.preferences; no reward stage."""


class StagesSpec(ApiModel):
    """The stages to run, in the order sft, reward, then one policy-optimisation stage: ppo, grpo or dpo.

    A stage runs when it is listed here and not disabled; at most one of ppo, grpo and dpo may run. RLOO is
    stages.grpo with algorithm: rloo (the same machinery with a leave-one-out baseline).
    """

    sft: SFTStageSpec | None = None
    """Supervised fine-tuning of the base model."""
    reward: RewardStageSpec | None = None
    """Reward model training and/or heuristic and verifiable reward functions, for ppo or grpo (not dpo)."""
    ppo: PPOStageSpec | None = None
    """PPO against the reward, with a KL penalty to the model it starts from and a value model."""
    grpo: GRPOStageSpec | None = None
    """GRPO (algorithm: grpo) or RLOO (algorithm: rloo) against the reward: groupSize responses per prompt, advantages relative to the group, no value model."""
    dpo: DPOStageSpec | None = None
    """DPO on spec.data.preferences: no reward model, the model it starts from is the reference."""


class ArtifactsSpec(ApiModel):
    """Where stage outputs go: <pvc>/<namespace>/<run>/<stage>/ (checkpoints and final/)."""

    pvc: str = Field(pattern=f"^{CLAIM_PATTERN}$")
    """Name of a ReadWriteOnce (or ReadWriteMany) PVC in the run's namespace, mounted read-write at /artifacts."""


class DistributedSpec(ApiModel):
    """How the pods of a stage with resources.nodes above 1 meet and fail together (docs/multinode.md)."""

    placement_timeout_seconds: int = Field(600, ge=1)
    """Some but not all pods of an attempt placed for this long: all are deleted (so a partial gang holds no GPUs) and the next attempt asks for all of them again; not counted against backoffLimit."""
    rendezvous_timeout_seconds: int = Field(900, ge=1)
    """How long a pod waits to reach rank 0 (and rank 0 for the others) before the attempt fails naming the address and port; pods of one attempt may start minutes apart."""
    collective_timeout_seconds: int = Field(1800, ge=1)
    """One collective operation (all-reduce, broadcast) hanging this long ends the attempt (gloo timeout, NCCL watchdog)."""
    progress_timeout_seconds: int | None = Field(None, ge=1)
    """A stage pod whose trainer reports no new step for this long is ended as hung (a stuck collective, a deadlock); unset: no watchdog beyond collectiveTimeoutSeconds. Applies to single-pod stages too."""
    port: int = Field(29500, ge=1024, le=65535)
    """TCP port of the rendezvous on rank 0."""
    gang_scheduler: Literal["none", "kueue", "coscheduling", "volcano"] = "none"
    """Makes a gang scheduler treat each attempt's pods as one group: kueue (pod group labels; set the queue label in podTemplate.labels), coscheduling or volcano (the operator creates the attempt's PodGroup with minMember = nodes; set podTemplate.schedulerName; the PodGroup CRD must be installed). none: the operator's own gang rules only."""


class FineTuneRunSpec(ApiModel):
    """Desired state of a FineTuneRun: a base model taken through SFT, reward modelling and PPO, GRPO, RLOO or DPO, one pod per stage (resources.nodes pods where set)."""

    model: ModelSpec
    """The base model."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Datasets used by the stages."""
    stages: StagesSpec
    """The stages to run and their settings (the trainer's configuration for each): sft, reward, then one policy-optimisation stage, ppo, grpo (GRPO, or RLOO with algorithm: rloo) or dpo. A stage runs when it is listed and not disabled."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Resources of every stage pod, unless the stage overrides them."""
    artifacts: ArtifactsSpec
    """Where outputs are written."""
    human_feedback: HumanFeedbackConfig | None = None
    """Human-feedback rounds during the online stage (ppo or grpo, with a reward stage that trains a reward model): candidates to label in the console, the reward model retrained on the labels, the stage continued with it. docs/console.md."""
    image: str | None = None
    """Trainer container image; default: the operator's --trainer-image."""
    backoff_limit: int = Field(2, ge=0, le=100)
    """Failed attempts retried per stage before the run fails, with exponential backoff between attempts. Disruptions and suspension do not count; permanent errors (invalid config or data, missing model) are never retried."""
    disruption_limit: int = Field(10, ge=0, le=1000)
    """Pods removed by the cluster (eviction, preemption, node loss, deletion from outside) replaced per stage before the run fails. Separate from backoffLimit."""
    suspend: bool = False
    """true deletes the running stage pod and keeps the run Suspended; false resumes it from its last checkpoint."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Seconds the run may be active (since start or last resume); then its pod is deleted and the run fails with DeadlineExceeded."""
    pod_template: PodTemplate = Field(default_factory=PodTemplate)
    """Settings of every stage pod: labels, annotations, imagePullSecrets, env, envFrom, scheduling (nodeSelector, tolerations, affinity, priorityClassName, schedulerName, runtimeClassName), volumes, the accelerator resource, terminationGracePeriodSeconds."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Deprecated: use podTemplate.nodeSelector. Still applied, merged with it (a key in both must have the same value)."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Deprecated: use podTemplate.tolerations. Still applied, after podTemplate.tolerations."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Timeouts, port and gang scheduler of stages that run as several pods (resources.nodes above 1)."""

    @field_validator("node_selector")
    @classmethod
    def _labels_as_the_pod_api_checks(cls, selector: dict[str, str]) -> dict[str, str]:
        for key, value in selector.items():
            problem = qualified_name_problem(key) or label_value_problem(value)
            if problem:
                raise ValueError(f"{problem} (in {key}: {value})")
        return selector

    def merged_node_selector(self) -> dict[str, str]:
        """podTemplate.nodeSelector plus the deprecated top-level nodeSelector (validation rejects conflicts)."""
        return {**self.node_selector, **self.pod_template.node_selector}

    def merged_tolerations(self) -> list[Toleration]:
        """podTemplate.tolerations, then the deprecated top-level tolerations."""
        return [*self.pod_template.tolerations, *self.tolerations]


# --------------------------------------------------------------------------- status


class StatusModel(ApiModel):
    model_config = ConfigDict(extra="ignore")


RunState = Literal["Pending", "Running", "WaitingForResources", "AwaitingFeedback", "Suspended", "Succeeded", "Failed"]
StageState = Literal[
    "Pending", "Skipped", "Starting", "WaitingForResources", "Running", "BackingOff", "AwaitingFeedback", "Suspended",
    "Succeeded", "Failed",
]
FeedbackRoundState = Literal["AwaitingLabels", "Retraining", "Done", "TimedOut", "Failed"]


class Condition(StatusModel):
    """A condition in the metav1.Condition shape."""

    type: str
    """Running, WaitingForResources, Suspended, Failed or Succeeded (the summary)."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str
    """CamelCase reason of the last transition or update."""
    message: str | None = None
    """Human-readable details (left out when there are none)."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class Termination(StatusModel):
    """How a failed attempt ended: the container's reason, exit code and termination message together."""

    attempt: int
    """Attempt number of the pod."""
    pod: str
    """Name of the pod."""
    reason: str
    """The container's (or pod's) reason: OOMKilled, Error, ContainerCannotRun, DeadlineExceeded, Evicted ..."""
    exit_code: int | None = None
    """Exit code of the trainer container; 3 means an error the trainer knows retrying cannot fix."""
    message: str | None = None
    """The termination message the trainer wrote (or the tail of its log when it could not), truncated."""
    permanent: bool = False
    """The trainer said retrying cannot help: the stage failed without using its retries."""
    time: str | None = None
    """When the operator saw the attempt end (RFC 3339)."""


class FailedCreate(StatusModel):
    """The last create the API server refused (quota, admission, Pod Security ...), until a create succeeds."""

    kind: str
    """Kind of the object, e.g. Pod."""
    name: str
    """Name of the object."""
    code: int
    """HTTP status of the refusal (403, 422 ...)."""
    message: str
    """The API server's message."""
    count: int = 1
    """Refusals in a row; the run fails when this exceeds the operator's --create-retry-limit."""
    retry_after: str | None = None
    """The next create is not tried before this time (RFC 3339); exponential backoff."""


class StageStatus(StatusModel):
    """Observed state of one stage."""

    state: StageState = "Pending"
    """Pending, Skipped, Starting, WaitingForResources, Running, BackingOff (waiting to retry), Suspended, Succeeded or Failed."""
    attempts: int = 0
    """Pods created for this stage; the current pod is <run>-<stage>-<attempts>."""
    failures: int = 0
    """Attempts that failed; the stage fails when this exceeds spec.backoffLimit."""
    disruptions: int = 0
    """Attempts whose pod was removed by the cluster (eviction, preemption, node loss) or deleted from outside; counted against spec.disruptionLimit, not backoffLimit."""
    pod: str | None = None
    """Name of the current pod."""
    start_time: str | None = None
    """When the first pod of the stage was requested."""
    attempt_start_time: str | None = None
    """When the current pod was requested."""
    running_time: str | None = None
    """When the current pod was first seen running."""
    completion_time: str | None = None
    """When the stage succeeded or failed."""
    reason: str | None = None
    """CamelCase reason of the last state change."""
    message: str | None = None
    """Details, e.g. the scheduler's message or the failure reason."""
    artifact: str | None = None
    """Final model directory of the stage (inside the artifacts PVC) once succeeded."""
    step: int | None = None
    """Last reported optimizer/PPO step."""
    total_steps: int | None = None
    """Total steps of the stage, as reported by the trainer."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest metrics reported by the trainer (bounded set of keys)."""
    last_failure: Termination | None = None
    """How the last failed or disrupted attempt ended."""
    retry_after: str | None = None
    """While BackingOff: the next attempt is created at this time (RFC 3339)."""
    waiting_since: str | None = None
    """When the current pod's container was first seen stuck before running (image pull errors ...)."""


class StagesStatus(StatusModel):
    """Per-stage status."""

    sft: StageStatus | None = None
    """Supervised fine-tuning."""
    reward: StageStatus | None = None
    """Reward model."""
    ppo: StageStatus | None = None
    """PPO."""
    grpo: StageStatus | None = None
    """GRPO or RLOO."""
    dpo: StageStatus | None = None
    """DPO."""


class Sample(StatusModel):
    """A response on a held-out prompt: sampled by PPO, GRPO or RLOO; DPO's greedy answer beside the pair's replies (texts truncated)."""

    stage: str
    """Stage that produced it."""
    step: int = 0
    """Step at which it was generated."""
    prompt: str | None = None
    """Prompt (truncated)."""
    response: str | None = None
    """Response (truncated)."""
    reward: float | None = None
    """Score of the response."""
    kl: float | None = None
    """KL of the response to the reference model, in nats."""
    chosen: str | None = None
    """DPO: the held-out pair's chosen reply (truncated)."""
    rejected: str | None = None
    """DPO: the held-out pair's rejected reply (truncated)."""
    chosen_reward: float | None = None
    """DPO: implicit reward of the chosen reply, beta times its log-ratio to the reference."""
    rejected_reward: float | None = None
    """DPO: implicit reward of the rejected reply."""


class FeedbackRoundStatus(StatusModel):
    """One human-feedback round of the online stage."""

    round: int
    """Round number, 1, 2 ... (the finetune.dev/round label of its PreferenceLabels)."""
    state: FeedbackRoundState = "AwaitingLabels"
    """AwaitingLabels, Retraining (the reward model trains on the labels), Done, TimedOut (continued without retraining) or Failed."""
    stage: str
    """The online stage that opened it (ppo or grpo)."""
    step: int | None = None
    """Step of the online stage after which the round opened (its checkpoint)."""
    attempt: int
    """Attempt of the online stage whose pod opened the round."""
    candidates: int | None = None
    """Candidate pairs in the <run>-feedback-<round> ConfigMap."""
    labels: int = 0
    """Labels so far that prefer A or B."""
    needed: int
    """spec.humanFeedback.labelsNeeded."""
    since: str
    """When the round opened (RFC 3339); spec.humanFeedback.timeoutSeconds counts from here."""
    reward_attempt: int | None = None
    """Attempt of the reward stage that retrains the reward model on this round's labels."""
    held_out_accuracy_before: float | None = None
    """Accuracy of the reward model on the held-out human labels before retraining."""
    held_out_accuracy: float | None = None
    """Accuracy of the retrained reward model on the held-out human labels."""
    completion_time: str | None = None
    """When the online stage was resumed after the round."""


class FineTuneRunStatus(StatusModel):
    """Observed state, written only by the operator."""

    observed_generation: int | None = None
    """metadata.generation last acted on."""
    state: RunState | None = None
    """Summary for humans and the Status column: Pending, Running, WaitingForResources, Suspended, Succeeded or Failed. Automation should read conditions."""
    current_stage: str | None = None
    """Stage being worked on, or the last one when the run is over."""
    progress: str | None = None
    """Human-readable progress, e.g. "ppo 120/500"."""
    reward: float | None = None
    """Latest mean reward (score of the reward model and functions) reported by PPO, GRPO or RLOO."""
    kl: float | None = None
    """Latest mean KL to the reference model reported by PPO, GRPO or RLOO (GRPO/RLOO: only with klCoef > 0), in nats."""
    preference_accuracy: float | None = None
    """DPO: share of preference pairs whose chosen response gets the higher implicit reward; held-out pairs when measured, else the latest training batch."""
    reward_margin: float | None = None
    """DPO: mean implicit reward of the chosen minus the rejected response (beta times log-ratio to the reference); held-out pairs when measured, else the latest training batch."""
    message: str | None = None
    """Details of the current state."""
    start_time: str | None = None
    """When the run started (its first reconcile)."""
    active_since: str | None = None
    """When the run last became active: its start or its last resume. spec.activeDeadlineSeconds counts from here."""
    completion_time: str | None = None
    """When the run succeeded or failed."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions in metav1.Condition shape; set from the first reconcile."""
    stages: StagesStatus = Field(default_factory=StagesStatus)
    """Per-stage status."""
    samples: list[Sample] = Field(default_factory=list)
    """The latest few samples of PPO, GRPO or RLOO on held-out prompts, truncated."""
    spec_digests: dict[str, str] = Field(default_factory=dict)
    """Digests of the immutable spec fields at start (model, data, artifacts, each started stage), defaults left out; used to detect changes made while the webhook is off."""
    spec_digests_generation: int | None = None
    """metadata.generation at which specDigests last matched the spec; the spec cannot have changed while the generation stays."""
    failed_create: FailedCreate | None = None
    """The last create the API server refused, while the operator retries it."""
    feedback_rounds: list[FeedbackRoundStatus] = Field(default_factory=list)
    """Human-feedback rounds so far (spec.humanFeedback), oldest first."""

    def stage(self, name: str) -> StageStatus:
        """The status of stage ``name``, created empty if missing."""
        current = getattr(self.stages, name)
        if current is None:
            current = StageStatus()
            setattr(self.stages, name, current)
        return current


def effective_resources(spec: FineTuneRunSpec, stage: str) -> ResourcesSpec:
    """spec.resources overridden field by field by spec.stages.<stage>.resources."""
    merged = spec.resources.model_dump()
    settings = getattr(spec.stages, stage)
    if settings is not None and settings.resources is not None:
        merged.update({k: v for k, v in settings.resources.model_dump().items() if v is not None})
    return ResourcesSpec.model_validate(merged)


def trainer_processes(gpus: int | None) -> int:
    """Trainer processes in a stage pod: one per GPU above one (accelerate launch), else one."""
    return gpus if gpus and gpus > 1 else 1


def parse_status(raw: dict[str, Any] | None) -> FineTuneRunStatus:
    """Status from the object's ``status`` (tolerates None and unknown fields)."""
    return FineTuneRunStatus.model_validate(raw or {})


def _nested_model(annotation: Any) -> type[ApiModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, ApiModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # Optional[...] / X | None
        if isinstance(arg, type) and issubclass(arg, ApiModel):
            return arg
    return None


def keep_unknown_fields(old: dict[str, Any] | None, new: dict[str, Any],
                        model: type[ApiModel] = FineTuneRunStatus) -> dict[str, Any]:
    """``new`` plus every key of ``old`` that ``model`` does not know, at every level of nested models.

    A status written by a newer operator (or another controller) keeps its fields through a
    merge patch computed by this one, which would otherwise set them to null.
    """
    if not isinstance(old, dict):
        return new
    known = {(info.alias or name): info for name, info in model.model_fields.items()}
    merged = dict(new)
    for key, value in old.items():
        info = known.get(key)
        if info is None:
            merged.setdefault(key, value)
            continue
        nested = _nested_model(info.annotation)
        if nested is not None and isinstance(merged.get(key), dict):
            merged[key] = keep_unknown_fields(value, merged[key], nested)
    return merged


def dump(model: ApiModel) -> dict[str, Any]:
    """The wire form: camelCase keys, unset optional fields left out."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
