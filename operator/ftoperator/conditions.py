"""metav1.Condition helpers and RFC 3339 timestamps; pure, the time is passed in."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from ftoperator.api import Condition

SUCCEEDED = "Succeeded"
"""Summary: Unknown while the run is in progress, True when all stages succeeded, False when it failed."""
RUNNING = "Running"
WAITING_FOR_RESOURCES = "WaitingForResources"
SUSPENDED = "Suspended"
FAILED = "Failed"
CONDITION_TYPES = (SUCCEEDED, RUNNING, WAITING_FOR_RESOURCES, SUSPENDED, FAILED)

Status = Literal["True", "False", "Unknown"]


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """Inverse of ``timestamp``; also accepts fractional seconds and offsets."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.status == "True"


def set_condition(
    conditions: list[Condition],
    *,
    type_: str,
    status: Status,
    reason: str,
    message: str | None = None,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """A new list with condition ``type_`` set; lastTransitionTime moves only when status changes.

    The order of existing conditions is kept; a new type is appended. An empty message is
    left out (the local API server reads "" in a custom resource as null and rejects it).
    """
    message = message or None
    result: list[Condition] = []
    replaced = False
    for current in conditions:
        if current.type != type_:
            result.append(current)
            continue
        replaced = True
        transition = current.last_transition_time if current.status == status else timestamp(now)
        result.append(Condition(type=type_, status=status, reason=reason, message=message,
                                last_transition_time=transition, observed_generation=generation))
    if not replaced:
        result.append(Condition(type=type_, status=status, reason=reason, message=message,
                                last_transition_time=timestamp(now), observed_generation=generation))
    return result
