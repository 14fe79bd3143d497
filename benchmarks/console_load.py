"""Console page load and memory with 100 runs and 10,000 steps of metric history.

    python benchmarks/console_load.py [--runs 100] [--steps 10000] [--api-latency-ms 5] [--no-browser]

A child process serves the real console (``ftconsole.server``: HTTP server, TokenReview and
SubjectAccessReview checks, history parsing, HTML and SVG rendering) against an in-memory cluster
that answers every API call after ``--api-latency-ms`` (a stand-in for the API server's round
trip). Every run's ``<run>-history`` holds what ``trainer.kube_reporter.MetricHistory`` keeps of a
PPO stage of ``--steps`` steps with 16 metrics and 32 held-out samples every 100 steps (built by
that class, so the size is the real one). The parent measures:

* server time per page (urllib, median and 95th percentile of 20 loads, review cache warm and cold);
* page load in headless chromium (Navigation Timing loadEventEnd, median of 5), unless --no-browser;
* the server process's resident memory after start and its peak after all loads (VmRSS, VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def history_json(steps: int) -> str:
    from trainer.kube_reporter import MetricHistory
    from trainer.reporting import ProgressEvent

    history = MetricHistory()
    names = ["score_mean", "reward_mean", "kl", "loss", "policy_loss", "value_loss", "entropy", "clipfrac",
             "approx_kl", "learning_rate", "tokens_per_second", "response_length", "value_mean", "advantage_std",
             "grad_norm", "ratio_mean"]
    for step in range(1, steps + 1):
        metrics = {name: (step * 0.001 + i) * (1.0 + 0.1 * ((step * 7919 + i) % 13 - 6) / 6)
                   for i, name in enumerate(names)}
        samples = None
        if step % 100 == 0:
            samples = [{"prompt": f"Held-out prompt {p}: tell me about cats and dogs",
                        "response": f"At step {step} the policy says something about cats ({p}). " * 3,
                        "reward": step / steps, "kl": 0.01 * p} for p in range(32)]
        history.add(ProgressEvent(stage="ppo", kind="samples" if samples else "progress", step=step,
                                  total_steps=steps, metrics=metrics, samples=samples, time=1.7e9 + step))
    return json.dumps(history.document(), separators=(",", ":"))


class BenchKube:
    """The ConsoleKube interface over memory; every call waits ``latency`` seconds."""

    def __init__(self, *, runs: int, history: str, latency: float):
        from ftconsole.kube import User

        self.user = User("bench-user", groups=["system:authenticated"])
        self.latency = latency
        self.history = {"history.json": history}  # one string shared by all runs: the data is not ours to hold
        self.runs = [{
            "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneRun",
            "metadata": {"namespace": f"team-{i % 5}", "name": f"run-{i:03d}", "creationTimestamp": "2026-12-01T10:00:00Z"},
            "status": {"state": "Running", "currentStage": "ppo", "progress": "ppo 9000/10000", "reward": 0.8,
                       "kl": 0.05, "stages": {"sft": {"state": "Succeeded", "attempts": 1},
                                              "ppo": {"state": "Running", "attempts": 1, "step": 9000}}}}
            for i in range(runs)]

    def _wait(self):
        time.sleep(self.latency)

    def token_review(self, token):
        self._wait()
        return self.user if token == TOKEN else None

    def access_review(self, user, **_):
        self._wait()
        return True

    def list_runs(self, namespaces):
        self._wait()
        return json.loads(json.dumps(self.runs))  # a fresh copy, as a real list would be

    def get_run(self, namespace, name):
        self._wait()
        return next((json.loads(json.dumps(r)) for r in self.runs if r["metadata"]["name"] == name), None)

    def config_map_data(self, namespace, name):
        self._wait()
        return dict(self.history)

    def list_labels(self, namespace, *, run=None):
        self._wait()
        return []

    def create_label(self, obj):
        raise NotImplementedError


def serve(args: argparse.Namespace) -> None:
    from http.server import ThreadingHTTPServer

    import kubernetes.client  # noqa: F401  (loaded by the real console: count its memory)

    from ftconsole.server import Console, handler_class

    kube = BenchKube(runs=args.runs, history=Path(args.history_file).read_text(), latency=args.api_latency_ms / 1000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class(Console(kube=kube)))
    server.daemon_threads = True
    print(json.dumps({"port": server.server_port, "history_bytes": len(kube.history["history.json"])}), flush=True)
    server.serve_forever()


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def timed_get(url: str) -> tuple[float, int]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request) as response:
        size = len(response.read())
    return time.perf_counter() - start, size


def browser_load_ms(base: str, paths: list[str], repeats: int) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(base + "/login")
        driver.add_cookie({"name": "ft_token", "value": TOKEN, "path": "/"})
        results = {}
        for path in paths:
            loads = []
            for _ in range(repeats):
                driver.get(base + path)
                loads.append(driver.execute_script(
                    "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;"))
            results[path] = statistics.median(loads)
        return results
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--api-latency-ms", type=float, default=5.0)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--history-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return

    started = time.perf_counter()
    # Built here, not in the server process, so its memory is the console's alone.
    history_file = Path(tempfile.mkdtemp()) / "history.json"
    history_file.write_text(history_json(args.steps))
    built = time.perf_counter() - started
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--runs", str(args.runs), "--history-file",
                              str(history_file), "--api-latency-ms", str(args.api_latency_ms)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    try:
        ready = json.loads(child.stdout.readline())
        base = f"http://127.0.0.1:{ready['port']}"
        print(f"{args.runs} runs, {args.steps} steps of PPO history with 16 metrics "
              f"({ready['history_bytes'] / 1000:.0f} kB history per run, built in {built:.1f} s); "
              f"API latency {args.api_latency_ms:g} ms per call")
        after_start = memory_kib(child.pid)
        pages = {"runs page (/)": "/", "run page (10k steps)": "/runs/team-0/run-000",
                 "run fragment (live refresh)": "/runs/team-0/run-000/fragment", "labelling page": "/runs/team-0/run-000/label"}
        for label, path in pages.items():
            cold, size = timed_get(base + path)
            warm = sorted(timed_get(base + path)[0] for _ in range(20))
            print(f"  {label:30s} {size / 1000:7.1f} kB  first {cold * 1000:6.1f} ms  "
                  f"median {statistics.median(warm) * 1000:6.1f} ms  p95 {warm[18] * 1000:6.1f} ms")
        if not args.no_browser:
            loads = browser_load_ms(base, ["/", "/runs/team-0/run-000", "/runs/team-0/run-000/label"], repeats=5)
            for path, ms in loads.items():
                print(f"  chromium load {path:32s} median {ms:6.0f} ms")
        after = memory_kib(child.pid)
        print(f"  console memory: {after_start['VmRSS'] / 1024:.0f} MiB resident after start (history data included), "
              f"{after['VmRSS'] / 1024:.0f} MiB after the loads, peak {after['VmHWM'] / 1024:.0f} MiB")
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
