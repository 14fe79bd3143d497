"""How the operator scales with the number of FineTuneRuns, on the local control plane.

Creates N three-stage runs at once whose stage pods do no training: the operator is started with
its benchmark hook ``--stage-command-override`` (not a user feature), so each pod only writes
``final/COMPLETE`` into its output directory and exits. What is left is the operator's own work.

    python benchmarks/operator_scale.py --runs 10
    python benchmarks/operator_scale.py --runs 200 --kubeconfig ~/.cache/finetune-localcluster/run/admin.kubeconfig

Prints (and with --json writes):

* apply -> first pod: from the run's create request to the watch seeing its SFT pod;
* pod success -> next stage pod: from the watch seeing a stage pod Succeeded to seeing the next stage's pod;
* apply -> run Succeeded;
* operator CPU seconds and peak RSS (from /proc);
* API requests per run: the operator's own count (finetune_operator_api_requests_total, the
  reconciler's requests; kopf's watches and finalizer patches are not in it) and the API server's
  apiserver_request_total delta by resource (everything: operator, kopf, node agent, scheduler, GC).

Without --kubeconfig a fresh local cluster is started (needs `python -m localcluster build`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import urllib3
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "finetuneruns.finetune.dev.yaml"
STAGES = ("sft", "reward", "ppo")
STAGE_COMMAND = 'mkdir -p "$FINETUNE_OUTPUT_DIR/final" && touch "$FINETUNE_OUTPUT_DIR/final/COMPLETE"'
_REQUEST_LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_manifest(name: str) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/tiny"},
            "data": {"sft": "pvc://datasets/sft.jsonl", "preferences": "pvc://datasets/preferences.jsonl",
                     "prompts": "pvc://datasets/prompts.jsonl"},
            "stages": {"sft": {"maxSteps": 1}, "reward": {"maxSteps": 1}, "ppo": {"steps": 1, "batchSize": 4}},
            "artifacts": {"pvc": "runs"},
            "image": "local/finetune-trainer",
        },
    }


class PodWatch:
    """Watches the namespace's pods; records when each (run, stage) pod is first seen and seen Succeeded."""

    def __init__(self, api, namespace: str):
        self.api = api
        self.namespace = namespace
        self.added: dict[tuple[str, str], float] = {}
        self.succeeded: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        client = self.api._client
        resource_version = ""
        while not self._stop.is_set():
            query = [("watch", "1"), ("labelSelector", "finetune.dev/run"), ("timeoutSeconds", "30"),
                     ("allowWatchBookmarks", "false")]
            if resource_version:
                query.append(("resourceVersion", resource_version))
            method, url, headers, _, _ = client.param_serialize(
                method="GET", resource_path=f"/api/v1/namespaces/{self.namespace}/pods", query_params=query,
                header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
            response = client.rest_client.pool_manager.request(method, url, headers=headers, preload_content=False,
                                                               timeout=60)
            buffer = b""
            try:
                for chunk in response.stream(4096):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            resource_version = self._record(json.loads(line)) or resource_version
                    if self._stop.is_set():
                        break
            except urllib3.exceptions.ProtocolError:
                # The API server ends watch streams at shutdown (and on timeouts): start a new one or stop.
                continue
            finally:
                response.release_conn()

    def _record(self, event: dict) -> str | None:
        now = time.monotonic()
        pod = event.get("object") or {}
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        key = (labels.get("finetune.dev/run"), labels.get("finetune.dev/stage"))
        if key[0] and key[1] and labels.get("finetune.dev/attempt") == "1":
            self.added.setdefault(key, now)
            if (pod.get("status") or {}).get("phase") == "Succeeded":
                self.succeeded.setdefault(key, now)
        return meta.get("resourceVersion")


def apiserver_requests(api) -> Counter:
    """apiserver_request_total summed by resource (all verbs, codes and clients)."""
    text = api._client.call_api(*api._client.param_serialize(
        method="GET", resource_path="/metrics", auth_settings=["BearerToken"])[:3]).read().decode()
    totals: Counter = Counter()
    for line in text.splitlines():
        match = _REQUEST_LINE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            totals[labels.get("resource") or "other"] += float(match["value"])
    return totals


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MiB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    return cpu, peak_kib / 1024


def operator_requests(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("finetune_operator_api_requests_total{"))


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "p50": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1]}


