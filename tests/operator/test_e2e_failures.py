"""End to end on the real node: what a real cluster does to stage pods, and what the run then shows.

The kernel OOM-kills a trainer over its memory limit, an image cannot be pulled, the Eviction API removes a
running pod, a ResourceQuota refuses the pod, the Pod API's rules refuse a toleration at apply. Each test
asserts what ``kubectl get finetuneruns`` / the status / the events say and how the run ends. The operator
runs with short timeouts (image pull) so the tests finish in minutes; docs/operator.md has the table these
cases come from.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_e2e_operator import (  # noqa: E402, F401  (api, namespace: pytest fixtures, used by name)
    api, apply, condition, event_reasons, events, namespace, ppo_only, running_operator, status_of, wait_for,
    wait_state,
)

pytestmark = pytest.mark.cluster

IMAGE_PULL_TIMEOUT_SECONDS = 20
STUCK_TERMINATING_SECONDS = 10


@pytest.fixture(scope="module")
def operator(kube_cluster, tmp_path_factory):
    with running_operator(kube_cluster, tmp_path_factory.mktemp("operator"),
                          "--image-pull-timeout-seconds", str(IMAGE_PULL_TIMEOUT_SECONDS),
                          "--stuck-terminating-seconds", str(STUCK_TERMINATING_SECONDS)) as process:
        yield process


def columns(kube_cluster, namespace: str, name: str) -> list[str]:
    return kube_cluster.kubectl("get", "ftr", name, "-n", namespace, "--no-headers").stdout.split()


def stage_status(api, namespace: str, name: str, stage: str) -> dict:
    return (status_of(api, namespace, name).get("stages") or {}).get(stage) or {}


def event_messages(kube_cluster, namespace: str, name: str, reason: str) -> list[str]:
    return [e.get("message", "") for e in events(kube_cluster, namespace, name) if e["reason"] == reason]


def test_oomkilled_is_reported_plainly_and_the_next_attempt_uses_the_new_memory(kube_cluster, api, namespace,
                                                                                 operator):
    run = ppo_only("oom", steps=4)
    run["spec"]["resources"] = {"cpu": "1", "memory": "256Mi"}  # torch + transformers alone need more
    apply(kube_cluster, namespace, run)

    def oom_recorded():
        failure = stage_status(api, namespace, "oom", "ppo").get("lastFailure") or {}
        return failure if failure.get("reason") == "OOMKilled" else None

    failure = wait_for("the OOMKilled attempt to be recorded", oom_recorded, timeout=180)
    for pod in api.list_pods(namespace, label_selector="finetune.dev/run=oom"):  # a figure for the notes
        for container in pod["status"].get("containerStatuses") or []:
            if (container["state"].get("terminated") or {}).get("reason") == "OOMKilled":
                print(f"{pod['metadata']['name']} OOMKilled at {container['state']['terminated']['finishedAt']}; "
                      f"visible in the run's status by {time.strftime('%H:%M:%S', time.gmtime())}")
    assert failure["exitCode"] == 137
    ppo = stage_status(api, namespace, "oom", "ppo")
    assert ppo["state"] in ("BackingOff", "Running", "Pending", "Starting") and ppo["failures"] >= 1
    retrying = " ".join(event_messages(kube_cluster, namespace, "oom", "StageRetrying"))
    assert "OOMKilled: pod oom-ppo-1 ran out of memory (limit 256Mi" in retrying
    assert "raise spec.resources.memory" in retrying

    kube_cluster.kubectl("patch", "ftr", "oom", "-n", namespace, "--type=merge",
                         "-p", '{"spec":{"resources":{"memory":"2Gi"}}}')
    status = wait_state(api, namespace, "oom", "Succeeded", "Failed", timeout=300)
    assert status["state"] == "Succeeded", status.get("message")
    last_pod = status["stages"]["ppo"]["pod"]
    limits = api.list_pods(namespace, label_selector="finetune.dev/run=oom")
    (final,) = [p for p in limits if p["metadata"]["name"] == last_pod]
    assert final["spec"]["containers"][0]["resources"]["limits"]["memory"] == "2Gi"


def test_an_image_that_cannot_be_pulled_shows_the_image_then_fails_the_stage(kube_cluster, api, namespace, operator):
    run = ppo_only("noimage", steps=4)
    run["spec"]["image"] = "localhost/finetune-no-such-image:1"
    apply(kube_cluster, namespace, run)

    def waiting_on_pull():
        message = stage_status(api, namespace, "noimage", "ppo").get("message") or ""
        return message if "cannot pull image localhost/finetune-no-such-image:1" in message else None

    wait_for("the pull failure in the stage status", waiting_on_pull, timeout=120)
    status = wait_state(api, namespace, "noimage", "Failed", timeout=IMAGE_PULL_TIMEOUT_SECONDS + 120)
    assert stage_status(api, namespace, "noimage", "ppo")["reason"] == "ImagePullFailed"
    assert "localhost/finetune-no-such-image:1" in condition(status, "Failed")["message"]
    assert "ImagePullFailed" in event_reasons(kube_cluster, namespace, "noimage")
    assert columns(kube_cluster, namespace, "noimage")[-2] == "Failed"


def test_an_evicted_pod_is_a_disruption_not_a_failure_and_the_run_resumes(kube_cluster, api, namespace, operator):
    from kubernetes import client

    apply(kube_cluster, namespace, ppo_only("evicted", steps=40))
    checkpoints = kube_cluster.pvc_dir(namespace, "runs") / namespace / "evicted" / "ppo" / "checkpoints"
    wait_for("a PPO checkpoint", lambda: any(checkpoints.glob("step-*/COMPLETE")) if checkpoints.exists() else False,
             timeout=180, interval=0.2)
    core = client.CoreV1Api(kube_cluster.api_client())
    core.create_namespaced_pod_eviction("evicted-ppo-1", namespace, {
        "apiVersion": "policy/v1beta1", "kind": "Eviction",
        "metadata": {"name": "evicted-ppo-1", "namespace": namespace}})

    status = wait_state(api, namespace, "evicted", "Succeeded", "Failed", timeout=300)
    assert status["state"] == "Succeeded", status.get("message")
    ppo = status["stages"]["ppo"]
    assert (ppo["attempts"], ppo["failures"], ppo["disruptions"]) == (2, 0, 1)
    assert "resumed from" in kube_cluster.pod_log(namespace, "evicted-ppo-2")


def test_a_resource_quota_refusal_is_in_the_status_and_the_run_goes_on_once_it_is_lifted(kube_cluster, api,
                                                                                          namespace, operator):
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
             "spec": {"hard": {"pods": "0"}}}
    kube_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(quota))
    refused_at = time.monotonic()
    apply(kube_cluster, namespace, ppo_only("quota", steps=4))

    def refused():
        failed = status_of(api, namespace, "quota").get("failedCreate") or {}
        return failed if failed.get("code") == 403 else None

    failed = wait_for("the refused create in the status", refused, timeout=60)
    seconds_to_condition = time.monotonic() - refused_at
    assert "exceeded quota" in failed["message"]
    status = status_of(api, namespace, "quota")
    assert condition(status, "Succeeded")["reason"] == "FailedCreate"
    assert status.get("activeSince"), "the deadline clock must start at the first reconcile"
    assert any("exceeded quota" in m for m in event_messages(kube_cluster, namespace, "quota", "FailedCreate"))
    print(f"refused create -> visible condition in {seconds_to_condition:.1f}s")

    kube_cluster.kubectl("delete", "resourcequota", "no-pods", "-n", namespace)
    status = wait_state(api, namespace, "quota", "Succeeded", "Failed", timeout=300)
    assert status["state"] == "Succeeded", status.get("message")
    assert not status.get("failedCreate")


def test_a_toleration_the_pod_api_would_refuse_is_refused_at_apply(kube_cluster, namespace, operator):
    run = ppo_only("bad-toleration", steps=4)
    run["spec"]["podTemplate"] = {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}
    result = apply(kube_cluster, namespace, run, check=False)
    assert result.returncode != 0
    assert "admission webhook" in result.stderr and "tolerations[0]" in result.stderr, result.stderr


def test_a_pod_on_a_lost_node_is_replaced_and_the_run_resumes_when_the_node_returns(kube_cluster, api, namespace,
                                                                                     operator):
    node = getattr(kube_cluster, "node", None)
    assert node is not None, "needs the local cluster's real node (its kubelet is stopped and started)"
    apply(kube_cluster, namespace, ppo_only("lost", steps=40))
    checkpoints = kube_cluster.pvc_dir(namespace, "runs") / namespace / "lost" / "ppo" / "checkpoints"
    wait_for("a PPO checkpoint", lambda: any(checkpoints.glob("step-*/COMPLETE")) if checkpoints.exists() else False,
             timeout=180, interval=0.2)
    node.stop_kubelet()
    try:
        def node_lost():
            return kube_cluster.kubectl("get", "node", node.name, "-o",
                                        'jsonpath={.status.conditions[?(@.type=="Ready")].status}').stdout == "Unknown"

        wait_for("the node controller to mark the node Unknown", node_lost, timeout=120)
        # On a cluster with healthy nodes left, the taint manager deletes the lost node's pods; with every
        # node lost (one, here) the node controller stops evicting, so the pod is deleted as a drain would.
        kube_cluster.kubectl("delete", "pod", "lost-ppo-1", "-n", namespace, "--wait=false")
        wait_for("the operator to replace the pod stuck Terminating", lambda: "PodForceDeleted" in event_reasons(
            kube_cluster, namespace, "lost"), timeout=STUCK_TERMINATING_SECONDS + 120)
        wait_for("the replacement to count as a disruption", lambda: stage_status(
            api, namespace, "lost", "ppo").get("disruptions") == 1, timeout=60)
    finally:
        node.start_kubelet()
    status = wait_state(api, namespace, "lost", "Succeeded", "Failed", timeout=300)
    assert status["state"] == "Succeeded", status.get("message")
    ppo = status["stages"]["ppo"]
    assert (ppo["attempts"], ppo["failures"], ppo["disruptions"]) == (2, 0, 1)
    # The lost node's container keeps running while its kubelet is away (as in a network partition), so it
    # may finish the stage before the replacement starts: the replacement then finds this run's complete
    # final model; otherwise it resumes from the last checkpoint. Never both training from scratch.
    log = kube_cluster.pod_log(namespace, "lost-ppo-2")
    assert "resumed from" in log or "[ppo] succeeded" in log, log
