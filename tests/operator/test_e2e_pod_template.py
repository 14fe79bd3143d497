"""End to end: spec.podTemplate reaches the stage pods, restricted pods run the real trainer, and runs can
be deleted while the operator is down.

Reuses the operator process, namespace and helpers of test_e2e_operator.py (marked ``cluster``).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_e2e_operator import (  # noqa: E402, F401  (api, namespace, operator: pytest fixtures, used by name)
    api, apply, example, namespace, operator, pod_names, wait_for, wait_state,
)

pytestmark = pytest.mark.cluster

PRIORITY_CLASS = "finetune-e2e-batch"


def create(kube_cluster, obj: dict) -> None:
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))


def test_a_run_with_a_pod_template_succeeds_and_its_pods_carry_it(kube_cluster, api, namespace):
    create(kube_cluster, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                          "metadata": {"name": PRIORITY_CLASS}, "value": 1000,
                          "description": "finetune e2e tests"})
    create(kube_cluster, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": "hf-token", "namespace": namespace},
                          "stringData": {"token": "hf_not_a_real_token"}})
    docker_config = base64.b64encode(json.dumps({"auths": {}}).encode()).decode()
    create(kube_cluster, {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                          "metadata": {"name": "regcred", "namespace": namespace},
                          "data": {".dockerconfigjson": docker_config}})
    run = example("templated")
    run["spec"]["podTemplate"] = {
        "labels": {"team": "nlp", "example.com/queue": "batch"},
        "annotations": {"example.com/owner": "e2e"},
        "imagePullSecrets": [{"name": "regcred"}],
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}],
        "envFrom": [{"secretRef": {"name": "hf-token"}, "prefix": "FROM_SECRET_"}],
        "priorityClassName": PRIORITY_CLASS,
        "terminationGracePeriodSeconds": 45,
    }
    apply(kube_cluster, namespace, run)
    seen: dict[str, dict] = {}

    def record_pods() -> None:
        for pod in api.list_pods(namespace, label_selector="finetune.dev/run=templated"):
            seen[pod["metadata"]["name"]] = pod

    def succeeded():
        record_pods()
        status = (api.get_run(namespace, "templated") or {}).get("status") or {}
        return status if status.get("state") in ("Succeeded", "Failed") else None

    status = wait_for("templated to finish", succeeded, timeout=300)
    assert status["state"] == "Succeeded", status.get("message")
    assert {name.rsplit("-", 2)[1] for name in seen} == {"sft", "reward", "ppo"}, sorted(seen)
    for name, pod in seen.items():
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["team"] == "nlp" and meta["labels"]["example.com/queue"] == "batch", name
        assert meta["annotations"]["example.com/owner"] == "e2e", name
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], name
        assert spec["priorityClassName"] == PRIORITY_CLASS and spec["priority"] == 1000, name
        assert spec["terminationGracePeriodSeconds"] == 45, name
        container = spec["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}, name
        assert container["envFrom"] == [{"prefix": "FROM_SECRET_", "secretRef": {"name": "hf-token"}}], name
        # Restricted by default: the trainer ran as a non-root uid on a read-only root filesystem.
        assert spec["securityContext"]["runAsUser"] == 65532 and spec["securityContext"]["runAsNonRoot"], name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name


def test_runs_can_be_deleted_while_the_operator_is_down(kube_cluster, operator, api, namespace):
    run = example("orphaned")
    run["spec"]["stages"] = {"sft": {**run["spec"]["stages"]["sft"], "maxSteps": 500}}
    run["spec"]["data"] = {"sft": "pvc://datasets/sft.jsonl"}
    apply(kube_cluster, namespace, run)
    wait_state(api, namespace, "orphaned", "Running", timeout=120)
    assert not (api.get_run(namespace, "orphaned") or {}).get("metadata", {}).get("finalizers")
    operator.stop()  # as when the Deployment is scaled to zero or the chart uninstalled
    try:
        kube_cluster.kubectl("delete", "ftr", "orphaned", "-n", namespace, "--wait=true", "--timeout=30s")
        assert api.get_run(namespace, "orphaned") is None
        # The garbage collector, not the operator, removes the children (owner references).
        wait_for("the run's pods to be garbage-collected", lambda: pod_names(api, namespace, "orphaned") == [],
                 timeout=90)
    finally:
        operator.start()


def test_a_run_recreated_with_new_data_trains_on_the_new_data(kube_cluster, api, namespace):
    import hashlib

    from test_e2e_operator import get_run, sft_only

    datasets = kube_cluster.pvc_dir(namespace, "datasets")
    final = kube_cluster.pvc_dir(namespace, "runs") / namespace / "redo" / "sft" / "final"

    def train(rows: list[dict]) -> dict:
        (datasets / "redo.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        run = sft_only("redo", steps=2)
        run["spec"]["data"]["sft"] = "pvc://datasets/redo.jsonl"
        apply(kube_cluster, namespace, run)
        status = wait_state(api, namespace, "redo", "Succeeded", "Failed", timeout=240)
        assert status["state"] == "Succeeded", status.get("message")
        fingerprint = json.loads((final / "fingerprint.json").read_text())
        digest = "sha256:" + hashlib.sha256((datasets / "redo.jsonl").read_bytes()).hexdigest()
        assert fingerprint["inputs"]["data.sft"] == digest
        assert fingerprint["runUid"] == get_run(api, namespace, "redo")["metadata"]["uid"]
        return fingerprint

    first = train([{"prompt": f"say {i}", "completion": " cats"} for i in range(16)])
    kube_cluster.kubectl("delete", "ftr", "redo", "-n", namespace, "--wait=true", "--timeout=120s")
    wait_for("the first run's pods to go", lambda: not pod_names(api, namespace, "redo"), timeout=120)
    second = train([{"prompt": f"say {i}", "completion": " dogs"} for i in range(16)])

    # Same name, same output directory: the new run retrained on its own data instead of
    # returning the first run's model as Succeeded.
    assert second["runUid"] != first["runUid"]
    assert second["inputs"]["data.sft"] != first["inputs"]["data.sft"]
