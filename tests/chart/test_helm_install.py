"""End to end: `helm install` the chart into the local cluster and run examples/tiny-cpu.yaml to Succeeded.

The local cluster's real node runs the chart's own Deployment from the operator image built from our
Dockerfile, with the chart's defaults: this proves the image, the chart's command line, RBAC, security
context, the mounted webhook certificate, probes and the webhook configuration (the API server calls the
webhook through its Service) work together with the real operator. The release is namespace-scoped (the
stricter RBAC).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import pytest
import yaml
from chartlib import CHART, REPO

sys.path.insert(0, str(REPO / "hack"))
import demo_assets  # noqa: E402

pytestmark = pytest.mark.cluster

RELEASE = "ft-e2e"
OPERATOR_NAMESPACE = "ft-e2e-system"
RUN_NAMESPACE = "ft-e2e-runs"
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
STORAGE = REPO / "examples" / "tiny-cpu-storage.yaml"
RUN_TIMEOUT_SECONDS = 900


def wait_for(what: str, check, *, timeout_seconds: float, diagnose=lambda: ""):
    """Poll check() until it returns a truthy value; fail naming `what` (and diagnose()) at the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_seconds:.0f}s waiting for {what}\n{diagnose()}")


def load_run() -> dict:
    assert EXAMPLE.exists(), f"{EXAMPLE} is missing (written with the operator)"
    (run,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d.get("kind") == "FineTuneRun"]
    run["metadata"]["namespace"] = RUN_NAMESPACE
    return run


def adopt_existing_crd(kube_cluster) -> None:
    """Let the release take over a CRD that other tests applied with kubectl (as docs/deploy.md tells users)."""
    crd = "crd/finetuneruns.finetune.dev"
    if kube_cluster.kubectl("get", crd, check=False).returncode != 0:
        return
    kube_cluster.kubectl("label", "--overwrite", crd, "app.kubernetes.io/managed-by=Helm")
    kube_cluster.kubectl("annotate", "--overwrite", crd, f"meta.helm.sh/release-name={RELEASE}",
                         f"meta.helm.sh/release-namespace={OPERATOR_NAMESPACE}")


@pytest.fixture
def installed_operator(kube_cluster):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ports = {"metrics": values["metrics"]["port"], "liveness": values["liveness"]["port"]}
    kube_cluster.kubectl("create", "namespace", RUN_NAMESPACE, check=False)
    adopt_existing_crd(kube_cluster)
    helm = [kube_cluster.helm_path, "--kubeconfig", kube_cluster.kubeconfig]
    import subprocess

    install = subprocess.run(
        [*helm, "install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace",
         "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{RUN_NAMESPACE}}}"],
        capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    try:
        yield ports
    finally:
        kube_cluster.kubectl("delete", "finetuneruns", "--all", "-n", RUN_NAMESPACE, "--wait=true",
                             "--timeout=120s", check=False)
        uninstall = subprocess.run([*helm, "uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait"],
                                   capture_output=True, text=True)
        assert uninstall.returncode == 0, uninstall.stderr
        # crds.keep: the CRD (and so users' runs) survives the uninstall.
        assert kube_cluster.kubectl("get", "crd", "finetuneruns.finetune.dev", check=False).returncode == 0


def operator_pod(kube_cluster) -> dict | None:
    pods = json.loads(kube_cluster.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l",
                                           f"app.kubernetes.io/instance={RELEASE}", "-o", "json").stdout)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    return running[0] if running else None


def operator_log(kube_cluster) -> str:
    pod = operator_pod(kube_cluster)
    return kube_cluster.pod_log(OPERATOR_NAMESPACE, pod["metadata"]["name"])[-6000:] if pod else "(no operator pod)"


def test_helm_installed_operator_runs_the_tiny_cpu_example_to_succeeded(kube_cluster, installed_operator):
    ports = installed_operator
    run = load_run()
    name = run["metadata"]["name"]
    claims = [d["metadata"]["name"] for d in yaml.safe_load_all(STORAGE.read_text()) if d]
    pvc_root = [kube_cluster.pvc_dir(RUN_NAMESPACE, claim) for claim in claims][0].parent
    demo_assets.write_for_run(run["spec"], pvc_root=pvc_root, log=lambda line: None)

    wait_for("the operator pod to run", lambda: operator_pod(kube_cluster), timeout_seconds=120,
             diagnose=lambda: kube_cluster.kubectl("describe", "pods", "-n", OPERATOR_NAMESPACE).stdout)

    # The webhook is reached through its Service with the chart's certificate: a bad run is
    # rejected at apply time with the operator's message (retry while the operator starts serving).
    bad = json.loads(json.dumps(run))
    bad["metadata"]["name"] = "no-prompts"
    bad["spec"]["data"].pop("prompts", None)
    bad["spec"]["stages"].setdefault("ppo", {})

    def rejected_by_webhook():
        result = kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
        if result.returncode == 0:
            pytest.fail(f"a run without spec.data.prompts was admitted:\n{result.stdout}")
        return "spec.data.prompts" in result.stderr and result.stderr

    message = wait_for("the webhook to reject a run without prompts", rejected_by_webhook, timeout_seconds=120,
                       diagnose=lambda: operator_log(kube_cluster))
    assert "admission webhook" in message

    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(run))

    def finished():
        obj = json.loads(kube_cluster.kubectl("get", "finetunerun", name, "-n", RUN_NAMESPACE, "-o", "json").stdout)
        state = (obj.get("status") or {}).get("state")
        return obj if state in ("Succeeded", "Failed") else None

    obj = wait_for(f"FineTuneRun {name} to finish", finished, timeout_seconds=RUN_TIMEOUT_SECONDS,
                   diagnose=lambda: kube_cluster.kubectl("get", "finetunerun", name, "-n", RUN_NAMESPACE,
                                                         "-o", "yaml").stdout + operator_log(kube_cluster))
    status = obj["status"]
    assert status["state"] == "Succeeded", yaml.safe_dump(status) + operator_log(kube_cluster)
    for stage, stage_status in (status.get("stages") or {}).items():
        if stage_status and stage_status.get("artifact"):
            final = demo_assets.pvc_path(stage_status["artifact"], pvc_root)
            assert (final / "config.json").exists(), f"{stage} artifact {final} has no model"

    # The operator's metrics and liveness endpoints answer on the pod's own IP at the chart's ports. Polled:
    # on a loaded node the liveness probe may have restarted the container (the operator is built to be
    # restarted), and a fresh container needs a moment before it listens; the diagnosis shows the restarts.
    def answers(port: int, path: str) -> bool:
        pod = operator_pod(kube_cluster)
        if pod is None or not pod["status"].get("podIP"):
            return False
        try:
            with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{port}{path}", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def container_history() -> str:
        pod = operator_pod(kube_cluster) or {}
        return json.dumps((pod.get("status") or {}).get("containerStatuses"), indent=1) + operator_log(kube_cluster)

    for port, path in ((ports["metrics"], "/metrics"), (ports["liveness"], "/healthz")):
        wait_for(f"the operator to answer {path} on port {port}", lambda: answers(port, path),
                 timeout_seconds=90, diagnose=container_history)
