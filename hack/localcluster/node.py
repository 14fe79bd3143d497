"""A real node: containerd + runc, a CNI bridge, the kubelet and kube-proxy.

The kubelet (built from the same 1.20.2 source as the control plane) registers
with our API server under its own TLS identity (`system:node:<name>`, checked
by the Node authorizer), runs pods through containerd's CRI plugin with runc,
and each pod gets its own network namespace and IP on the bridge `lcbr0`
(10.88.0.0/16, gateway 10.88.0.1 on the host). kube-proxy (iptables mode)
makes ClusterIP Services work, so pods reach the API server through the
`kubernetes` Service like on any cluster.

One real node per machine: the kubelet, kube-proxy and containerd own
machine-wide things (cgroups, iptables chains, /var/log/pods), so `start`
takes a lock and fails, naming the holder, when another cluster has it (after waiting
$FINETUNE_NODE_LOCK_WAIT_SECONDS, default 0); a node that never took the lock cleans nothing.
Fixed locations (so that leftovers of a crashed run can be found and cleaned
at the next start):

* `cache_root()/node/containerd`: containerd's root; keeps imported images
  across cluster starts, so an image is imported once;
* `cache_root()/node/kubelet`: the kubelet's root dir (wiped at start);
* `/run/finetune-localcluster`: containerd's state, socket and runc state;
* cgroup `/localcluster` in every v1 hierarchy: the kubelet's cgroup root.

The pure functions below build each component's configuration; `RealNode`
does the I/O.
"""

import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import time

import yaml

from localcluster import paths
from localcluster.dns import CLUSTER_DOMAIN
from localcluster.pause import SANDBOX_IMAGE

POD_CIDR = "10.88.0.0/16"
GATEWAY_IP = "10.88.0.1"
BRIDGE = "lcbr0"
CNI_NETWORK = "localcluster"
CNI_BIN_DIR = "/usr/lib/cni"
CGROUP_ROOT = "localcluster"
RUN_DIR = pathlib.Path("/run/finetune-localcluster")
NETNS_DIRS = (pathlib.Path("/var/run/netns"), pathlib.Path("/run/netns"))
# The node's InternalIP, where the API server reaches the kubelet (logs, exec,
# port-forward). The kubelet refuses a loopback node IP, so it is the bridge's
# gateway address, which the host owns.
NODE_IP = GATEWAY_IP


class NodeError(RuntimeError):
    """The node could not start: the message names the step and the reason."""


def node_dir() -> pathlib.Path:
    return paths.cache_root() / "node"


# ----------------------------------------------------------------------------- pure configuration


def containerd_config(*, root: pathlib.Path, state: pathlib.Path, address: pathlib.Path,
                      cni_conf_dir: pathlib.Path, cri: bool = True) -> str:
    """containerd 1.6 config (TOML). cri=False gives a containerd for housekeeping only."""
    lines = [
        "version = 2",
        f'root = "{root}"',
        f'state = "{state}"',
        "[grpc]",
        f'  address = "{address}"',
        "[ttrpc]",
        f'  address = "{address}.ttrpc"',
    ]
    if not cri:
        lines.insert(1, 'disabled_plugins = ["io.containerd.grpc.v1.cri"]')
        return "\n".join(lines) + "\n"
    lines += [
        '[plugins."io.containerd.grpc.v1.cri"]',
        f'  sandbox_image = "{SANDBOX_IMAGE}"',
        # Root here lacks CAP_SYS_RESOURCE: without this the pause container's
        # oom_score_adj -998 fails every sandbox ("can't get final child's PID").
        "  restrict_oom_score_adj = true",
        "  enable_selinux = false",
        '[plugins."io.containerd.grpc.v1.cri".containerd]',
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
        '  runtime_type = "io.containerd.runc.v2"',
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
        "  SystemdCgroup = false",
        f'  Root = "{state / "runc"}"',
        '[plugins."io.containerd.grpc.v1.cri".cni]',
        f'  bin_dir = "{CNI_BIN_DIR}"',
        f'  conf_dir = "{cni_conf_dir}"',
        "  max_conf_num = 1",
    ]
    return "\n".join(lines) + "\n"


