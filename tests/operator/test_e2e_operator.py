"""End to end: the operator as a process against the local control plane, stage pods running the real trainer.

The operator runs as ``python -m ftoperator --webhook-url https://127.0.0.1:<port>`` (the API server
calls that URL; the operator registers the ValidatingWebhookConfiguration itself) and watches only
this module's namespaces. Every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
CRD = REPO / "crds" / "finetuneruns.finetune.dev.yaml"
NAMESPACE_PREFIX = "ftop-e2e-"
MAX_GPUS = 4  # the local node has 2 GPUs: 4 passes admission but cannot be scheduled


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 120.0, interval: float = 0.3) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class OperatorProcess:
    """``python -m ftoperator`` as a child process that can be killed and started again."""

    def __init__(self, *, kubeconfig: str, workdir: Path, extra_args: tuple[str, ...] = ()):
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.extra_args = extra_args
        self.webhook_port, self.metrics_port, self.liveness_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "operator.log"
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"\n===== start {self.starts} =====\n")
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ftoperator", "--namespace", f"{NAMESPACE_PREFIX}*",
             "--webhook-url", f"https://127.0.0.1:{self.webhook_port}",
             "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
             "--max-gpus-per-stage", str(MAX_GPUS), "--trainer-image", "local/finetune-trainer",
             "--trainer-metrics-port", "0", "--report-interval-seconds", "0.5", "--resync-seconds", "10",
             *self.extra_args],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for("the operator's liveness endpoint", self.alive, timeout=60)

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the operator exited; log:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            return answer.read().decode()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@contextlib.contextmanager
def running_operator(kube_cluster, workdir: Path, *extra_args: str):
    """The CRD applied and ``python -m ftoperator`` (plus extra_args) serving its webhook, until exit."""
    kube_cluster.kubectl("apply", "-f", str(CRD))
    # Polled rather than `kubectl wait`: that fails outright if it reads the CRD before it has any conditions.
    wait_for("the CRD to be established", lambda: kube_cluster.kubectl(
        "get", "crd", "finetuneruns.finetune.dev", "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}',
        check=False).stdout == "True", timeout=60)
    process = OperatorProcess(kubeconfig=kube_cluster.kubeconfig, workdir=workdir, extra_args=extra_args)
    process.start()
    wait_for("the webhook configuration", lambda: kube_cluster.kubectl(
        "get", "validatingwebhookconfiguration", "finetune.dev", check=False).returncode == 0, timeout=30)
    try:
        yield process
    finally:
        process.stop()
        # The configuration outlives the operator (failurePolicy Fail): remove it for other test modules.
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            kube_cluster.kubectl("delete", kind, "finetune.dev", "--ignore-not-found", check=False)
        print(f"operator log: {process.log_path}")


@pytest.fixture(scope="module")
def operator(kube_cluster, tmp_path_factory):
    with running_operator(kube_cluster, tmp_path_factory.mktemp("operator")) as process:
        yield process


@pytest.fixture(scope="module")
def api(kube_cluster):
    from ftoperator.kubeapi import KubeApi

    return KubeApi(kube_cluster.api_client())


@pytest.fixture
def namespace(kube_cluster, tiny_model_dir, operator):
    """A fresh namespace with the tiny model on `models` and toy datasets on `datasets`."""
    name = populated_namespace(kube_cluster, tiny_model_dir)
    yield name
    delete_namespace(kube_cluster, name)


def populated_namespace(kube_cluster, tiny_model_dir) -> str:
    """Create a namespace, copy the tiny model to its `models` claim and the toy datasets to `datasets`."""
    import shutil

    name = f"{NAMESPACE_PREFIX}{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    model = shutil.copytree(tiny_model_dir, kube_cluster.pvc_dir(name, "models") / "tiny")
    # pytest's temp dirs are 0700 and copytree keeps modes: the trainer runs as uid 65532.
    for path in [Path(model), *Path(model).rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    datasets = kube_cluster.pvc_dir(name, "datasets")
    kube_cluster.pvc_dir(name, "runs")  # the claim the stages write their outputs to
    sys.path.insert(0, str(REPO / "hack"))
    import demo_assets  # the example's own toy data: enough prompts for its ppo.samplePrompts

    rows = {
        "sft.jsonl": demo_assets.sft_rows(),
        "preferences.jsonl": demo_assets.preference_rows(),
        "prompts.jsonl": demo_assets.prompt_rows(),
        "broken.jsonl": [{"question": "no prompt field here"}],
    }
    for file, content in rows.items():
        (datasets / file).write_text("".join(json.dumps(row) + "\n" for row in content))
    return name


def delete_namespace(kube_cluster, name: str) -> None:
    # Runs first, while the operator is up to remove its finalizer; then the namespace.
    kube_cluster.kubectl("delete", "ftr", "--all", "-n", name, "--timeout=60s", check=False)
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# ----------------------------------------------------------------------------- helpers


# The first test applies examples/tiny-cpu.yaml itself; the others need the quickest run with all three
# stages (a few steps each), which the example, tuned for the demo to show learning, is not.
TINY_SPEC = yaml.safe_load("""
model: {source: pvc://models/tiny}
data:
  sft: pvc://datasets/sft.jsonl
  preferences: pvc://datasets/preferences.jsonl
  prompts: pvc://datasets/prompts.jsonl
artifacts: {pvc: runs}
image: ghcr.io/finetune-dev/finetune-trainer:0.1.0
resources: {cpu: "1", memory: 2Gi}
backoffLimit: 2
activeDeadlineSeconds: 1800
stages:
  sft: {maxSteps: 4, batchSize: 4, learningRate: 1.0e-3, maxSeqLengthTokens: 64, checkpointEverySteps: 2,
        precision: fp32}
  reward: {maxSteps: 4, batchSize: 4, learningRate: 1.0e-3, maxSeqLengthTokens: 64, checkpointEverySteps: 2,
           precision: fp32}
  ppo: {steps: 4, batchSize: 4, miniBatches: 2, ppoEpochs: 1, learningRate: 1.0e-4, responseLengthTokens: 8,
        sampleEverySteps: 2, samplePrompts: 2, checkpointEverySteps: 2, precision: fp32}
""")


def example(name: str, **spec_changes: Any) -> dict:
    """A tiny three-stage run named ``name``."""
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(spec_changes)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneRun", "metadata": {"name": name}, "spec": spec}


def ppo_only(name: str, *, steps: int) -> dict:
    """No SFT, heuristic reward functions, a PPO long enough to interrupt."""
    run = example(name)
    run["spec"]["data"] = {"prompts": "pvc://datasets/prompts.jsonl"}
    run["spec"]["stages"] = {
        "reward": {"functions": [{"type": "length", "targetLengthTokens": 6}]},
        "ppo": {**run["spec"]["stages"]["ppo"], "steps": steps, "checkpointEverySteps": 2, "sampleEverySteps": 1000},
    }
    return run


def apply(kube_cluster, namespace: str, run: dict, *, check: bool = True) -> subprocess.CompletedProcess:
    return kube_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(run), check=check)


def get_run(api, namespace: str, name: str) -> dict:
    return api.get_run(namespace, name) or {}


def status_of(api, namespace: str, name: str) -> dict:
    return get_run(api, namespace, name).get("status") or {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def wait_state(api, namespace: str, name: str, *states: str, timeout: float = 180) -> dict:
    return wait_for(f"{namespace}/{name} to reach {states}",
                    lambda: (lambda s: s if s.get("state") in states else None)(status_of(api, namespace, name)),
                    timeout=timeout)


def pod_names(api, namespace: str, name: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list_pods(namespace, label_selector=f"finetune.dev/run={name}"))


def events(kube_cluster, namespace: str, name: str) -> list[dict]:
    answer = kube_cluster.kubectl("get", "events", "-n", namespace, "-o", "json",
                                  "--field-selector", f"involvedObject.name={name},involvedObject.kind=FineTuneRun")
    return json.loads(answer.stdout)["items"]


def event_reasons(kube_cluster, namespace: str, name: str) -> set[str]:
    return {e["reason"] for e in events(kube_cluster, namespace, name)}


def printed_columns(kube_cluster, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get ftr NAME` as {column header: cell}, cells cut at the header's offsets ("" for <none>)."""
    header, row = kube_cluster.kubectl("get", "ftr", name, "-n", namespace).stdout.splitlines()[:2]
    starts = [i for i, char in enumerate(header) if char != " " and (i == 0 or header[i - 1] == " ")]
    cells = {}
    for start, end in zip(starts, [*starts[1:], None]):
        cell = row[start:end].strip()
        cells[header[start:end].strip()] = "" if cell == "<none>" else cell
    return cells


# ----------------------------------------------------------------------------- tests


def test_three_stage_run_succeeds_with_sensible_columns_and_a_loadable_model(kube_cluster, operator, api, namespace):
    kube_cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    steps = yaml.safe_load(EXAMPLE.read_text())["spec"]["stages"]["ppo"]["steps"]
    status = wait_state(api, namespace, name, "Succeeded", "Failed", timeout=300)
    assert status["state"] == "Succeeded", json.dumps(status, indent=1)[-3000:]

    row = printed_columns(kube_cluster, namespace, name)
    assert (row["NAME"], row["STAGE"], row["PROGRESS"], row["STATUS"]) == (
        name, "ppo", f"ppo {steps}/{steps}", "Succeeded"), row
    float(row["REWARD"]), float(row["KL"])
    assert row["PREF-ACC"] == row["MARGIN"] == "", "DPO's columns stay empty for PPO"
    assert condition(status, "Succeeded")["status"] == "True"
    assert {c["type"] for c in status["conditions"]} == {
        "Succeeded", "Running", "WaitingForResources", "Suspended", "Failed"}
    for stage in ("sft", "reward", "ppo"):
        assert status["stages"][stage]["state"] == "Succeeded"
        assert status["stages"][stage]["attempts"] == 1
        assert status["stages"][stage]["metrics"], f"no metrics copied for {stage}"
    assert status["stages"]["ppo"]["step"] == steps and status["stages"]["ppo"]["totalSteps"] == steps
    assert 1 <= len(status["samples"]) <= 3
    assert {"StageStarted", "StageSucceeded", "RunSucceeded"} <= event_reasons(kube_cluster, namespace, name)
    assert pod_names(api, namespace, name) == [f"{name}-ppo-1", f"{name}-reward-1", f"{name}-sft-1"]

    from transformers import AutoModelForCausalLM

    final = kube_cluster.pvc_dir(namespace, "runs") / namespace / name / "ppo" / "final"
    assert AutoModelForCausalLM.from_pretrained(final) is not None

    metrics = operator.metrics()
    assert 'finetune_operator_stage_transitions_total{stage="ppo",to_state="Succeeded"}' in metrics
    assert "finetune_operator_pod_start_seconds_bucket" in metrics
    assert 'finetune_operator_runs{state="Succeeded"}' in metrics


def test_a_bad_dataset_row_fails_the_run_at_once_with_the_file_and_line(kube_cluster, api, namespace):
    # A bad row is a permanent error (exit code 3): retrying cannot fix it, so no retry burns GPU hours.
    run = example("broken", backoffLimit=2)
    run["spec"]["data"]["sft"] = "pvc://datasets/broken.jsonl"
    apply(kube_cluster, namespace, run)
    status = wait_state(api, namespace, "broken", "Succeeded", "Failed", timeout=180)

    assert status["state"] == "Failed"
    failed = condition(status, "Failed")
    assert failed["status"] == "True"
    assert "broken.jsonl:1" in failed["message"], failed["message"]
    sft = status["stages"]["sft"]
    assert (sft["attempts"], sft["failures"], sft["reason"]) == (1, 1, "PermanentError")
    assert sft["lastFailure"]["exitCode"] == 3
    assert pod_names(api, namespace, "broken") == ["broken-sft-1"]
    reasons = event_reasons(kube_cluster, namespace, "broken")
    assert {"StageFailed", "RunFailed"} <= reasons and "StageRetrying" not in reasons


def test_pod_deleted_mid_ppo_is_replaced_and_resumes_from_its_checkpoint(kube_cluster, api, namespace):
    apply(kube_cluster, namespace, ppo_only("resume", steps=60))
    checkpoints = kube_cluster.pvc_dir(namespace, "runs") / namespace / "resume" / "ppo" / "checkpoints"
    wait_for("a PPO checkpoint", lambda: any(checkpoints.glob("step-*/COMPLETE")) if checkpoints.exists() else False,
             timeout=120, interval=0.2)
    kube_cluster.kubectl("delete", "pod", "resume-ppo-1", "-n", namespace, "--wait=false")

    status = wait_state(api, namespace, "resume", "Succeeded", "Failed", timeout=240)
    assert status["state"] == "Succeeded", status.get("message")
    ppo = status["stages"]["ppo"]
    assert (ppo["attempts"], ppo["failures"], ppo["disruptions"]) == (2, 0, 1)
    assert "resumed from" in kube_cluster.pod_log(namespace, "resume-ppo-2")
    assert "StageRetrying" in event_reasons(kube_cluster, namespace, "resume")


def test_operator_killed_mid_run_and_restarted_creates_no_duplicate_pods(kube_cluster, operator, api, namespace):
    apply(kube_cluster, namespace, ppo_only("restart", steps=30))
    wait_state(api, namespace, "restart", "Running", timeout=120)
    operator.kill()  # the pod keeps running while nobody reconciles
    operator.start()
    status = wait_state(api, namespace, "restart", "Succeeded", "Failed", timeout=240)
    assert status["state"] == "Succeeded", status.get("message")
    assert pod_names(api, namespace, "restart") == ["restart-ppo-1"]
    assert status["stages"]["ppo"]["attempts"] == 1


def test_suspend_deletes_the_pod_and_resume_continues_in_a_new_attempt(kube_cluster, api, namespace):
    apply(kube_cluster, namespace, ppo_only("pause", steps=60))
    wait_state(api, namespace, "pause", "Running", timeout=120)
    kube_cluster.kubectl("patch", "ftr", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    status = wait_state(api, namespace, "pause", "Suspended", timeout=60)
    assert condition(status, "Suspended")["status"] == "True"
    wait_for("the suspended pod to go", lambda: pod_names(api, namespace, "pause") == [], timeout=60)

    kube_cluster.kubectl("patch", "ftr", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = wait_state(api, namespace, "pause", "Succeeded", "Failed", timeout=240)
    assert status["state"] == "Succeeded", status.get("message")
    assert condition(status, "Suspended")["status"] == "False"
    assert status["stages"]["ppo"]["attempts"] == 2 and status["stages"]["ppo"]["failures"] == 0
    assert {"RunSuspended", "RunResumed"} <= event_reasons(kube_cluster, namespace, "pause")
    row = kube_cluster.kubectl("get", "ftr", "pause", "-n", namespace, "--no-headers").stdout
    assert "Suspended" not in row, "the Status column must not keep showing Suspended (Kubeflow #3666)"


def test_too_many_gpus_waits_for_resources_and_frozen_fields_are_rejected_while_active(kube_cluster, api, namespace):
    run = example("greedy")
    run["spec"]["resources"] = {"gpus": MAX_GPUS}
    apply(kube_cluster, namespace, run)
    status = wait_state(api, namespace, "greedy", "WaitingForResources", timeout=60)
    waiting = condition(status, "WaitingForResources")
    assert waiting["status"] == "True" and "nvidia.com/gpu" in waiting["message"], waiting
    assert "WaitingForResources" in event_reasons(kube_cluster, namespace, "greedy")

    run["spec"]["model"]["source"] = "pvc://models/other"
    rejected = apply(kube_cluster, namespace, run, check=False)
    assert rejected.returncode != 0 and "spec.model" in rejected.stderr, rejected.stderr


def test_deleting_a_run_deletes_everything_it_owns(kube_cluster, api, namespace):
    apply(kube_cluster, namespace, ppo_only("doomed", steps=200))
    wait_state(api, namespace, "doomed", "Running", timeout=120)

    def leftovers() -> list[str]:
        answer = kube_cluster.kubectl("get", "pods,configmaps,serviceaccounts,roles,rolebindings", "-n", namespace,
                                      "-l", "finetune.dev/run=doomed", "-o", "name")
        return answer.stdout.split()

    before = {name.split("/")[0] for name in leftovers()}
    assert {"pod", "configmap", "serviceaccount", "role.rbac.authorization.k8s.io",
            "rolebinding.rbac.authorization.k8s.io"} <= before, before
    kube_cluster.kubectl("delete", "ftr", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    # wait_for raises when the children outlive the deadline.
    wait_for("garbage collection of the run's children", lambda: leftovers() == [], timeout=90)


def sft_only(name: str, *, steps: int) -> dict:
    """One short stage: the quickest run that still has every kind of child."""
    run = example(name)
    run["spec"]["data"] = {"sft": "pvc://datasets/sft.jsonl"}
    run["spec"]["stages"] = {"sft": {**run["spec"]["stages"]["sft"], "maxSteps": steps}}
    return run


def test_run_deleted_and_recreated_at_once_waits_for_the_old_children_then_succeeds(kube_cluster, api, namespace):
    service_account = "again-trainer"
    apply(kube_cluster, namespace, sft_only("again", steps=2))
    wait_for("the first run's ServiceAccount and pod", lambda: (
        api.get_object("ServiceAccount", namespace, service_account) and pod_names(api, namespace, "again")), timeout=60)
    old_uid = get_run(api, namespace, "again")["metadata"]["uid"]
    # Hold the old ServiceAccount so that the re-created run surely meets it (the garbage collector is quick).
    hold = {"metadata": {"finalizers": ["finetune.dev/e2e-hold"]}}
    kube_cluster.kubectl("patch", "sa", service_account, "-n", namespace, "--type=merge", "-p", json.dumps(hold))
    kube_cluster.kubectl("delete", "ftr", "again", "-n", namespace, "--timeout=30s")  # background cascade
    apply(kube_cluster, namespace, sft_only("again", steps=2))

    held = f"ServiceAccount {service_account} belongs to another owner (uid {old_uid})"
    # Generous: the garbage collector notices deleted runs only once it watches the CRD, up to ~30 s
    # after the CRD was created (seconds when earlier tests ran first, ~40 s when this test runs alone).
    status = wait_for("the new run to wait for the held ServiceAccount", lambda: (lambda s: s if condition(
        s, "Succeeded").get("reason") == "WaitingForCleanup" and held in s.get("message", "") else None)(
        status_of(api, namespace, "again")), timeout=90)
    new_uid = get_run(api, namespace, "again")["metadata"]["uid"]
    assert new_uid != old_uid
    assert status["stages"]["sft"]["attempts"] == 0
    # The old run's pod may still be terminating (the kubelet gives it its grace period); none is the new run's.
    owners = {ref["uid"] for pod in api.list_pods(namespace, label_selector="finetune.dev/run=again")
              for ref in pod["metadata"].get("ownerReferences", [])}
    assert new_uid not in owners
    kube_cluster.kubectl("patch", "sa", service_account, "-n", namespace, "--type=merge",
                         "-p", '{"metadata":{"finalizers":null}}')

    status = wait_state(api, namespace, "again", "Succeeded", "Failed", timeout=60)
    assert status["state"] == "Succeeded", status.get("message")
    assert status["stages"]["sft"]["attempts"] == 1 and status["stages"]["sft"]["disruptions"] == 0
    owner = api.get_object("ServiceAccount", namespace, service_account)["metadata"]["ownerReferences"][0]
    assert owner["uid"] == new_uid
    assert "WaitingForCleanup" in event_reasons(kube_cluster, namespace, "again")


@pytest.mark.parametrize(("change", "field"), [
    (lambda spec: spec["stages"].pop("reward") and spec["data"].pop("preferences"), "spec.stages.ppo"),
    (lambda spec: spec["resources"].update(gpus=MAX_GPUS * 4), "spec.resources.gpus"),
    (lambda spec: spec["resources"].update(gpus=-1), "spec.resources.gpus"),
    (lambda spec: spec["data"].pop("prompts"), "spec.data.prompts"),
    (lambda spec: spec["stages"]["ppo"].update(miniBatches=3), "spec.stages.ppo"),
    # Caught at apply rather than hours later in the PPO pod:
    (lambda spec: spec["stages"]["reward"].update(functions=[{"type": "regex", "pattern": "(cats"}]),
     "spec.stages.reward.functions[0]"),
    (lambda spec: spec["resources"].update(memory="500m"), "did you mean 500Mi?"),
    (lambda spec: spec["stages"]["ppo"].update(responseLengthTokens=60, maxSeqLengthTokens=64), "spec.stages.ppo"),
    (lambda spec: spec["model"].update(source="hf://a/b/c"), "spec.model.source"),
], ids=["ppo-without-reward", "gpus-above-operator-max", "negative-gpus", "ppo-without-prompts",
        "batch-not-divisible", "regex-that-does-not-compile", "memory-in-millibytes",
        "response-longer-than-the-sequence", "malformed-hub-id"])
def test_bad_manifests_are_rejected_at_apply_with_the_field_name(kube_cluster, namespace, change, field):
    run = example("rejected")
    change(run["spec"])
    answer = apply(kube_cluster, namespace, run, check=False)
    assert answer.returncode != 0, "kubectl apply should have failed"
    assert field in answer.stderr, answer.stderr


@pytest.mark.parametrize("source", ["hf://gpt2", "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"])
def test_every_valid_hub_id_is_admitted_with_an_optional_revision(kube_cluster, namespace, source):
    run = example("hub-model", suspend=True)  # suspended: admitted, but no pod tries to download
    run["spec"]["model"]["source"] = source
    answer = apply(kube_cluster, namespace, run, check=False)
    assert answer.returncode == 0, answer.stderr
    stored = kube_cluster.kubectl("get", "ftr", "hub-model", "-n", namespace, "-o", "jsonpath={.spec.model.source}")
    assert stored.stdout == source
    kube_cluster.kubectl("delete", "ftr", "hub-model", "-n", namespace)
