"""Fetch -> decide -> apply with a fake API: the order that makes restarts safe, and minimal patches."""

from __future__ import annotations

import copy

from ftoperator.config import OperatorConfig
from ftoperator.metrics import OperatorMetrics
from ftoperator.mergepatch import apply
from ftoperator.reconciler import RunReconciler


class FakeApi:
    """Records calls in order; keeps one run and a list of raw pods."""

    def __init__(self, run, pods=()):
        self.run = run
        self.pods = list(pods)
        self.calls = []
        self.existing = set()

    def get_run(self, namespace, name):
        self.calls.append(("get", name))
        return copy.deepcopy(self.run)

    def list_pods(self, namespace, *, label_selector, owner_uid=None):
        self.calls.append(("list", label_selector))
        return copy.deepcopy(self.pods)

    def create(self, obj):
        key = (obj["kind"], obj["metadata"]["name"])
        self.calls.append(("create",) + key)
        if key in self.existing:
            return False
        self.existing.add(key)
        return True

    def delete_pod(self, namespace, name):
        self.calls.append(("delete", name))
        return True

    def patch_run_status(self, namespace, name, patch):
        self.calls.append(("patch", tuple(sorted(patch))))
        self.run["status"] = apply(self.run.get("status") or {}, patch)
        return self.run

    def post_event(self, run, *, type_, reason, message, now):
        self.calls.append(("event", reason))


def reconciler(api, now):
    return RunReconciler(api=api, config=OperatorConfig(trainer_image="t"), metrics=OperatorMetrics(),
                         clock=lambda: now())


def test_objects_are_created_before_the_status_that_records_them_and_events_come_last(spec, now):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": spec})
    reconciler(api, now).reconcile("ns", "demo")
    kinds = [call[0] for call in api.calls]
    assert kinds[:2] == ["get", "list"]
    assert kinds.index("patch") > max(i for i, kind in enumerate(kinds) if kind == "create")
    assert kinds[-1] == "event"
    assert ("create", "Pod", "demo-sft-1") in api.calls


def test_a_second_pass_with_nothing_new_sends_no_patch_and_creates_nothing(spec, now):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": spec})
    reconciler(api, now).reconcile("ns", "demo")
    api.calls.clear()
    api.pods = [{"metadata": {"name": "demo-sft-1", "labels": {"finetune.dev/stage": "sft",
                                                               "finetune.dev/attempt": "1"}},
                 "status": {"phase": "Pending"}}]
    reconciler(api, now).reconcile("ns", "demo")
    api.calls.clear()
    reconciler(api, now).reconcile("ns", "demo")
    assert [call[0] for call in api.calls] == ["get", "list"]


def test_gone_or_deleting_run_is_left_alone(spec, now):
    api = FakeApi(None)
    assert reconciler(api, now).reconcile("ns", "demo") is None
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1",
                                "deletionTimestamp": "2025-01-01T00:00:00Z"}, "spec": spec})
    assert reconciler(api, now).reconcile("ns", "demo") is None
    assert [call[0] for call in api.calls] == ["get"]


def test_progress_is_copied_as_a_patch_of_progress_fields_only(now):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1"}, "status": {"state": "Running"}})
    copied = reconciler(api, now).copy_progress("ns", "demo", {"progress.json": '{"current": "sft", "stages": '
                                                              '{"sft": {"step": 2, "totalSteps": 4}}}'})
    assert copied
    assert api.calls == [("patch", ("progress", "stages"))]
    assert api.run["status"]["progress"] == "sft 2/4" and api.run["status"]["state"] == "Running"