def cni_config(*, ipam_data_dir: pathlib.Path) -> dict:
    """A bridge with per-pod addresses from host-local IPAM (state kept in our dir, not /var/lib/cni)."""
    return {
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(*, port: int, healthz_port: int, ca_file: pathlib.Path, tls_cert: pathlib.Path,
                   tls_key: pathlib.Path) -> dict:
    """KubeletConfiguration: x509 client auth from our CA only, cgroupfs under /localcluster."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(tls_cert),
        "tlsPrivateKeyFile": str(tls_key),
        # Only holders of a certificate from our CA (the API server) may call the kubelet.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca_file)}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "failSwapOn": False,
        "resolvConf": "/etc/resolv.conf",
        # Cluster DNS (dns.py) on the node IP: pods resolve <svc>.<ns>.svc like on any conformant cluster.
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "serializeImagePulls": False,
        # Our images cannot be pulled again once removed: never garbage-collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # The disk is shared with the developer's machine: evict only when it is really full.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "containerLogMaxSize": "10Mi",
        "maxPods": 110,
        # ConfigMap and Secret volumes refresh on this period (default 1 minute).
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "hairpinMode": "hairpin-veth",
        "makeIPTablesUtilChains": True,
    }


def kube_proxy_config(*, kubeconfig: pathlib.Path, node_name: str, healthz_port: int,
                      metrics_port: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name,
        "clusterCIDR": POD_CIDR,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # Leave the machine's conntrack sysctls alone (they may be read-only here).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
    }


def extended_resources_patch(gpus: int) -> list:
    """JSON patch for nodes/status advertising fake GPUs (the documented way to add extended resources)."""
    return [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(gpus)}]


# ----------------------------------------------------------------------------- machine-wide state


def _cgroup_hierarchies() -> list:
    base = pathlib.Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]  # cgroup v2: one hierarchy
    return [p for p in sorted(base.iterdir()) if p.is_dir() and not p.is_symlink()]


def _processes_in_cgroup(root: pathlib.Path) -> set:
    pids = set()
    for procs in root.rglob("cgroup.procs"):
        try:
            pids.update(int(line) for line in procs.read_text().split())
        except OSError:
            continue
    return pids


def _our_processes() -> set:
    """Leftover containerd shims and node daemons of an earlier run (found by our paths in argv)."""
    markers = (str(RUN_DIR), str(node_dir()))
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in argv for marker in markers):
            found.add(int(entry.name))
    return found


def _mounts_under(prefixes) -> list:
    """Mount points under any of prefixes, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == str(p) or point.startswith(str(p) + "/") for p in prefixes):
                points.append(point)
    return sorted(set(points), key=len, reverse=True)


def clean_machine(*, log=print) -> None:
    """Remove what an earlier real node left on this machine: processes, mounts, cgroups, bridge.

    Idempotent; called before every start and at stop. Never touches anything
    outside our fixed locations (RUN_DIR, node_dir(), cgroup /localcluster,
    network namespaces named cni-*, the lcbr0 bridge, kube-proxy's chains).
    """
    victims = _our_processes()
    for hierarchy in _cgroup_hierarchies():
        victims |= _processes_in_cgroup(hierarchy / CGROUP_ROOT)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(pathlib.Path(f"/proc/{pid}").exists() for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.05)
    netns = [ns for d in NETNS_DIRS if d.is_dir() for ns in d.glob("cni-*")]
    for point in _mounts_under([RUN_DIR, node_dir() / "kubelet", *netns]):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for ns in netns:
        ns.unlink(missing_ok=True)
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / CGROUP_ROOT
        if root.is_dir():
            for directory in sorted((p for p in root.rglob("*") if p.is_dir()),
                                    key=lambda p: len(p.parts), reverse=True):
                try:
                    directory.rmdir()
                except OSError:
                    pass
            try:
                root.rmdir()
            except OSError:
                pass
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    shutil.rmtree(node_dir() / "kubelet", ignore_errors=True)
    shutil.rmtree(node_dir() / "cni", ignore_errors=True)
    if pathlib.Path(f"/sys/class/net/{BRIDGE}").exists():
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    if victims:
        log(f"[localcluster node] cleaned up {len(victims)} leftover processes of an earlier node")


def make_cgroup_root() -> None:
    """/localcluster in every hierarchy (the kubelet requires its cgroup root to exist)."""
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / CGROUP_ROOT
        root.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            # A new cpuset has no CPUs or memory nodes until given some.
            for name in ("cpuset.cpus", "cpuset.mems"):
                (root / name).write_text((hierarchy / name).read_text())


def make_bridge() -> None:
    """Create lcbr0 with the gateway address before anything starts: the API server
    advertises GATEWAY_IP (the `kubernetes` Service endpoint pods reach) from its first second."""
    if not pathlib.Path(f"/sys/class/net/{BRIDGE}").exists():
        for argv in (["ip", "link", "add", BRIDGE, "type", "bridge"],
                     ["ip", "addr", "add", f"{GATEWAY_IP}/16", "dev", BRIDGE],
                     ["ip", "link", "set", BRIDGE, "up"]):
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                raise NodeError(f"network: `{' '.join(argv)}` failed: {result.stderr.strip()}")


