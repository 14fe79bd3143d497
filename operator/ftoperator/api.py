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

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema

from trainer.config import ApiModel, PPOConfig, RewardConfig, SFTConfig

STAGES: tuple[str, ...] = ("sft", "reward", "ppo")
"""Stage names in the order they run."""

# A PVC claim name is a DNS-1123 subdomain; the path after it is relative to the claim's root.
CLAIM_PATTERN = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
MODEL_SOURCE_PATTERN = rf"^(pvc://{CLAIM_PATTERN}(/.*)?|hf://[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|/.*)$"
DATA_URI_PATTERN = rf"^(pvc://{CLAIM_PATTERN}/.+|/.+)$"


def _quantity_to_string(value: Any) -> Any:
    # YAML turns `cpu: 4` into an int; Kubernetes quantities are int-or-string.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_string),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]


# --------------------------------------------------------------------------- spec


class ModelSpec(ApiModel):
    """The base model the first enabled stage starts from."""

    source: str = Field(pattern=MODEL_SOURCE_PATTERN)
    """pvc://<claim>/<path> (the claim is mounted read-only), hf://<org>/<name> (downloaded by the trainer; needs network), or an absolute path inside the trainer image."""


class DataSpec(ApiModel):
    """Datasets, each pvc://<claim>/<file.jsonl> (claim mounted read-only) or an absolute path in the image."""

    sft: str | None = Field(None, pattern=DATA_URI_PATTERN)
    """Supervised data: {"prompt", "completion"} or {"messages"} rows. Required when stages.sft is enabled."""
    preferences: str | None = Field(None, pattern=DATA_URI_PATTERN)
    """Preference pairs: {"prompt", "chosen", "rejected"} rows. Required to train a reward model."""
    prompts: str | None = Field(None, pattern=DATA_URI_PATTERN)
    """Prompts for PPO rollouts: {"prompt"} rows. Required when stages.ppo is enabled."""


class ResourcesSpec(ApiModel):
    """Compute resources of a stage pod; requests equal limits. Unset fields are not requested."""

    gpus: int | None = Field(None, ge=0)
    """NVIDIA GPUs (nvidia.com/gpu) per pod. With more than one, the trainer runs under accelerate, one process per GPU."""
    cpu: Quantity | None = None
    """CPU cores, a Kubernetes quantity such as 4 or 500m."""
    memory: Quantity | None = None
    """Memory, a Kubernetes quantity such as 64Gi."""


class _StageControls(ApiModel):
    enabled: bool = True
    """Run this stage. A disabled stage is skipped and the next stage starts from the previous model."""
    resources: ResourcesSpec | None = None
    """Per-stage override of spec.resources, field by field."""


class SFTStageSpec(SFTConfig, _StageControls):
    """Supervised fine-tuning stage: the trainer's SFT settings plus enabled and resources."""


class RewardStageSpec(RewardConfig, _StageControls):
    """Reward stage: trains a reward model when spec.data.preferences is set; functions are used by PPO either way."""


class PPOStageSpec(PPOConfig, _StageControls):
    """PPO stage: the trainer's PPO settings plus enabled and resources."""


class StagesSpec(ApiModel):
    """The stages to run, in the order sft, reward, ppo. A stage runs when it is listed here and not disabled."""

    sft: SFTStageSpec | None = None
    """Supervised fine-tuning of the base model."""
    reward: RewardStageSpec | None = None
    """Reward model training and/or heuristic reward functions."""
    ppo: PPOStageSpec | None = None
    """PPO against the reward, with a KL penalty to the model it starts from."""


class ArtifactsSpec(ApiModel):
    """Where stage outputs go: <pvc>/<namespace>/<run>/<stage>/ (checkpoints and final/)."""

    pvc: str = Field(pattern=f"^{CLAIM_PATTERN}$")
    """Name of a ReadWriteOnce (or ReadWriteMany) PVC in the run's namespace, mounted read-write at /artifacts."""


class Toleration(ApiModel):
    """A pod toleration, as in the core/v1 Pod API."""

    key: str | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class FineTuneRunSpec(ApiModel):
    """Desired state of a FineTuneRun: a base model taken through SFT, reward modelling and PPO, one pod per stage."""

    model: ModelSpec
    """The base model."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Datasets used by the stages."""
    stages: StagesSpec
    """Stage settings; the trainer's configuration for each stage."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Resources of every stage pod, unless the stage overrides them."""
    artifacts: ArtifactsSpec
    """Where outputs are written."""
    image: str | None = None
    """Trainer container image; default: the operator's --trainer-image."""
    backoff_limit: int = Field(2, ge=0, le=100)
    """Failed attempts retried per stage before the run fails. Pods deleted from outside or by suspension do not count."""
    suspend: bool = False
    """true deletes the running stage pod and keeps the run Suspended; false resumes it from its last checkpoint."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Seconds the run may be active (since start or last resume); then its pod is deleted and the run fails with DeadlineExceeded."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels every stage pod requires."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations of every stage pod."""


# --------------------------------------------------------------------------- status


class StatusModel(ApiModel):
    model_config = ConfigDict(extra="ignore")


RunState = Literal["Pending", "Running", "WaitingForResources", "Suspended", "Succeeded", "Failed"]
StageState = Literal[
    "Pending", "Skipped", "Starting", "WaitingForResources", "Running", "Suspended", "Succeeded", "Failed"
]


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


class StageStatus(StatusModel):
    """Observed state of one stage."""

    state: StageState = "Pending"
    """Pending, Skipped, Starting, WaitingForResources, Running, Suspended, Succeeded or Failed."""
    attempts: int = 0
    """Pods created for this stage; the current pod is <run>-<stage>-<attempts>."""
    failures: int = 0
    """Attempts that failed; the stage fails when this exceeds spec.backoffLimit."""
    disruptions: int = 0
    """Attempts whose pod vanished or was removed by suspension (not counted as failures)."""
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


class StagesStatus(StatusModel):
    """Per-stage status."""

    sft: StageStatus | None = None
    """Supervised fine-tuning."""
    reward: StageStatus | None = None
    """Reward model."""
    ppo: StageStatus | None = None
    """PPO."""


class Sample(StatusModel):
    """A generated response recorded during PPO (truncated)."""

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
    """Latest mean reward reported by PPO."""
    kl: float | None = None
    """Latest mean KL to the reference model reported by PPO, in nats."""
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
    """The latest few PPO samples, truncated."""
    spec_digests: dict[str, str] = Field(default_factory=dict)
    """Digests of the immutable spec fields at start (model, data, artifacts, each started stage); used to detect changes made while the webhook is off."""

    def stage(self, name: str) -> StageStatus:
        """The status of stage ``name``, created empty if missing."""
        current = getattr(self.stages, name)
        if current is None:
            current = StageStatus()
            setattr(self.stages, name, current)
        return current


def parse_status(raw: dict[str, Any] | None) -> FineTuneRunStatus:
    """Status from the object's ``status`` (tolerates None and unknown fields)."""
    return FineTuneRunStatus.model_validate(raw or {})


def dump(model: ApiModel) -> dict[str, Any]:
    """The wire form: camelCase keys, unset optional fields left out."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
