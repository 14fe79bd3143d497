"""`python -m localcluster build|up|down|kubeconfig|status`.

`up` starts a detached daemon (this module's hidden `serve` command) that owns
the cluster; its state lives in `paths.run_dir()`: daemon.pid, admin.kubeconfig,
logs/, pids/ (every process group started, so `down` can clean up after a
crashed daemon).
"""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

from localcluster import build, paths
from localcluster.processes import kill_recorded, signal_group


def _daemon_pid(run_dir: pathlib.Path):
    try:
        pid = int((run_dir / "daemon.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pathlib.Path(f"/proc/{pid}").exists() else None


def command_build(args) -> int:
    build.build(keep_source=not args.drop_source)
    return 0


def command_up(args) -> int:
    run_dir = paths.run_dir()
    if _daemon_pid(run_dir):
        print(run_dir / "admin.kubeconfig")
        return 0
    build.build()
    command_down(args, quiet=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ready").unlink(missing_ok=True)
    log_path = run_dir / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "localcluster", "serve", "--nodes", str(args.nodes),
             "--gpus", str(args.gpus), "--runtime", args.runtime],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=dict(os.environ, PYTHONPATH=_pythonpath()),
        )
    (run_dir / "daemon.pid").write_text(str(daemon.pid))
    deadline = time.monotonic() + args.timeout
    while not (run_dir / "ready").exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            signal_group(daemon.pid, signal.SIGTERM)
            sys.stderr.write(log_path.read_text()[-4000:])
            sys.exit(f"localcluster up failed; daemon log: {log_path}")
        time.sleep(0.2)
    print(run_dir / "admin.kubeconfig")
    return 0


def _pythonpath() -> str:
    here = str(pathlib.Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH")
    return f"{here}:{existing}" if existing else here


def command_serve(args) -> int:
    from localcluster.cluster import Cluster, default_nodes

    run_dir = paths.run_dir()
    for stale in ("pids", "pods", "logs"):
        subprocess.run(["rm", "-rf", str(run_dir / stale)], check=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = Cluster(state_dir=run_dir, nodes=default_nodes(args.nodes, gpus=args.gpus),
                      runtime=args.runtime)
    with cluster:
        (run_dir / "ready").write_text(cluster.kubeconfig)
        stop.wait()
    (run_dir / "ready").unlink(missing_ok=True)
    return 0


def command_down(args, quiet=False) -> int:
    run_dir = paths.run_dir()
    pid = _daemon_pid(run_dir)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pathlib.Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    leftovers = kill_recorded(run_dir)
    _clean_real_node()
    (run_dir / "daemon.pid").unlink(missing_ok=True)
    (run_dir / "ready").unlink(missing_ok=True)
    if not quiet:
        print(f"localcluster down (daemon {pid or 'not running'}, "
              f"killed {len(leftovers)} leftover process groups)")
    return 0


def _clean_real_node() -> None:
    """Remove what a real node that died without stopping left (containers, mounts, cgroups),
    unless a live cluster (say a test run) holds the node: then it is not ours to touch."""
    from localcluster import node

    lock = node.NodeLock()
    try:
        lock.acquire()
    except node.NodeError:
        return
    try:
        node.clean_machine()
    finally:
        lock.release()


def command_images(args) -> int:
    from localcluster import images

    images.build_images()
    return 0


def command_kubeconfig(args) -> int:
    run_dir = paths.run_dir()
    if not (run_dir / "ready").exists():
        sys.exit("no local cluster is up: run `python -m localcluster up`")
    print(run_dir / "admin.kubeconfig")
    return 0


def command_status(args) -> int:
    run_dir = paths.run_dir()
    pid = _daemon_pid(run_dir)
    print(f"binaries: {paths.bin_dir()} ({'built' if build.binaries_present() else 'not built'})")
    print(f"daemon: {pid or 'not running'}; state: {run_dir}")
    if pid and (run_dir / "ready").exists():
        from localcluster import tools

        subprocess.run([str(tools.kubectl_path()), "--kubeconfig", str(run_dir / "admin.kubeconfig"),
                        "get", "nodes", "-o", "wide"])
    return 0 if pid else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build and cache the binaries (idempotent)")
    build_parser.add_argument("--drop-source", action="store_true",
                              help="delete the Kubernetes source tree after building (~1.5 GB)")
    for name in ("up", "serve"):
        sub = commands.add_parser(name, help="start a detached cluster" if name == "up" else argparse.SUPPRESS)
        sub.add_argument("--runtime", choices=("containerd", "agent"), default="containerd",
                         help="containerd: one real node (kubelet, containerd, runc; default); "
                              "agent: any number of fake nodes running pods as local processes")
        sub.add_argument("--nodes", type=int, default=1, help="number of nodes (more than 1 needs --runtime agent)")
        sub.add_argument("--gpus", type=int, default=2, help="nvidia.com/gpu per node")
        sub.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    commands.add_parser("images", help="build (or reuse) the trainer and operator images (idempotent)")
    commands.add_parser("down", help="stop the detached cluster and everything it started")
    commands.add_parser("kubeconfig", help="print the detached cluster's kubeconfig path")
    commands.add_parser("status", help="show whether the detached cluster runs")
    args = parser.parse_args(argv)
    handlers = {"build": command_build, "up": command_up, "serve": command_serve,
                "down": command_down, "images": command_images, "kubeconfig": command_kubeconfig,
                "status": command_status}
    try:
        return handlers[args.command](args)
    except build.BuildError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    sys.exit(main())
