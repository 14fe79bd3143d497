"""Two operator replicas never act at once: leader election on a Lease."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from ftoperator import leadership
from ftoperator.election import LeaderElector

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def step(current, identity, seconds=0):
    return leadership.next_step(current, identity=identity, namespace="ops", now=T0 + timedelta(seconds=seconds),
                                duration_seconds=15)


def test_the_first_replica_creates_the_lease_and_the_second_waits_while_it_is_renewed():
    first = step(None, "a")
    assert first.action == "create" and first.lease["spec"]["holderIdentity"] == "a"
    assert step(first.lease, "b", seconds=14).action == "wait"
    renewed = step(first.lease, "a", seconds=10)
    assert renewed.action == "replace" and renewed.lease["spec"]["renewTime"].startswith("2025-01-01T12:00:10")
    assert step(renewed.lease, "b", seconds=24).action == "wait"


def test_a_lease_not_renewed_for_its_duration_is_taken_over_and_counted():
    lease = step(None, "a").lease
    taken = step(lease, "b", seconds=16)
    assert taken.action == "replace"
    assert taken.lease["spec"]["holderIdentity"] == "b" and taken.lease["spec"]["leaseTransitions"] == 1


def test_a_released_lease_is_taken_at_once():
    lease = leadership.released(step(None, "a").lease, identity="a")
    assert step(lease, "b", seconds=1).action == "replace"
    assert leadership.released(lease, identity="someone-else") is None


class FakeLeaseApi:
    """One Lease with optimistic concurrency: a write must carry the resourceVersion last read."""

    def __init__(self):
        self.lease = None
        self.version = 0
        self.failing = False

    def get_object(self, kind, namespace, name):
        if self.failing:
            raise OSError("API server unreachable")
        return copy.deepcopy(self.lease)

    def create(self, obj):
        if self.lease is not None:
            return False
        self.version += 1
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
        return True

    def replace(self, obj):
        if obj["metadata"].get("resourceVersion") != str(self.version):
            return False
        self.version += 1
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
        return True


def test_of_two_replicas_racing_for_an_expired_lease_only_one_wins():
    api = FakeLeaseApi()
    now = [T0]
    a = LeaderElector(api, namespace="ops", identity="a", clock=lambda: now[0])
    b = LeaderElector(api, namespace="ops", identity="b", clock=lambda: now[0])
    assert a.try_once() and not b.try_once()
    now[0] = T0 + timedelta(seconds=30)  # a stopped renewing
    # Both read the expired Lease, then both write: the second write carries a stale resourceVersion.
    read = api.get_object("Lease", "ops", "finetune-operator")
    steps = [leadership.next_step(read, identity=who, namespace="ops", now=now[0], duration_seconds=15)
             for who in ("a", "b")]
    assert [api.replace(s.lease) for s in reversed(steps)] == [True, False]
    assert api.lease["spec"]["holderIdentity"] == "b"


def test_a_leader_that_cannot_renew_before_its_lease_expires_gives_up():
    api = FakeLeaseApi()
    lost = []
    elector = LeaderElector(api, namespace="ops", identity="a", duration_seconds=1, on_lost=lambda: lost.append(1))
    assert elector.try_once()
    api.failing = True
    elector._renew()  # returns once it gave up
    assert lost == [1]
