"""Validation of a FineTuneRun spec: pure, shared by the admission webhook and the reconciler.

The webhook rejects a bad object at ``kubectl apply``; when the webhook is off
the reconciler runs the same checks and fails the run with reason InvalidSpec.
Every error names the field (``spec.stages.ppo``) and says what to do.

Immutability: once a run is active (started and not finished) ``spec.model``,
``spec.data``, ``spec.artifacts`` and ``spec.image`` are frozen, and so is
``spec.stages.<stage>`` (except its ``resources``) once that stage has
started. Everything else -- suspend, backoffLimit, activeDeadlineSeconds,
resources, nodeSelector, tolerations -- may change and applies to the next pod.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ftoperator.api import STAGES, FineTuneRunSpec, FineTuneRunStatus, ResourcesSpec, dump

# The Kubernetes quantity grammar (k8s.io/apimachinery/pkg/api/resource), signs included so
# that a negative value is reported as negative rather than as malformed.
_QUANTITY = re.compile(
    r"^(?P<sign>[+-]?)(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)

RUN_FROZEN_FIELDS = ("spec.model", "spec.data", "spec.artifacts", "spec.image")
TERMINAL_STATES = ("Succeeded", "Failed")


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


def stage_enabled(spec: FineTuneRunSpec, stage: str) -> bool:
    """A stage runs when it is listed in spec.stages and not disabled."""
    settings = getattr(spec.stages, stage)
    return settings is not None and settings.enabled


def trains_reward_model(spec: FineTuneRunSpec) -> bool:
    """The reward stage has a pod only when it is enabled and has preference data."""
    return stage_enabled(spec, "reward") and spec.data.preferences is not None


def reward_functions(spec: FineTuneRunSpec) -> list[Any]:
    return list(spec.stages.reward.functions) if spec.stages.reward is not None else []


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
            "(operator flag --max-gpus-per-stage)",
        ))
    errors += _check_quantity(f"{prefix}.cpu", resources.cpu)
    errors += _check_quantity(f"{prefix}.memory", resources.memory)
    return errors


def check_semantics(
    spec: FineTuneRunSpec, *, max_gpus_per_stage: int | None, default_image: str | None
) -> list[FieldError]:
    """Rules across fields that a schema cannot express."""
    errors: list[FieldError] = []
    enabled = [stage for stage in STAGES if stage_enabled(spec, stage)]
    if not enabled:
        errors.append(FieldError("spec.stages", "no stage is enabled; list at least one of sft, reward, ppo"))

    if "sft" in enabled and spec.data.sft is None:
        errors.append(FieldError(
            "spec.data.sft", "required because spec.stages.sft is enabled (or set spec.stages.sft.enabled: false)"))
    if "reward" in enabled and spec.data.preferences is None and not reward_functions(spec):
        errors.append(FieldError(
            "spec.data.preferences",
            "required because spec.stages.reward is enabled without functions: set spec.data.preferences "
            "to train a reward model, or spec.stages.reward.functions",
        ))
    if "ppo" in enabled:
        if spec.data.prompts is None:
            errors.append(FieldError(
                "spec.data.prompts",
                "required because spec.stages.ppo is enabled (or set spec.stages.ppo.enabled: false)"))
        if not trains_reward_model(spec) and not reward_functions(spec):
            errors.append(FieldError(
                "spec.stages.ppo",
                "PPO has no reward: enable spec.stages.reward with spec.data.preferences to train a "
                "reward model, or set spec.stages.reward.functions",
            ))

    errors += _check_resources("spec.resources", spec.resources, max_gpus_per_stage)
    for stage in STAGES:
        settings = getattr(spec.stages, stage)
        if settings is not None:
            errors += _check_resources(f"spec.stages.{stage}.resources", settings.resources, max_gpus_per_stage)

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


def _digest_of(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def field_digest(spec: FineTuneRunSpec, field: str) -> str:
    """Digest of one frozen field (``spec.model`` ... or ``spec.stages.<stage>`` without its resources)."""
    name = field.removeprefix("spec.")
    if name.startswith("stages."):
        settings = getattr(spec.stages, name.removeprefix("stages."))
        value = None if settings is None else settings.model_dump(
            mode="json", by_alias=True, exclude={"resources"})
    else:
        attribute = getattr(spec, name)
        value = dump(attribute) if hasattr(attribute, "model_dump") else attribute
    return _digest_of(value)


def is_active(status: FineTuneRunStatus) -> bool:
    """Started and not finished."""
    return status.start_time is not None and status.state not in TERMINAL_STATES


def frozen_fields(status: FineTuneRunStatus) -> list[str]:
    """The spec fields that may not change now, given the run's status."""
    if not is_active(status):
        return []
    fields = list(RUN_FROZEN_FIELDS)
    for stage in STAGES:
        current = getattr(status.stages, stage)
        if current is not None and current.state not in ("Pending", "Skipped"):
            fields.append(f"spec.stages.{stage}")
    return fields


def _immutable_error(field: str) -> FieldError:
    return FieldError(field, "cannot change while the run is active; wait for it to finish or create a new FineTuneRun")


def check_update(
    old: FineTuneRunSpec, new: FineTuneRunSpec, old_status: FineTuneRunStatus
) -> list[FieldError]:
    """Errors for frozen fields that differ between the old and the new spec (admission UPDATE)."""
    return [
        _immutable_error(field)
        for field in frozen_fields(old_status)
        if field_digest(old, field) != field_digest(new, field)
    ]


def check_recorded_digests(spec: FineTuneRunSpec, status: FineTuneRunStatus) -> list[FieldError]:
    """The reconciler's fallback: frozen fields whose digest differs from the one recorded at start."""
    if not is_active(status):
        return []
    return [
        _immutable_error(field)
        for field, recorded in sorted(status.spec_digests.items())
        if field_digest(spec, field) != recorded
    ]


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
