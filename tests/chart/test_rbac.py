"""The chart grants exactly the API calls the operator makes, and users get FineTuneRuns with edit/view.

The operator's requests are recorded, not listed by hand: a reconcile pass that creates
everything, a pass that deletes a pod, a progress copy, an event, and leader election run
against a fake HTTP layer under ``kubeapi.KubeApi``; each request maps to a (group, resource,
verb). They must all be in ``ftoperator.permissions`` (which adds kopf's watches), and the
chart's rules must be that list -- no more, no less.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from chartlib import CHART, NAMESPACE, helm_template

from ftoperator import permissions
from ftoperator.builders import RunRef, stage_pod
from ftoperator.config import OperatorConfig
from ftoperator.election import LeaderElector
from ftoperator.kubeapi import KubeApi, permission_of
from ftoperator.metrics import OperatorMetrics
from ftoperator.reconciler import ChildConflict, RunReconciler
from ftoperator.validation import parse_spec

SPEC = {"model": {"source": "pvc://models/base"}, "data": {"sft": "pvc://datasets/sft.jsonl"},
        "stages": {"sft": {}}, "artifacts": {"pvc": "runs"}, "image": "trainer:1",
        "activeDeadlineSeconds": 1}


class Response:
    def __init__(self, status, body):
        self.status, self._body = status, json.dumps(body).encode()

    def read(self):
        return self._body


class RecordingClient:
    """Stands in for kubernetes.client.ApiClient: answers from a tiny in-memory store, records requests."""

    def __init__(self, run):
        self.run = run
        self.requests = []
        self.pods = []
        self.conflicts = False

    def param_serialize(self, *, method, resource_path, query_params, header_params, body, auth_settings):
        return method, resource_path, header_params, body, None

    def call_api(self, method, url, *, header_params, body, _request_timeout):
        self.requests.append((method, url))
        if "/finetuneruns/" in url:
            return Response(200, self.run)
        if method == "GET":
            if permission_of(method, url)[2] == "list":
                return Response(200, {"items": self.pods if url.endswith("/pods") else []})
            return Response(404, {"message": "not found"})  # named objects: none exist yet
        if method == "POST" and self.conflicts and url.endswith(("/pods", "/services", "/podgroups")):
            return Response(409, {"message": "already exists"})
        return Response(201 if method == "POST" else 200, body or {})


def recorded_permissions():
    run = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneRun",
           "metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": SPEC}
    client = RecordingClient(run)
    api = KubeApi(client)
    reconciler = RunReconciler(api=api, config=OperatorConfig(trainer_image="t"), metrics=OperatorMetrics(),
                               clock=lambda: datetime(2025, 1, 1, tzinfo=timezone.utc))
    reconciler.reconcile("ns", "demo")  # creates everything, posts events
    # A later pass past the deadline deletes the running pod.
    spec, _ = parse_spec(SPEC)
    pod = stage_pod(spec, run=RunRef("demo", "ns", "u1"), stage="sft", attempt=1, config=reconciler.config)
    client.pods = [{**pod, "status": {"phase": "Running"}}]
    client.run = {**run, "status": {"state": "Running", "startTime": "2024-01-01T00:00:00Z",
                                    "activeSince": "2024-01-01T00:00:00Z",
                                    "stages": {"sft": {"state": "Running", "attempts": 1, "pod": "demo-sft-1"}}}}
    reconciler.reconcile("ns", "demo")
    reconciler.copy_progress("ns", "demo", {
        "metadata": {"name": "demo-progress", "namespace": "ns",
                     "ownerReferences": [{"uid": "u1", "controller": True}]},
        "data": {"progress.json": '{"current": "sft", "stages": {"sft": {"step": 1}}}'}})
    # A run with human-feedback rounds counts its PreferenceLabels on every pass.
    client.run = {**run, "spec": {**SPEC, "humanFeedback": {"labelsNeeded": 4}}}
    reconciler.reconcile("ns", "demo")
    # A create that answers 409 makes the operator read the existing pod to see whose it is.
    client.run, client.pods, client.conflicts = run, [], True
    with pytest.raises(ChildConflict):
        reconciler.reconcile("ns", "demo")
    # A stage on two pods creates its rendezvous Service first; a 409 makes the operator read it.
    client.run = {**run, "spec": {**SPEC, "resources": {"nodes": 2}}}
    with pytest.raises(ChildConflict):
        reconciler.reconcile("ns", "demo")
    # With a pod-group scheduler its PodGroup comes first; a 409 makes the operator read it.
    for scheduler in ("coscheduling", "volcano"):
        client.run = {**run, "spec": {**SPEC, "resources": {"nodes": 2}, "podTemplate": {"schedulerName": "x"},
                                      "distributed": {"gangScheduler": scheduler}}}
        with pytest.raises(ChildConflict):
            reconciler.reconcile("ns", "demo")
    elector = LeaderElector(api, namespace=NAMESPACE, identity="a")
    elector.try_once()
    client.requests.append(("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/finetune-operator"))
    return {permission_of(method, url.split("?")[0]) for method, url in client.requests}


def granted(rules):
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_every_request_the_operator_makes_is_a_listed_permission():
    made = recorded_permissions()
    listed = set(permissions.NAMESPACED) | set(permissions.LEADER_ELECTION)
    assert made <= listed, sorted(made - listed)
    # Most of the list is exercised here; the rest is kopf's (watches, finalizer removal) or admission's.
    kopf_or_admission = {p for p, why in {**permissions.NAMESPACED, **permissions.LEADER_ELECTION}.items()
                         if "kopf" in why or "admission" in why or "RBAC" in why}
    assert listed - made <= kopf_or_admission, sorted(listed - made - kopf_or_admission)


def test_the_chart_grants_exactly_the_listed_permissions(helm):
    rendered = helm_template(helm)
    (operator_role,) = [r for r in rendered.of_kind("ClusterRole") if r["metadata"]["name"] == f"{NAMESPACE}-ft-finetune-operator"]
    assert granted(operator_role["rules"]) == set(permissions.NAMESPACED) | set(permissions.CLUSTER)
    (election,) = rendered.of_kind("Role")
    assert election["metadata"]["namespace"] == NAMESPACE
    assert granted(election["rules"]) == set(permissions.LEADER_ELECTION)
    binding = [b for b in rendered.of_kind("RoleBinding") if b["roleRef"]["name"] == election["metadata"]["name"]]
    assert binding and binding[0]["subjects"][0]["name"] == "ft-finetune-operator"


def test_namespace_scope_grants_the_same_in_each_watched_namespace(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "namespace-scoped-values.yaml"])
    for role in rendered.of_kind("Role"):
        expected = permissions.LEADER_ELECTION if role["metadata"]["name"].endswith("-leader-election") \
            else permissions.NAMESPACED
        assert granted(role["rules"]) == set(expected), role["metadata"]


def test_namespace_users_with_edit_create_runs_and_with_view_read_them(helm):
    rendered = helm_template(helm)
    roles = {r["metadata"]["name"]: r for r in rendered.of_kind("ClusterRole")}
    edit, view = roles[f"{NAMESPACE}-ft-finetune-operator-edit"], roles[f"{NAMESPACE}-ft-finetune-operator-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert {("finetune.dev", "finetuneruns", v) for v in ("create", "delete", "patch", "update", "get")} \
        <= granted(edit["rules"])
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert granted(view["rules"]) == {("finetune.dev", r, v) for r in ("finetuneruns", "finetuneruns/status")
                                      for v in ("get", "list", "watch")}
    # Nobody gets to write a run's status but the operator.
    assert not {p for p in granted(edit["rules"]) if p[1] == "finetuneruns/status" and p[2] not in
                ("get", "list", "watch")}
    off = helm_template(helm, set_values={"rbac.aggregateToDefaultRoles": False})
    assert {r["metadata"]["name"] for r in off.of_kind("ClusterRole")} == {f"{NAMESPACE}-ft-finetune-operator"}
