"""End to end on the real node: stages on two pods (resources.nodes: 2), one process each over gloo.

* SFT, reward and PPO each run as two pods that meet through the attempt's headless Service and
  train as one world of 2; both pods' logs say so; the final models load with plain transformers.
* Gang restart: one of the two PPO pods deleted mid-stage; the operator deletes the other, both are
  replaced, the stage resumes from its checkpoint and ends with the same weights as a 2-pod run that
  was never interrupted.
* A rank that cannot reach rank 0 (the rendezvous Service pointed at the wrong pod, so the address
  is wrong and nothing listens there) ends the attempt within rendezvousTimeoutSeconds, and the run's
  status names the address, the port and the cause.

The local node has one node and no real GPUs, so "two nodes" are two pods on the same node; what
crosses between them is real: cluster DNS, pod IPs, TCP.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_e2e_operator import (  # noqa: E402, F401  (api, namespace, operator: pytest fixtures, used by name)
    api, apply, event_reasons, example, namespace, operator, pod_names, ppo_only, status_of, wait_for, wait_state,
)

pytestmark = pytest.mark.cluster

TWO_PODS = {"memory": "2Gi", "nodes": 2}
DISTRIBUTED = {"rendezvousTimeoutSeconds": 60, "collectiveTimeoutSeconds": 120, "placementTimeoutSeconds": 120,
               "progressTimeoutSeconds": 240}


def two_pod(run: dict, **distributed) -> dict:
    run["spec"]["resources"] = dict(TWO_PODS)
    run["spec"]["distributed"] = {**DISTRIBUTED, **distributed}
    return run


def final_weights(kube_cluster, namespace: str, run: str, stage: str):
    from safetensors.torch import load_file

    final = kube_cluster.pvc_dir(namespace, "runs") / namespace / run / stage / "final"
    tensors = {}
    for file in sorted(final.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no safetensors in {final}"
    return tensors


def test_sft_reward_and_ppo_each_run_on_two_pods_as_one_world_of_two(kube_cluster, api, namespace):
    started = time.monotonic()
    apply(kube_cluster, namespace, two_pod(example("gang")))
    status = wait_state(api, namespace, "gang", "Succeeded", "Failed", timeout=900)
    elapsed = time.monotonic() - started
    print(f"nodes: 2, sft+reward+ppo: apply to {status['state']} in {elapsed:.0f}s")
    assert status["state"] == "Succeeded", json.dumps(status, indent=1)[-3000:]

    names = pod_names(api, namespace, "gang")
    assert names == [f"gang-{stage}-1-{rank}" for stage in ("ppo", "reward", "sft") for rank in (0, 1)], names
    for stage in ("sft", "reward", "ppo"):
        assert status["stages"][stage]["attempts"] == 1 and status["stages"][stage]["state"] == "Succeeded"
        for rank in (0, 1):
            log = kube_cluster.pod_log(namespace, f"gang-{stage}-1-{rank}")
            assert f"[{stage}] world size 2: rank {rank} (node rank {rank}," in log, log[-2000:]
            assert "backend gloo" in log
    services = json.loads(kube_cluster.kubectl("get", "services", "-n", namespace, "-o", "json").stdout)["items"]
    assert sorted(s["metadata"]["name"] for s in services) == ["gang-ppo-1", "gang-reward-1", "gang-sft-1"]

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    runs = kube_cluster.pvc_dir(namespace, "runs") / namespace / "gang"
    assert AutoModelForCausalLM.from_pretrained(runs / "sft" / "final") is not None
    assert AutoModelForSequenceClassification.from_pretrained(runs / "reward" / "final") is not None
    assert AutoModelForCausalLM.from_pretrained(runs / "ppo" / "final") is not None


def test_one_pod_deleted_mid_ppo_replaces_both_and_ends_with_the_uninterrupted_weights(kube_cluster, api, namespace):
    steps = 24
    for name in ("straight", "restarted"):
        apply(kube_cluster, namespace, two_pod(ppo_only(name, steps=steps)))
    checkpoints = kube_cluster.pvc_dir(namespace, "runs") / namespace / "restarted" / "ppo" / "checkpoints"
    wait_for("a PPO checkpoint of the 2-pod run",
             lambda: any(checkpoints.glob("step-*/COMPLETE")) if checkpoints.exists() else False,
             timeout=600, interval=0.2)
    deleted_at = time.monotonic()
    kube_cluster.kubectl("delete", "pod", "restarted-ppo-1-1", "-n", namespace, "--wait=false")

    status = wait_state(api, namespace, "restarted", "Succeeded", "Failed", timeout=900)
    print(f"gang restart: deletion to {status['state']} in {time.monotonic() - deleted_at:.0f}s")
    assert status["state"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    ppo = status["stages"]["ppo"]
    assert (ppo["attempts"], ppo["failures"], ppo["disruptions"]) == (2, 0, 1), ppo
    assert "rank 1 (restarted-ppo-1-1) ended" in ppo["lastFailure"]["message"]
    assert pod_names(api, namespace, "restarted") == ["restarted-ppo-2-0", "restarted-ppo-2-1"]
    for rank in (0, 1):
        log = kube_cluster.pod_log(namespace, f"restarted-ppo-2-{rank}")
        assert "world size 2" in log
    assert "resumed from" in kube_cluster.pod_log(namespace, "restarted-ppo-2-0")
    assert "StageRetrying" in event_reasons(kube_cluster, namespace, "restarted")

    straight = wait_state(api, namespace, "straight", "Succeeded", "Failed", timeout=600)
    assert straight["state"] == "Succeeded", straight.get("message")
    assert straight["stages"]["ppo"]["attempts"] == 1
    a = final_weights(kube_cluster, namespace, "straight", "ppo")
    b = final_weights(kube_cluster, namespace, "restarted", "ppo")
    assert a.keys() == b.keys()
    difference = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"gang restart: max |weight difference| to the uninterrupted 2-pod run = {difference:g} over {len(a)} tensors")
    # Tolerance 0: CPU gloo all-reduce is deterministic and the resume restores every rank's RNG and data position.
    assert difference == 0.0


def test_a_rank_that_cannot_reach_rank_0_ends_the_attempt_within_the_rendezvous_timeout_naming_the_cause(
        kube_cluster, api, namespace):
    timeout = 20
    run = two_pod(example("lost", backoffLimit=0), rendezvousTimeoutSeconds=timeout, progressTimeoutSeconds=None)
    run["spec"]["stages"] = {"sft": run["spec"]["stages"]["sft"]}
    apply(kube_cluster, namespace, run)
    service = "lost-sft-1"
    # Point rank 0's name at rank 1 as soon as the Service exists, before the pods' launchers resolve it:
    # a wrong address where nothing listens on the rendezvous port.
    wait_for("the rendezvous Service", lambda: kube_cluster.kubectl(
        "get", "service", service, "-n", namespace, check=False).returncode == 0, timeout=120, interval=0.1)
    kube_cluster.kubectl("patch", "service", service, "-n", namespace, "--type=merge",
                         "-p", json.dumps({"spec": {"selector": {"finetune.dev/rank": "1"}}}))
    patched = time.monotonic()

    status = wait_state(api, namespace, "lost", "Failed", "Succeeded", timeout=300)
    ended = time.monotonic() - patched
    message = status["message"]
    print(f"unreachable rank 0: run Failed {ended:.0f}s after the Service was misdirected "
          f"(rendezvousTimeoutSeconds {timeout}): {message}")
    assert status["state"] == "Failed", message
    address = f"{service}.{namespace}.svc:29500"
    assert (f"could not reach rank 0 at {address}" in message
            or (f"pod rank 0 of 2 waited" in message and "not to this pod" in message)), message
    assert f"rendezvousTimeoutSeconds {timeout}" in message
    assert "nothing accepted the connection" in message or "not to this pod" in message
    started = status["stages"]["sft"]["runningTime"] if "runningTime" in status["stages"]["sft"] else None
    # Pod start plus the timeout plus the operator's pass, far below torch's 600 s default.
    assert ended < timeout + 120, (ended, started)


# scheduler-plugins' PodGroup, reduced to what the API server needs to serve it (the real CRD has a schema).
POD_GROUP_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "podgroups.scheduling.x-k8s.io"},
    "spec": {"group": "scheduling.x-k8s.io", "scope": "Namespaced",
             "names": {"plural": "podgroups", "singular": "podgroup", "kind": "PodGroup"},
             "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_coscheduling_gets_its_pod_group_and_a_missing_pod_group_crd_is_named(kube_cluster, api, namespace):
    import yaml

    run = two_pod(example("cosched"), gangScheduler="coscheduling")
    run["spec"]["stages"] = {"sft": run["spec"]["stages"]["sft"]}
    # No scheduler of that name runs here: the pods stay unbound, which is all this test needs.
    run["spec"]["podTemplate"] = {"schedulerName": "scheduler-plugins-scheduler"}
    apply(kube_cluster, namespace, run)
    try:
        # The CRD is not installed yet: the create is refused and the run says what is missing.
        refused = wait_for("the run to name the missing PodGroup CRD", lambda: (lambda s: s if "PodGroup CRD is not "
                           "installed" in (s.get("message") or "") else None)(status_of(api, namespace, "cosched")),
                           timeout=120)
        print(f"without the CRD: {refused['message']}")
        assert pod_names(api, namespace, "cosched") == []  # no member before its group

        kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(POD_GROUP_CRD))
        group = wait_for("the PodGroup once its CRD exists (the operator's create retry)", lambda: api.get_object(
            "scheduling.x-k8s.io/v1alpha1/PodGroup", namespace, "cosched-sft-1"), timeout=180)
        assert group["spec"] == {"minMember": 2, "scheduleTimeoutSeconds": DISTRIBUTED["placementTimeoutSeconds"]}
        assert group["metadata"]["ownerReferences"][0]["name"] == "cosched"
        wait_for("both pods", lambda: pod_names(api, namespace, "cosched") == ["cosched-sft-1-0", "cosched-sft-1-1"],
                 timeout=120)
        for pod in api.list_pods(namespace, label_selector="finetune.dev/run=cosched"):
            assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "cosched-sft-1"
            assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
        def stage_message() -> str:
            return ((status_of(api, namespace, "cosched").get("stages") or {}).get("sft") or {}).get("message") or ""

        assert "0 of 2 pods placed" in wait_for("the placement message", lambda: "placed" in stage_message()
                                                and stage_message())
    finally:
        kube_cluster.kubectl("delete", "-n", namespace, "finetunerun", "cosched", "--ignore-not-found", check=False)
        kube_cluster.kubectl("delete", "crd", POD_GROUP_CRD["metadata"]["name"], "--ignore-not-found", check=False)
