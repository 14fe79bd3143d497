"""Validation of a FineTuneRun spec: pure, shared by the admission webhook and the reconciler.

The webhook rejects a bad object at ``kubectl apply``; when the webhook is off
the reconciler runs the same checks and fails the run with reason InvalidSpec.
Every error names the field (``spec.stages.ppo``) and says what to do.

Immutability: once a run is active (started and not finished) ``spec.model``,
``spec.data``, ``spec.artifacts`` and ``spec.image`` are frozen, and so is
``spec.stages.<stage>`` (except its ``resources``) once that stage has
started. Everything else -- suspend, backoffLimit, activeDeadlineSeconds,
resources, podTemplate, nodeSelector, tolerations -- may change and applies to the next pod.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ftoperator import naming, stageplan
from ftoperator.api import FineTuneRunSpec, FineTuneRunStatus, ResourcesSpec, effective_resources, trainer_processes
from ftoperator.stageplan import ONLINE_STAGES, POLICY_STAGES, STAGE_ORDER

# The Kubernetes quantity grammar (k8s.io/apimachinery/pkg/api/resource), signs included so
# that a negative value is reported as negative rather than as malformed.
_QUANTITY = re.compile(
    r"^(?P<sign>[+-]?)(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)

_BYTES_PER_SUFFIX = {
    "": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
MIN_MEMORY_BYTES = 256 * 2**20
"""Smallest memory a stage pod may request: Python, torch and a tokenizer alone take about this much."""
MIN_MEMORY_TEXT = "256Mi"

RUN_FROZEN_FIELDS = ("spec.model", "spec.data", "spec.artifacts", "spec.image")
TERMINAL_STATES = ("Succeeded", "Failed")
NOT_STARTED_STAGE_STATES = ("Pending", "Skipped")
IN_PROGRESS_STAGE_STATES = ("Starting", "WaitingForResources", "Running", "BackingOff", "AwaitingFeedback", "Suspended")


@dataclass(frozen=True)
class FieldError:
    """One problem with one field."""

    field: str
    """Path of the field, e.g. spec.stages.ppo.resources.gpus."""
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def describe(errors: list[FieldError]) -> str:
    """All errors on one line, for an admission response or a condition message."""
    return "; ".join(str(error) for error in errors)


def _path(loc: tuple[Any, ...]) -> str:
    text = "spec"
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def parse_spec(raw: dict[str, Any] | None) -> tuple[FineTuneRunSpec | None, list[FieldError]]:
    """The typed spec, or None and the schema errors (pydantic's, with Kubernetes field paths)."""
    try:
        return FineTuneRunSpec.model_validate(raw or {}), []
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            errors.append(FieldError(_path(err["loc"]), message))
        return None, errors


def quantity_value(value: str) -> float:
    """The number a valid Kubernetes quantity stands for (bytes for memory, cores for cpu)."""
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    suffix = match["suffix"] or ""
    scale = _BYTES_PER_SUFFIX.get(suffix)
    if scale is None:  # a decimal exponent, e.g. 1e9
        scale = 10.0 ** int(suffix[1:])
    return (-1 if match["sign"] == "-" else 1) * float(match["number"]) * scale


def _check_quantity(field: str, value: str | None) -> list[FieldError]:
    if value is None:
        return []
    match = _QUANTITY.match(value)
    if match is None:
        return [FieldError(field, f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 64Gi)")]
    if match["sign"] == "-":
        return [FieldError(field, f"{value!r} is negative; resources must be positive")]
    if float(match["number"]) == 0:
        return [FieldError(field, f"{value!r} is zero; leave the field out to request nothing")]
    return []


def _check_memory(field: str, value: str | None) -> list[FieldError]:
    errors = _check_quantity(field, value)
    if errors or value is None:
        return errors
    amount = quantity_value(value)
    if amount >= MIN_MEMORY_BYTES:
        return []
    number = _QUANTITY.match(value)["number"]
    guess = f"{number}Mi" if float(number) * 2**20 >= MIN_MEMORY_BYTES else f"{number}Gi"
    return [FieldError(field, f"{value!r} is {amount:.4g} bytes, below the {MIN_MEMORY_TEXT} a stage pod needs "
                              f"(did you mean {guess}? 'm' means milli, 'Mi' mebibytes)")]


def _check_resources(prefix: str, resources: ResourcesSpec | None, max_gpus: int | None) -> list[FieldError]:
    if resources is None:
        return []
    errors = []
    if resources.gpus is not None and resources.gpus < 0:
        errors.append(FieldError(f"{prefix}.gpus", f"{resources.gpus} is negative"))
    elif resources.gpus is not None and max_gpus is not None and resources.gpus > max_gpus:
        errors.append(FieldError(
            f"{prefix}.gpus",
            f"{resources.gpus} GPUs requested but this operator allows at most {max_gpus} per stage pod "
            "(operator flag --max-gpus-per-stage; a pod runs on one node, and nodes rarely have more)",
        ))
    errors += _check_quantity(f"{prefix}.cpu", resources.cpu)
    errors += _check_memory(f"{prefix}.memory", resources.memory)
    return errors


def _overlaps(path: str, reserved: str) -> bool:
    """path is reserved, inside it, or a parent of it (a mount there would hide or be hidden)."""
    path, reserved = path.rstrip("/") or "/", reserved.rstrip("/")
    return path == reserved or path.startswith(f"{reserved}/") or reserved.startswith(f"{path}/" if path != "/" else "/")


def _check_pod_template(spec: FineTuneRunSpec) -> list[FieldError]:
    """What the operator's own part of a stage pod reserves, and the Pod API's cross-field rules."""
    template, prefix = spec.pod_template, "spec.podTemplate"
    errors = []
    for key in template.labels:
        if naming.is_operator_label(key):
            errors.append(FieldError(f"{prefix}.labels", f"{key!r} is set by the operator (it selects stage pods "
                                     f"by it); use another key"))
    for index, var in enumerate(template.env):
        if var.name in naming.OPERATOR_ENV:
            errors.append(FieldError(f"{prefix}.env[{index}].name", f"{var.name} is set by the operator"))
    names: set[str] = set()
    for index, volume in enumerate(template.volumes):
        field = f"{prefix}.volumes[{index}]"
        if volume.name.startswith(naming.OPERATOR_VOLUME_PREFIX):
            errors.append(FieldError(f"{field}.name", f"{volume.name!r}: names starting with "
                                     f"{naming.OPERATOR_VOLUME_PREFIX!r} are the operator's; rename the volume"))
        if volume.name in names:
            errors.append(FieldError(f"{field}.name", f"{volume.name!r} is listed twice"))
        names.add(volume.name)
        if volume.claim() == spec.artifacts.pvc:
            errors.append(FieldError(
                f"{field}.persistentVolumeClaim.claimName",
                f"{spec.artifacts.pvc!r} is the artifacts claim: each run sees only its own output directory "
                "of it; read another run's output with a pvc:// URI in spec.model or spec.data"))
    paths: set[str] = set()
    for index, mount in enumerate(template.volume_mounts):
        field = f"{prefix}.volumeMounts[{index}]"
        if mount.name not in names:
            errors.append(FieldError(f"{field}.name", f"{mount.name!r} is not in {prefix}.volumes"))
        clash = next((path for path in naming.OPERATOR_MOUNT_PATHS if _overlaps(mount.mount_path, path)
                      and not mount.mount_path.startswith(f"{naming.TMP_DIR}/")), None)
        if clash is not None:
            errors.append(FieldError(f"{field}.mountPath", f"{mount.mount_path!r} overlaps {clash}, which the "
                                     "operator mounts; choose another path (below /tmp is fine, e.g. a cache)"))
        if mount.mount_path in paths:
            errors.append(FieldError(f"{field}.mountPath", f"{mount.mount_path!r} is mounted twice"))
        paths.add(mount.mount_path)
    for key, value in template.node_selector.items():
        if spec.node_selector.get(key, value) != value:
            errors.append(FieldError(f"{prefix}.nodeSelector", f"{key}: {value!r} contradicts spec.nodeSelector "
                                     f"{key}: {spec.node_selector[key]!r} (deprecated; move it here)"))
    if template.accelerator_resource in template.extra_resources:
        errors.append(FieldError(f"{prefix}.extraResources", f"{template.accelerator_resource} is the accelerator "
                                 "resource; request it with resources.gpus"))
    return errors


def _algorithm_name(spec: FineTuneRunSpec, stage: str) -> str:
    return spec.stages.grpo.algorithm.upper() if stage == "grpo" else stage.upper()


def _check_stage_plan(spec: FineTuneRunSpec) -> list[FieldError]:
    """Which stages may run together, and whether each has its data and its reward (stageplan.plan)."""
    plan = stageplan.plan(spec)
    errors: list[FieldError] = []
    if not plan.enabled:
        errors.append(FieldError("spec.stages", f"no stage is enabled; list at least one of {', '.join(STAGE_ORDER)}"))
    first, *others = plan.policy_stages or (None,)
    for other in others:
        errors.append(FieldError(
            f"spec.stages.{other}",
            f"cannot run together with spec.stages.{first}: a run has one policy-optimisation stage "
            f"({', '.join(POLICY_STAGES)}). Remove one of them or set its enabled: false"))
    for step in plan.steps:
        if getattr(spec.data, step.dataset) is None:
            errors.append(FieldError(
                f"spec.data.{step.dataset}",
                f"required because spec.stages.{step.stage} is enabled (or set spec.stages.{step.stage}.enabled: false)"))
    if "reward" in plan.enabled and not plan.trains_reward_model and not plan.reward_functions:
        errors.append(FieldError(
            "spec.data.preferences",
            "required because spec.stages.reward is enabled without functions: set spec.data.preferences "
            "to train a reward model, or spec.stages.reward.functions",
        ))
    for stage in plan.stages:
        if stage in ONLINE_STAGES and not plan.trains_reward_model and not plan.reward_functions:
            errors.append(FieldError(
                f"spec.stages.{stage}",
                f"{_algorithm_name(spec, stage)} has no reward: enable spec.stages.reward with spec.data.preferences "
                "to train a reward model, or set spec.stages.reward.functions (e.g. numericAnswer, for prompt rows "
                "with an \"answer\" field)",
            ))
    if plan.runs("dpo") and "reward" in plan.enabled:
        errors.append(FieldError(
            "spec.stages.reward",
            "DPO uses no reward model and no reward functions (it learns from spec.data.preferences directly), so "
            "this stage would train a model nothing reads: remove spec.stages.reward or set "
            "spec.stages.reward.enabled: false"))
    return errors


def _check_distributed(spec: FineTuneRunSpec) -> list[FieldError]:
    """Stages with resources.nodes above 1: what their pods need that the schema cannot say."""
    from ftoperator.gangstage import GANG_ENV, stage_nodes

    errors = []
    gangs = [stage for stage in stageplan.plan(spec).stages if stage_nodes(spec, stage) > 1]
    for index, var in enumerate(spec.pod_template.env):
        if var.name in GANG_ENV:
            errors.append(FieldError(f"spec.podTemplate.env[{index}].name",
                                     f"{var.name} is set by the operator (multi-node rendezvous and timeouts)"))
    scheduler = spec.distributed.gang_scheduler
    if gangs and scheduler in ("coscheduling", "volcano") and not spec.pod_template.scheduler_name:
        errors.append(FieldError("spec.podTemplate.schedulerName", (
            f"required with spec.distributed.gangScheduler {scheduler} (stages {', '.join(gangs)} run on several "
            f"pods): name the {scheduler} scheduler, or the pods are placed by the default scheduler one by one")))
    distributed = spec.distributed
    if gangs and distributed.progress_timeout_seconds is not None and \
            distributed.progress_timeout_seconds <= distributed.rendezvous_timeout_seconds:
        errors.append(FieldError("spec.distributed.progressTimeoutSeconds", (
            f"{distributed.progress_timeout_seconds} is not above rendezvousTimeoutSeconds "
            f"({distributed.rendezvous_timeout_seconds}): the watchdog would end a gang still waiting for its "
            "pods to meet, before the rendezvous could say which one is missing")))
    return errors


def _check_human_feedback(spec: FineTuneRunSpec) -> list[FieldError]:
    """spec.humanFeedback needs an online stage to stop and a reward model to retrain."""
    feedback = spec.human_feedback
    if feedback is None:
        return []
    plan = stageplan.plan(spec)
    online = next((stage for stage in plan.stages if stage in ONLINE_STAGES), None)
    if plan.runs("dpo"):
        return [FieldError("spec.humanFeedback", (
            "rounds are not supported with DPO (no online stage to stop, no reward model to retrain): remove "
            "spec.humanFeedback, label the DPO run's samples in the console, export them with `python -m ftconsole "
            "labels export` and add them to spec.data.preferences of the next run (docs/console.md)"))]
    if online is None:
        return [FieldError("spec.humanFeedback", "needs an enabled online stage, spec.stages.ppo or spec.stages.grpo, "
                           "whose responses are labelled")]
    if not plan.trains_reward_model:
        return [FieldError("spec.humanFeedback", (
            "needs a reward model to retrain: enable spec.stages.reward and set spec.data.preferences (reward "
            "functions alone cannot learn from labels)"))]
    steps = getattr(spec.stages, online).steps
    rounds = feedback.rounds(steps)
    if rounds < 1:
        return [FieldError("spec.humanFeedback.everySteps", (
            f"{feedback.every_steps} opens no round before the last of spec.stages.{online}.steps ({steps}): use a "
            "smaller value, or 0 for one round after the last step"))]
    if rounds > feedback.max_rounds:
        return [FieldError("spec.humanFeedback.everySteps", (
            f"{feedback.every_steps} opens {rounds} rounds in spec.stages.{online}.steps ({steps}); at most "
            f"{feedback.max_rounds}: use a larger value"))]
    from ftoperator.gangstage import stage_nodes

    # Round boundaries and retraining are decided per pod; a gang of pods stops and resumes as one,
    # which the round logic does not do yet: refuse rather than half-work.
    gangs = [stage for stage in (online, "reward") if stage_nodes(spec, stage) > 1]
    if gangs:
        return [FieldError("spec.humanFeedback", (
            f"not supported yet with several pods per stage (resources.nodes above 1 for {', '.join(gangs)}): "
            "run the online and reward stages on one pod each, or remove spec.humanFeedback"))]
    return []


def check_semantics(
    spec: FineTuneRunSpec, *, max_gpus_per_stage: int | None, default_image: str | None
) -> list[FieldError]:
    """Rules across fields that a schema cannot express."""
    errors = _check_stage_plan(spec)
    errors += _check_human_feedback(spec)
    errors += _check_resources("spec.resources", spec.resources, max_gpus_per_stage)
    for stage in STAGE_ORDER:
        settings = getattr(spec.stages, stage)
        if settings is not None:
            errors += _check_resources(f"spec.stages.{stage}.resources", settings.resources, max_gpus_per_stage)

    errors += _check_pod_template(spec)
    errors += _check_distributed(spec)

    if spec.image is None and not default_image:
        errors.append(FieldError(
            "spec.image", "required: this operator has no default trainer image (--trainer-image)"))
    return errors


def validate_spec(
    raw: dict[str, Any] | None, *, max_gpus_per_stage: int | None = None, default_image: str | None = "default"
) -> tuple[FineTuneRunSpec | None, list[FieldError]]:
    """Parse and check a spec; returns the typed spec (None if it does not parse) and all errors."""
    spec, errors = parse_spec(raw)
    if spec is None:
        return None, errors
    return spec, check_semantics(spec, max_gpus_per_stage=max_gpus_per_stage, default_image=default_image)


# ----------------------------------------------------------------------------- immutability
#
# Frozen fields are judged by what the user changed. A digest leaves out values equal to the
# model's default, so a newer operator that adds a setting (with its default) computes the same
# digest for an unchanged spec; and the reconciler compares digests only when metadata.generation
# moved since they last matched, since the API server bumps it on every spec change and never
# for defaults applied from the schema.


def _digest_of(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _user_set(model: Any, **kwargs: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_defaults=True, **kwargs)


def world_size(spec: FineTuneRunSpec, stage: str) -> int:
    """Trainer processes of the stage across all its pods."""
    from ftoperator.gangstage import stage_nodes

    return trainer_processes(effective_resources(spec, stage).gpus) * stage_nodes(spec, stage)


def field_digest(spec: FineTuneRunSpec, field: str) -> str:
    """Digest of one frozen field, defaults left out.

    Fields: ``spec.model``, ``spec.data``, ``spec.artifacts``, ``spec.image``,
    ``spec.stages.<stage>`` (without its resources), and three derived ones:
    ``spec.stages.<stage>.processes`` (trainer processes of all its pods: the effective GPU count times
    ``resources.nodes``; for one pod the same digest as before nodes existed),
    ``spec.stages.<stage>.enabled`` (whether the stage has a pod) and
    ``spec.stages.reward.functions``.
    """
    parts = field.split(".")
    if parts[1] != "stages":
        attribute = getattr(spec, parts[1])
        return _digest_of(_user_set(attribute) if hasattr(attribute, "model_dump") else attribute)
    stage = parts[2]
    settings = getattr(spec.stages, stage)
    detail = parts[3] if len(parts) > 3 else None
    if detail == "processes":
        return _digest_of(world_size(spec, stage))
    if detail == "enabled":
        return _digest_of(stageplan.plan(spec).runs(stage))
    if detail == "functions":
        return _digest_of([] if settings is None else [_user_set(f) for f in settings.functions])
    return _digest_of(None if settings is None else _user_set(settings, exclude={"resources"}))


def is_active(status: FineTuneRunStatus) -> bool:
    """Started and not finished."""
    return status.start_time is not None and status.state not in TERMINAL_STATES


def _stage_state(status: FineTuneRunStatus, stage: str) -> str:
    current = getattr(status.stages, stage)
    return "Pending" if current is None else current.state


def frozen_fields(status: FineTuneRunStatus) -> list[str]:
    """The spec fields that may not change now, given the run's status.

    Once the run is active: model, data, artifacts and image. Once a stage started: its
    settings; while it is in progress and once one of its pods ran, its trainer process count
    (checkpoints are per process).
    A stage that did not run may not be enabled once a later stage started (that stage already
    took the model without it), and reward functions may not change once PPO or GRPO started (its
    StageJob holds them).
    """
    if not is_active(status):
        return []
    fields = list(RUN_FROZEN_FIELDS)
    for index, stage in enumerate(STAGE_ORDER):
        state = _stage_state(status, stage)
        if state not in NOT_STARTED_STAGE_STATES:
            fields.append(f"spec.stages.{stage}")
        current = getattr(status.stages, stage)
        has_run = current is not None and (current.attempts > 1 or current.running_time is not None)
        if state in IN_PROGRESS_STAGE_STATES and has_run:  # a first pod that never ran wrote no checkpoint
            fields.append(f"spec.stages.{stage}.processes")
        later_started = any(_stage_state(status, later) not in NOT_STARTED_STAGE_STATES
                            for later in STAGE_ORDER[index + 1:])
        if state in NOT_STARTED_STAGE_STATES and later_started:
            fields.append(f"spec.stages.{stage}.enabled")
    if any(_stage_state(status, stage) not in NOT_STARTED_STAGE_STATES for stage in ONLINE_STAGES):
        fields.append("spec.stages.reward.functions")
    return fields


def _immutable_error(field: str, old: FineTuneRunSpec | None = None) -> FieldError:
    parts = field.split(".")
    if parts[-1] == "processes":
        stage = parts[2]
        before = "" if old is None else f" (it runs {world_size(old, stage)} trainer process(es))"
        return FieldError(
            f"spec.stages.{stage}.resources.gpus",
            f"the GPU or node count of stage {stage} (resources.gpus and resources.nodes, of spec or of "
            f"spec.stages.{stage}) cannot change the number of trainer processes while the stage is in "
            f"progress{before}: its checkpoints are per process. Keep them until the stage finishes, or create "
            "a new FineTuneRun")
    if parts[-1] == "enabled":
        return FieldError(
            f"spec.stages.{parts[2]}",
            f"stage {parts[2]} did not run and cannot be enabled now: a later stage has already started "
            "without it. Create a new FineTuneRun to run it")
    if parts[-1] == "functions":
        return FieldError(field, "cannot change once the ppo or grpo stage has started (it scores with the "
                                 "functions it started with); create a new FineTuneRun")
    return FieldError(field, "cannot change while the run is active; wait for it to finish or create a new FineTuneRun")


def check_update(
    old: FineTuneRunSpec, new: FineTuneRunSpec, old_status: FineTuneRunStatus
) -> list[FieldError]:
    """Errors for frozen fields that differ between the old and the new spec (admission UPDATE)."""
    return [
        _immutable_error(field, old)
        for field in frozen_fields(old_status)
        if field_digest(old, field) != field_digest(new, field)
    ]


def check_recorded_digests(spec: FineTuneRunSpec, status: FineTuneRunStatus, *, generation: int) -> list[FieldError]:
    """The reconciler's fallback when the webhook is off: frozen fields whose digest differs from the recorded one.

    Nothing is compared while ``generation`` equals ``status.specDigestsGeneration`` (the user has
    not changed the spec since the digests last matched), nor when that field is missing (digests
    recorded by an older operator, in another format: the caller records them again).
    """
    if not is_active(status) or status.spec_digests_generation in (None, generation):
        return []
    return [
        _immutable_error(field)
        for field in frozen_fields(status)
        if field in status.spec_digests and field_digest(spec, field) != status.spec_digests[field]
    ]


def record_digests(spec: FineTuneRunSpec, status: FineTuneRunStatus, *, generation: int) -> None:
    """After ``check_recorded_digests`` passed: record the digest of every field frozen now that has none.

    Digests from an older operator (no ``specDigestsGeneration``) are replaced.
    """
    if not is_active(status):
        return
    if status.spec_digests_generation is None:
        status.spec_digests = {}
    for field in frozen_fields(status):
        status.spec_digests.setdefault(field, field_digest(spec, field))
    status.spec_digests_generation = generation


def validate_admission(
    *,
    operation: str,
    new_spec: dict[str, Any] | None,
    old_spec: dict[str, Any] | None,
    old_status: dict[str, Any] | None,
    max_gpus_per_stage: int | None,
    default_image: str | None,
) -> list[FieldError]:
    """Everything the webhook checks for a CREATE or UPDATE; an empty list admits the object.

    An UPDATE that leaves the spec alone (labels, finalizers, kopf's annotations) is always
    admitted, so that even a run admitted while the webhook was off can be finalized and deleted.
    """
    if operation == "UPDATE" and old_spec is not None and old_spec == new_spec:
        return []
    spec, errors = validate_spec(new_spec, max_gpus_per_stage=max_gpus_per_stage, default_image=default_image)
    if spec is None or operation != "UPDATE" or old_spec is None:
        return errors
    old, _ = parse_spec(old_spec)
    if old is None:  # an invalid old object (e.g. admitted while the webhook was off) may be fixed freely
        return errors
    return errors + check_update(old, spec, FineTuneRunStatus.model_validate(old_status or {}))