def benchmark(*, runs: int, kubeconfig: str, webhook: bool, timeout: float, log_dir: Path) -> dict:
    from kubernetes import config as kube_config

    from ftoperator.kubeapi import KubeApi

    api = KubeApi(kube_config.new_client_from_config(config_file=kubeconfig))
    _ensure_crd(api)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    api.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": namespace}})

    metrics_port, liveness_port, webhook_port = free_port(), free_port(), free_port()
    env = dict(os.environ, KUBECONFIG=kubeconfig)
    command = [sys.executable, "-m", "ftoperator", "--namespace", namespace, "--trainer-image", "local/trainer",
               "--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port),
               "--trainer-metrics-port", "0", "--stage-command-override", STAGE_COMMAND]
    command += ["--webhook-url", f"https://127.0.0.1:{webhook_port}"] if webhook else ["--no-webhook"]
    log_path = log_dir / f"operator-{namespace}.log"
    with open(log_path, "w") as log:
        operator = subprocess.Popen(command, env=env, cwd=log_dir, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        _wait(lambda: _healthy(liveness_port), 60, "the operator to start")
        if webhook:
            _wait(lambda: _webhook_registered(api), 30, "the webhook configuration")
        watch = PodWatch(api, namespace)
        watch.start()
        time.sleep(1.0)  # the watch connects; runs created before would only be seen by listing
        cpu_before, _ = process_usage(operator.pid)
        requests_before, operator_before = apiserver_requests(api), operator_requests(metrics_port)

        applied: dict[str, float] = {}
        names = [f"scale-{i:04d}" for i in range(runs)]
        for name in names:
            applied[name] = time.monotonic()
            api.request("POST", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetuneruns",
                        body=run_manifest(name))
        started = time.monotonic()

        finished: dict[str, float] = {}
        deadline = started + timeout
        while len(finished) < runs and time.monotonic() < deadline:
            items = api.request("GET", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetuneruns")["items"]
            for item in items:
                state = (item.get("status") or {}).get("state")
                if state in ("Succeeded", "Failed") and item["metadata"]["name"] not in finished:
                    finished[item["metadata"]["name"]] = time.monotonic()
            time.sleep(0.5)
        watch.stop()

        cpu_after, peak_mib = process_usage(operator.pid)
        requests_after, operator_after = apiserver_requests(api), operator_requests(metrics_port)
        states = Counter((item.get("status") or {}).get("state") for item in api.request(
            "GET", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetuneruns")["items"])
    finally:
        os.killpg(operator.pid, signal.SIGTERM)
        operator.wait(timeout=30)
        if webhook:
            for kind in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations"):
                try:
                    api.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{kind}/finetune.dev")
                except Exception:
                    pass

    first_pod = [watch.added[(n, "sft")] - applied[n] for n in names if (n, "sft") in watch.added]
    next_pod = [watch.added[(n, after)] - watch.succeeded[(n, before)]
                for n in names for before, after in zip(STAGES, STAGES[1:])
                if (n, after) in watch.added and (n, before) in watch.succeeded]
    total = [finished[n] - applied[n] for n in names if n in finished]
    delta = requests_after - requests_before
    by_resource = {k: round(v / runs, 1) for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}
    return {
        "runs": runs,
        "webhook": webhook,
        "namespace": namespace,
        "states": dict(states),
        "wall_seconds": round(max(finished.values(), default=time.monotonic()) - started, 2),
        "apply_to_first_pod_seconds": summary(first_pod),
        "pod_succeeded_to_next_stage_pod_seconds": summary(next_pod),
        "apply_to_run_succeeded_seconds": summary(total),
        "operator_cpu_seconds": round(cpu_after - cpu_before, 2),
        "operator_peak_rss_mib": round(peak_mib, 1),
        "operator_reconciler_requests_per_run": round((operator_after - operator_before) / runs, 1),
        "apiserver_requests_per_run": round(sum(delta.values()) / runs, 1),
        "apiserver_requests_per_run_by_resource": by_resource,
        "operator_log": str(log_path),
    }


def _ensure_crd(api) -> None:
    from ftoperator.kubeapi import ApiError

    crd = yaml.safe_load(CRD.read_text())
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    try:
        api.request("POST", path, body=crd)
    except ApiError as exc:
        if exc.status != 409:
            raise
    _wait(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in
                      api.request("GET", f"{path}/{crd['metadata']['name']}").get("status", {}).get("conditions") or []),
          60, "the CRD to be established")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def _webhook_registered(api) -> bool:
    try:
        api.request("GET", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/finetune.dev")
        return True
    except Exception:
        return False


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _format(seconds: dict) -> str:
    if not seconds.get("n"):
        return "n/a"
    return f"p50 {seconds['p50']:.2f}s  p90 {seconds['p90']:.2f}s  max {seconds['max']:.2f}s  (n={seconds['n']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="number of FineTuneRuns created at once")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a local one")
    parser.add_argument("--no-webhook", action="store_true", help="run the operator without its webhook")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all runs to finish")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    cluster = None
    kubeconfig = args.kubeconfig
    if kubeconfig is None:
        from localcluster.cluster import Cluster

        cluster = Cluster(log=lambda line: None).start()
        kubeconfig = cluster.kubeconfig
    try:
        result = benchmark(runs=args.runs, kubeconfig=kubeconfig, webhook=not args.no_webhook,
                           timeout=args.timeout, log_dir=log_dir)
    finally:
        if cluster is not None:
            cluster.stop()

    print(f"operator scale benchmark: {result['runs']} runs x 3 stages, webhook {'on' if result['webhook'] else 'off'}")
    print(f"  final states:                    {result['states']}  (all done in {result['wall_seconds']}s)")
    print(f"  apply -> first pod:              {_format(result['apply_to_first_pod_seconds'])}")
    print(f"  pod succeeded -> next stage pod: {_format(result['pod_succeeded_to_next_stage_pod_seconds'])}")
    print(f"  apply -> run Succeeded:          {_format(result['apply_to_run_succeeded_seconds'])}")
    print(f"  operator CPU:                    {result['operator_cpu_seconds']}s "
          f"({result['operator_cpu_seconds'] / result['runs']:.3f}s per run), peak RSS {result['operator_peak_rss_mib']} MiB")
    print(f"  API requests per run:            operator reconciler {result['operator_reconciler_requests_per_run']}, "
          f"API server total {result['apiserver_requests_per_run']}")
    print(f"    by resource (all clients):     {result['apiserver_requests_per_run_by_resource']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
