"""The local control plane: API answers, CRDs with printer columns, scheduling, GC."""

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from localcluster.cluster import Cluster
from localcluster.images import OPERATOR_IMAGE
from localcluster.polling import wait_for, wait_for_crd

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.localcluster.example.com
spec:
  group: localcluster.example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer}
                label: {type: string}
                enabled: {type: boolean}
      additionalPrinterColumns:
        - {name: Size, type: integer, jsonPath: .spec.size}
"""


@pytest.fixture(scope="module")
def namespace(kube_cluster):
    name = f"lc-cp-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(kube_cluster.api_client())
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name),
             timeout=30, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


def sleeping_pod(name: str, *, gpus: int = 0, owner=None) -> dict:
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                # An image the real node has (built locally; nothing can be pulled).
                "name": "main", "image": OPERATOR_IMAGE, "imagePullPolicy": "Never",
                "command": ["python", "-c", "import time; time.sleep(600)"],
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {},
            }],
        },
    }
    if owner is not None:
        pod["metadata"]["ownerReferences"] = [owner]
    return pod


def test_api_server_answers_and_node_is_ready_with_gpus(kube_cluster):
    nodes = json.loads(kube_cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert nodes, "expected at least one node"
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"
        assert "nvidia.com/gpu" in node["status"]["allocatable"]


def test_crd_applies_and_kubectl_shows_its_printer_columns(kube_cluster, namespace):
    kube_cluster.kubectl("apply", "-f", "-", input=CRD)
    wait_for_crd(kube_cluster, "widgets.localcluster.example.com")
    widget = ("apiVersion: localcluster.example.com/v1\nkind: Widget\n"
              "metadata: {name: w1}\nspec: {size: 42}\n")
    # Discovery of a fresh CRD can lag a moment behind Established.
    wait_for(lambda: kube_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget,
                                          check=False).returncode == 0,
             timeout=20, what="Widget w1 to be created")
    table = kube_cluster.kubectl("get", "widgets", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "SIZE"]
    assert row.split()[:2] == ["w1", "42"]


def test_zero_values_in_a_custom_resource_are_stored_not_refused_as_null(kube_cluster, namespace):
    """An empty string (and 0, false) is a value, not null: a real 1.20 API server stores it. Built with a Go
    newer than 1.15 without the upstream fix (kubernetes#99804, build.SOURCE_FIXES), ours refused "" as
    'must be of type string: "null"', and with it a PreferenceLabel of an empty response."""
    kube_cluster.kubectl("apply", "-f", "-", input=CRD)
    wait_for_crd(kube_cluster, "widgets.localcluster.example.com")
    widget = ("apiVersion: localcluster.example.com/v1\nkind: Widget\n"
              "metadata: {name: zero}\nspec: {size: 0, label: '', enabled: false}\n")

    def create():  # None while discovery of the fresh CRD lags behind Established
        result = kube_cluster.kubectl("create", "-n", namespace, "-o", "json", "-f", "-", input=widget, check=False)
        return None if "no matches for kind" in result.stderr else result

    created = wait_for(create, timeout=20, what="Widget zero to be answered")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["spec"] == {"size": 0, "label": "", "enabled": False}


def test_pod_asking_more_gpus_than_any_node_stays_pending_unschedulable(kube_cluster, namespace):
    core = client.CoreV1Api(kube_cluster.api_client())
    core.create_namespaced_pod(namespace, sleeping_pod("too-many-gpus", gpus=3))

    def unschedulable():
        pod = core.read_namespaced_pod("too-many-gpus", namespace)
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False":
                return pod, condition
        return None

    pod, condition = wait_for(unschedulable, timeout=30, what="PodScheduled=False")
    assert pod.status.phase == "Pending"
    assert condition.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in condition.message


def test_deleting_owner_garbage_collects_the_owned_pod(kube_cluster, namespace):
    core = client.CoreV1Api(kube_cluster.api_client())
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                 "uid": owner.metadata.uid, "blockOwnerDeletion": True}
    core.create_namespaced_pod(namespace, sleeping_pod("owned", owner=reference))
    wait_for(lambda: core.read_namespaced_pod("owned", namespace).status.phase == "Running",
             timeout=30, what="owned pod Running")

    core.delete_namespaced_config_map("owner", namespace)

    def gone():
        try:
            core.read_namespaced_pod("owned", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    # The garbage collector's graph builder can take tens of seconds to sync on a loaded 2-core machine.
    assert wait_for(gone, timeout=150, what="garbage collection of the owned pod") is True  # 404: collected


def test_a_second_cluster_runs_beside_the_first(kube_cluster):
    # Every component listens on a free loopback port, so nothing collides; the
    # machine has one real node (the session's), so the second runs the node agent.
    with Cluster(runtime="agent", log=lambda message: None) as second:
        assert second.server != kube_cluster.server
        for cluster in (kube_cluster, second):
            nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            assert [n["metadata"]["name"] for n in nodes] == ["local-gpu-0"]
