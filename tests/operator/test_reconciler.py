"""Fetch -> decide -> apply with a fake API: the order that makes restarts safe, and minimal patches."""

from __future__ import annotations

import copy

import pytest

from ftoperator.config import OperatorConfig
from ftoperator.metrics import OperatorMetrics
from ftoperator.mergepatch import apply
from ftoperator.reconciler import ChildConflict, RunReconciler


class FakeApi:
    """Records calls in order; keeps one run, a list of raw pods, and the other objects by (kind, name)."""

    def __init__(self, run, pods=()):
        self.run = run
        self.pods = list(pods)
        self.calls = []
        self.objects = {}

    def get_run(self, namespace, name):
        self.calls.append(("get", name))
        return copy.deepcopy(self.run)

    def list_pods(self, namespace, *, label_selector):
        self.calls.append(("list", label_selector))
        return copy.deepcopy(self.pods)

    def list_objects(self, kind, namespace, *, label_selector):
        self.calls.append(("list", kind))
        return [copy.deepcopy(obj) for (k, _), obj in self.objects.items() if k == kind]

    def get_object(self, kind, namespace, name):
        self.calls.append(("get", kind, name))
        return copy.deepcopy(self.objects.get((kind, name)))

    def create(self, obj):
        key = (obj["kind"], obj["metadata"]["name"])
        self.calls.append(("create",) + key)
        if key in self.objects:
            return False
        self.objects[key] = copy.deepcopy(obj)
        return True

    def delete_pod(self, namespace, name, *, force=False):
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
    assert kinds[:2] == ["get", "list"] and "create" not in kinds[:6]  # run, pods, then the other children
    assert kinds.index("patch") > max(i for i, kind in enumerate(kinds) if kind == "create")
    assert kinds[-1] == "event"
    assert ("create", "Pod", "demo-sft-1") in api.calls


def test_a_second_pass_with_nothing_new_sends_no_patch_and_creates_nothing(spec, now):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": spec})
    reconciler(api, now).reconcile("ns", "demo")
    api.calls.clear()
    api.pods = [api.objects.pop(("Pod", "demo-sft-1")) | {"status": {"phase": "Pending"}}]
    reconciler(api, now).reconcile("ns", "demo")
    api.calls.clear()
    reconciler(api, now).reconcile("ns", "demo")
    assert [call[0] for call in api.calls] == ["get", "list", "list", "get", "get", "get"]


def test_gone_or_deleting_run_is_left_alone(spec, now):
    api = FakeApi(None)
    assert reconciler(api, now).reconcile("ns", "demo") is None
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1",
                                "deletionTimestamp": "2025-01-01T00:00:00Z"}, "spec": spec})
    assert reconciler(api, now).reconcile("ns", "demo") is None
    assert [call[0] for call in api.calls] == ["get"]


def progress_config_map(name="demo-progress", uid="u1", text='{"current": "sft", "stages": {"sft": {"step": 2, '
                        '"totalSteps": 4}}}'):
    return {"metadata": {"name": name, "namespace": "ns",
                         "ownerReferences": [{"kind": "FineTuneRun", "name": "demo", "uid": uid, "controller": True}]},
            "data": {"progress.json": text}}


def test_progress_is_copied_as_a_patch_of_progress_fields_only(now):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1"}, "status": {"state": "Running"}})
    copied = reconciler(api, now).copy_progress("ns", "demo", progress_config_map())
    assert copied
    assert api.calls == [("get", "demo"), ("patch", ("progress", "stages"))]
    assert api.run["status"]["progress"] == "sft 2/4" and api.run["status"]["state"] == "Running"


@pytest.mark.parametrize("config_map", [
    # Another run's pod rewrote its own ConfigMap's owner reference to point at "demo" (name and uid):
    # the ConfigMap's name, which the pod cannot change, is not demo's progress ConfigMap.
    progress_config_map(name="other-progress"),
    # The reference names "demo" but with the uid of a deleted run of that name.
    progress_config_map(uid="u-old"),
])
def test_progress_is_matched_to_its_run_by_uid_and_name_not_by_the_owner_reference_alone(now, config_map):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1"}, "status": {"state": "Running"}})
    assert not reconciler(api, now).copy_progress("ns", "demo", config_map)
    assert [call[0] for call in api.calls] == ["get"]
    assert "progress" not in api.run["status"]


def run_object(spec, uid="u2"):
    return {"metadata": {"name": "demo", "namespace": "ns", "uid": uid, "generation": 1}, "spec": spec}


def left_by_an_earlier_run(kind, name, uid="u1"):
    return {"kind": kind, "metadata": {"name": name, "ownerReferences": [{"uid": uid, "controller": True}]}}


def test_a_recreated_run_waits_for_the_earlier_runs_service_account_instead_of_counting_it_as_created(spec, now):
    api = FakeApi(run_object(spec))
    api.objects[("ServiceAccount", "demo-trainer")] = left_by_an_earlier_run("ServiceAccount", "demo-trainer")
    decision = reconciler(api, now).reconcile("ns", "demo")
    assert not [call for call in api.calls if call[0] == "create"]
    assert decision.requeue_after is not None
    assert "ServiceAccount demo-trainer belongs to another owner (uid u1)" in api.run["status"]["message"]

    del api.objects[("ServiceAccount", "demo-trainer")]  # garbage-collected
    reconciler(api, now).reconcile("ns", "demo")
    assert api.objects[("ServiceAccount", "demo-trainer")]["metadata"]["ownerReferences"][0]["uid"] == "u2"
    assert ("Pod", "demo-sft-1") in api.objects


def test_a_409_for_an_object_the_run_does_not_own_ends_the_pass_before_the_pod_and_the_status(spec, now):
    api = FakeApi(run_object(spec))
    # Not seen when the children were read (no run label), but there when the create is sent.
    api.list_objects = lambda kind, namespace, *, label_selector: []
    api.objects[("ConfigMap", "demo-progress")] = {"kind": "ConfigMap", "metadata": {"name": "demo-progress"}}
    with pytest.raises(ChildConflict, match="ns/demo: ConfigMap demo-progress exists but is not owned by this run"):
        reconciler(api, now).reconcile("ns", "demo")
    assert ("Pod", "demo-sft-1") not in api.objects
    assert not [call for call in api.calls if call[0] == "patch"]


def test_a_refused_create_is_recorded_in_the_status_and_an_event_instead_of_raising(spec, now):
    from ftoperator.kubeapi import ApiError

    class QuotaApi(FakeApi):
        def create(self, obj):
            if obj["kind"] == "Pod":
                self.calls.append(("create", "Pod", obj["metadata"]["name"]))
                raise ApiError(403, 'pods "demo-sft-1" is forbidden: exceeded quota: compute')
            return super().create(obj)

    api = QuotaApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": spec})
    decision = reconciler(api, now).reconcile("ns", "demo")
    status = api.run["status"]
    assert status["failedCreate"]["code"] == 403 and "exceeded quota" in status["failedCreate"]["message"]
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["reason"] == "FailedCreate" and "exceeded quota" in succeeded["message"]
    assert ("event", "FailedCreate") in api.calls and ("event", "StageStarted") not in api.calls
    assert status["stages"]["sft"]["attempts"] == 0
    assert decision.requeue_after == 10


def test_status_fields_unknown_to_this_operator_survive_a_pass(spec, now):
    api = FakeApi({"metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": spec,
                   "status": {"fromANewerOperator": "keep me"}})
    reconciler(api, now).reconcile("ns", "demo")
    assert api.run["status"]["fromANewerOperator"] == "keep me"
    assert api.run["status"]["state"] == "Pending"
