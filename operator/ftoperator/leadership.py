"""Who leads: the pure rules of leader election on a coordination.k8s.io/v1 Lease.

Two operator replicas must never reconcile at once (two writers per run would
race on pods and status). The replica holding the Lease runs; the other waits.
The rules are client-go's (k8s.io/client-go/tools/leaderelection): the holder
renews the Lease every few seconds; anyone may take it once ``renewTime`` is
older than ``leaseDurationSeconds``. Writes carry the ``resourceVersion`` that
was read, so of two replicas taking an expired Lease at once the API server
lets only one win (the other gets 409 Conflict). Time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

LEASE_NAME = "finetune-operator"


def micro_time(moment: datetime) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class LeaseStep:
    """What to do with the Lease now: ``create`` or ``replace`` it with ``lease``, or ``wait``."""

    action: str
    lease: dict[str, Any] | None = None
    holder: str | None = None
    """The current holder when waiting."""


def next_step(current: dict[str, Any] | None, *, identity: str, namespace: str, now: datetime,
              duration_seconds: int, name: str = LEASE_NAME) -> LeaseStep:
    """Acquire, renew or wait, given the Lease as read (None: there is none)."""
    stamp = micro_time(now)
    if current is None:
        return LeaseStep("create", {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"holderIdentity": identity, "leaseDurationSeconds": duration_seconds,
                     "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0},
        })
    spec = dict(current.get("spec") or {})
    holder = spec.get("holderIdentity") or None
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    held_for = timedelta(seconds=spec.get("leaseDurationSeconds") or duration_seconds)
    if holder not in (None, identity) and renewed is not None and now < renewed + held_for:
        return LeaseStep("wait", holder=holder)
    if holder != identity:  # free, or its holder stopped renewing: take it over
        spec["acquireTime"] = stamp
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
    spec.update(holderIdentity=identity, leaseDurationSeconds=duration_seconds, renewTime=stamp)
    lease = {**current, "spec": spec}
    return LeaseStep("replace", lease)


def released(current: dict[str, Any], *, identity: str) -> dict[str, Any] | None:
    """The Lease given up by ``identity`` on a clean shutdown (the standby takes it at once), or None
    when ``identity`` does not hold it."""
    spec = dict(current.get("spec") or {})
    if spec.get("holderIdentity") != identity:
        return None
    spec.update(holderIdentity=None, leaseDurationSeconds=1)
    return {**current, "spec": spec}