class NodeLock:
    """An exclusive flock on cache_root()/node/lock for as long as a real node runs."""

    def __init__(self):
        self.path = node_dir() / "lock"
        self.handle = None

    def acquire(self, wait_seconds: float | None = None) -> None:
        """Take the lock, waiting up to ``wait_seconds`` (default: $FINETUNE_NODE_LOCK_WAIT_SECONDS, else 0)
        for another real node on this machine to stop; then fail naming the holder."""
        if wait_seconds is None:
            wait_seconds = float(os.environ.get("FINETUNE_NODE_LOCK_WAIT_SECONDS", "0"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        deadline = time.monotonic() + wait_seconds
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    handle.close()
                    raise NodeError(
                        f"another local cluster with a real node is running ({holder}); one real node per "
                        "machine: stop it first (`python -m localcluster down`, or end the test run)"
                    ) from None
                if not announced:
                    print(f"[localcluster] waiting up to {wait_seconds:.0f} s for the real node held by "
                          f"{holder}", flush=True)
                    announced = True
                time.sleep(1.0)  # polling a lock, not waiting for readiness: flock has no timeout
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle

    @property
    def held(self) -> bool:
        return self.handle is not None

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# ----------------------------------------------------------------------------- the node


class RealNode:
    """containerd, kubelet and kube-proxy for one node, as children in `processes`.

    Credentials come from the cluster: `kubeconfig_for(identity)` writes a
    kubeconfig for a signed identity (see pki.node_identities) and returns its path.
    """

    def __init__(self, *, name: str, gpus: int, labels: dict, bin_dir: pathlib.Path,
                 state_dir: pathlib.Path, processes, pki_dir: pathlib.Path, kubeconfig_for,
                 free_port, log=print):
        self.name = name
        self.gpus = gpus
        self.labels = labels
        self.bin_dir = bin_dir
        self.state_dir = state_dir
        self.processes = processes
        self.pki_dir = pki_dir
        self.kubeconfig_for = kubeconfig_for
        self.free_port = free_port
        self.log = log
        self.lock = NodeLock()
        self.address = RUN_DIR / "containerd.sock"
        self.containerd = None
        self.started_steps: list = []

    # -- steps, each timed; a failure names its step -------------------------------------------

    def _step(self, name: str, action):
        started = time.monotonic()
        try:
            result = action()
        except NodeError:
            raise
        except Exception as exc:
            raise NodeError(f"real node step {name!r} failed: {type(exc).__name__}: {exc}") from exc
        elapsed = time.monotonic() - started
        self.started_steps.append((name, elapsed))
        self.log(f"[localcluster node] {name} done in {elapsed:.1f}s")
        return result

    def prepare(self) -> None:
        """Before the API server starts: the lock, a clean machine, the bridge and cgroup root."""
        self._step("lock", self.lock.acquire)
        self._step("clean leftovers", lambda: clean_machine(log=self.log))
        self._step("bridge and cgroup root", lambda: (make_bridge(), make_cgroup_root()))

    def start(self, *, deadline: float, archives) -> None:
        """containerd (+ images), kubelet, kube-proxy; returns once the processes run.

        The cluster waits for the node to be Ready and then calls `advertise_gpus`.
        """
        self._step("containerd", lambda: self._start_containerd(deadline))
        self._step("import images", lambda: self._import(archives))
        self._step("kubelet", self._start_kubelet)
        self._step("kube-proxy", self._start_kube_proxy)

    def stop(self) -> None:
        if not self.lock.held:
            # Never took the lock (refused, or interrupted while waiting): the machine's containers,
            # bridge and iptables belong to the node that holds it, so there is nothing of ours to clean.
            return
        try:
            clean_machine(log=self.log)
            subprocess.run([str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True, timeout=60)
        finally:
            self.lock.release()

    # -- containerd ---------------------------------------------------------------------------

    def _containerd(self, *, cri: bool, log_name: str):
        root = node_dir() / "containerd"
        config = self.state_dir / f"{log_name}.toml"
        config.write_text(containerd_config(
            root=root, state=RUN_DIR / "containerd", address=self.address,
            cni_conf_dir=node_dir() / "cni" / "net.d", cri=cri))
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        process = self.processes.spawn(["containerd", "--config", config],
                                       log_path=self.state_dir / "logs" / f"{log_name}.log")
        return process

    def _wait_for_containerd(self, process, deadline: float, log_name: str) -> None:
        while True:
            if process.poll() is not None:
                raise NodeError(f"containerd exited with {process.returncode}; log: "
                                f"{self.state_dir / 'logs' / (log_name + '.log')}")
            probe = self.ctr("version", check=False)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NodeError(f"containerd did not answer on {self.address}: {probe.stderr.strip()}")
            time.sleep(0.1)

    def ctr(self, *args, check=True, namespace="k8s.io") -> subprocess.CompletedProcess:
        result = subprocess.run(["ctr", "--address", str(self.address), "-n", namespace, *map(str, args)],
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise NodeError(f"ctr {' '.join(map(str, args))}: {result.stderr.strip()}")
        return result

    def _start_containerd(self, deadline: float) -> None:
        cni_dir = node_dir() / "cni"
        (cni_dir / "net.d").mkdir(parents=True, exist_ok=True)
        (cni_dir / "ipam").mkdir(parents=True, exist_ok=True)
        import json

        (cni_dir / "net.d" / "10-localcluster.conflist").write_text(
            json.dumps(cni_config(ipam_data_dir=cni_dir / "ipam"), indent=2))
        # The image store survives between clusters, and with it the containers of the
        # last one: remove those with the CRI plugin off, so that it starts with no
        # sandboxes to recover.
        if (node_dir() / "containerd" / "io.containerd.metadata.v1.bolt" / "meta.db").exists():
            housekeeping = self._containerd(cri=False, log_name="containerd-housekeeping")
            try:
                self._wait_for_containerd(housekeeping, deadline, "containerd-housekeeping")
                stale = self.ctr("containers", "list", "--quiet").stdout.split()
                for container in stale:
                    self.ctr("tasks", "delete", "--force", container, check=False)
                if stale:
                    self.ctr("containers", "delete", *stale, check=False)
            finally:
                self.processes.terminate(housekeeping, grace_seconds=5)
        self.containerd = self._containerd(cri=True, log_name="containerd")
        self._wait_for_containerd(self.containerd, deadline, "containerd")

    def _import(self, archives) -> None:
        from localcluster import images

        images.import_images(list(archives), containerd_address=str(self.address), log=self.log)

    # -- kubelet and kube-proxy ----------------------------------------------------------------

    def _start_kubelet(self) -> None:
        root = node_dir() / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        config = self.state_dir / "kubelet.yaml"
        self.kubelet_port = self.free_port()
        config.write_text(yaml.safe_dump(kubelet_config(
            port=self.kubelet_port, healthz_port=self.free_port(), ca_file=self.pki_dir / "ca.crt",
            tls_cert=self.pki_dir / "kubelet-serving.crt", tls_key=self.pki_dir / "kubelet-serving.key")))
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        argv = [self.bin_dir / "kubelet", f"--config={config}",
                f"--kubeconfig={self.kubeconfig_for('kubelet-client')}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self.address}",
                "--runtime-request-timeout=15m",
                f"--pod-infra-container-image={SANDBOX_IMAGE}",
                f"--hostname-override={self.name}", f"--node-ip={NODE_IP}",
                f"--root-dir={root}", f"--cert-dir={self.pki_dir}",
                f"--volume-plugin-dir={root / 'volume-plugins'}",
                "--v=1"]
        if labels:
            argv.append(f"--node-labels={labels}")
        self.kubelet_argv = argv
        self.kubelet = self.processes.spawn(argv, log_path=self.state_dir / "logs" / "kubelet.log")

    def stop_kubelet(self) -> None:
        """Kill the kubelet (as a lost node: containers keep running, nobody reports them)."""
        self.processes.terminate(self.kubelet, grace_seconds=0)

    def start_kubelet(self) -> None:
        """Start the kubelet again with the same settings and root dir (as a node coming back)."""
        self.kubelet = self.processes.spawn(self.kubelet_argv, log_path=self.state_dir / "logs" / "kubelet.log")

    def _start_kube_proxy(self) -> None:
        config = self.state_dir / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump(kube_proxy_config(
            kubeconfig=self.kubeconfig_for("kube-proxy"), node_name=self.name,
            healthz_port=self.free_port(), metrics_port=self.free_port())))
        self.processes.spawn([self.bin_dir / "kube-proxy", f"--config={config}", "--v=1"],
                             log_path=self.state_dir / "logs" / "kube-proxy.log")

    def advertise_gpus(self, core) -> None:
        """Patch the fake GPUs onto the registered node's status (as a device plugin would)."""
        if self.gpus:
            core.patch_node_status(self.name, extended_resources_patch(self.gpus))
