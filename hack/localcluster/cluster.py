"""`Cluster`: etcd + kube-apiserver + controller-manager + scheduler + a node.

The node is real by default (`runtime="containerd"`: the kubelet, containerd,
runc, a CNI bridge and kube-proxy; see node.py), or, with `runtime="agent"`,
the process-running node agent (agent.py), which fakes any number of nodes
and is kept for tests that need many of them.

Everything the cluster starts lives in one state directory and is stopped by
`stop()` (also registered with atexit). Usage:

    with Cluster() as cluster:
        subprocess.run([cluster.kubectl_path, "--kubeconfig", cluster.kubeconfig, "get", "nodes"])
"""

import atexit
import base64
import dataclasses
import datetime
import os
import pathlib
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import yaml

from localcluster import build, node, paths, pki, tools, volumes
from localcluster.processes import ProcessGroups

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
ADMIN_USER = "localcluster-admin"


class ClusterError(RuntimeError):
    """The cluster could not start or a request about it cannot be answered."""


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One node. Quantities use Kubernetes notation ("16", "64Gi").

    A real node reports the machine's cpu and memory; only `name`, `gpus`
    (fake nvidia.com/gpu, an extended resource) and `labels` apply to it.
    """

    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    gpus: int = 2
    labels: dict = dataclasses.field(default_factory=dict)

    def capacity(self) -> dict:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "nvidia.com/gpu": str(self.gpus),
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }


def default_nodes(count: int = 1, *, gpus: int = 2) -> list:
    return [NodeSpec(name=f"local-gpu-{i}", gpus=gpus) for i in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RUNTIMES = ("containerd", "agent")


class Cluster:
    """A local control plane plus one real node (default) or node-agent nodes.

    state_dir: where certificates, logs, etcd data and PVC dirs go; a fresh
    temp dir (removed by stop()) when None. runtime: "containerd" (one real
    node; one such cluster per machine) or "agent" (any number of fake nodes,
    pods as local processes).
    """

    def __init__(self, *, state_dir=None, nodes=None, bin_dir=None, log=print, runtime="containerd"):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}: expected one of {RUNTIMES}")
        self.nodes = list(nodes) if nodes is not None else default_nodes()
        if runtime == "containerd" and len(self.nodes) != 1:
            raise ValueError(f"a real node cluster has exactly one node, got {len(self.nodes)}; "
                             "use runtime='agent' for several fake nodes")
        self.runtime = runtime
        self._owns_state_dir = state_dir is None
        self.state_dir = pathlib.Path(state_dir or tempfile.mkdtemp(prefix="localcluster-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.bin_dir = pathlib.Path(bin_dir or paths.bin_dir())
        self.log = log
        self.processes = ProcessGroups(self.state_dir)
        self.kubeconfig = str(self.state_dir / "admin.kubeconfig")
        self.apiserver_port = None
        self.admin_token = secrets.token_hex(16)
        self.agent = None
        self.node = None
        self.provisioner = None
        self._stopped = False

    @property
    def uses_node_agent(self) -> bool:
        return self.runtime == "agent"

    # --- lifecycle -------------------------------------------------------

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def start(self, *, timeout_seconds: float = 300):
        """Start everything and wait until nodes are Ready; raise ClusterError on failure."""
        missing = [n for n in build.COMPONENTS + ("etcd",) if not (self.bin_dir / n).is_file()]
        if missing:
            raise ClusterError(
                f"{missing} not in {self.bin_dir}: run `python -m localcluster build` first"
            )
        archives = build.image_archives(log=self.log) if self.runtime == "containerd" else []
        atexit.register(self.stop)
        try:
            if self.runtime == "containerd":
                self.node = self._real_node()
                self.node.prepare()  # may wait for another real node's lock: the deadline starts after it
            started = time.monotonic()
            deadline = started + timeout_seconds
            self._timed("certificates", self._write_pki_and_configs)
            self._timed("etcd", lambda: self._start_etcd(deadline))
            self._timed("kube-apiserver", lambda: self._start_apiserver(deadline))
            self._start_controllers()
            if self.node is not None:
                self.provisioner = volumes.HostPathProvisioner(
                    api_client_factory=self.api_client, root=self.state_dir / "pvcs", log=self.log)
                self.provisioner.start()
                self._timed("cluster DNS", lambda: self._start_dns(deadline))
                self.node.start(deadline=deadline, archives=archives)
            else:
                from localcluster.agent import NodeAgent

                self.agent = NodeAgent(
                    api_client_factory=self.api_client, nodes=self.nodes,
                    state_dir=self.state_dir, processes=self.processes,
                    apiserver_port=self.apiserver_port, ca_file=self.state_dir / "pki" / "ca.crt",
                    log=self.log,
                )
                self.agent.start()
            self._timed("node Ready", lambda: self._wait_until_usable(deadline))
        except node.NodeError as exc:
            self.stop()
            raise ClusterError(str(exc)) from exc
        except BaseException:
            self.stop()
            raise
        self.log(f"[localcluster] cluster up in {time.monotonic() - started:.1f}s, "
                 f"KUBECONFIG={self.kubeconfig}")
        return self

    def stop(self) -> None:
        """Stop the agent (killing pod processes) and all components. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self.agent is not None:
            self.agent.stop()
        if self.provisioner is not None:
            self.provisioner.stop()
        # A throwaway cluster needs no graceful drain; the apiserver alone takes 5 s.
        self.processes.terminate_all(grace_seconds=1)
        if self.node is not None:
            self.node.stop()
        if getattr(self, "etcd_data", None):
            shutil.rmtree(self.etcd_data, ignore_errors=True)
        if self._owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # --- public helpers ----------------------------------------------------

    @property
    def kubectl_path(self) -> str:
        return str(tools.kubectl_path())

    @property
    def helm_path(self) -> str:
        return str(tools.helm_path())

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def kubectl(self, *args, check=True, input=None) -> subprocess.CompletedProcess:
        """Run the real kubectl against this cluster; text stdout/stderr captured."""
        return run_kubectl(self.kubectl_path, self.kubeconfig, args, check=check, input=input)

    def api_client(self):
        """A new kubernetes.client.ApiClient authenticated as the admin."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.state_dir / "pki" / "ca.crt")
        configuration.api_key = {"authorization": f"Bearer {self.admin_token}"}
        configuration.connection_pool_maxsize = 32
        return client.ApiClient(configuration)

    def pvc_dir(self, namespace: str, claim: str, *, size: str = "10Gi") -> pathlib.Path:
        """Host directory behind the claim `claim` in `namespace` (created; pre-populate it).

        On a real node the PersistentVolumeClaim is created too when it does not
        exist (ReadWriteOnce, `size`), and the provisioner binds it to a hostPath
        volume on this directory, so the pod mounts exactly these files.
        """
        if self.runtime == "agent":
            directory = self.state_dir / "pvcs" / namespace / claim
            directory.mkdir(parents=True, exist_ok=True)
            return directory
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        directory = volumes.host_dir(self.state_dir / "pvcs", namespace, claim)
        claim_object = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim},
                        "spec": {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": size}}}}
        try:
            client.CoreV1Api(self.api_client()).create_namespaced_persistent_volume_claim(
                namespace, claim_object)
        except ApiException as exc:
            if exc.status != 409:
                raise
        return directory

    def pod_log(self, namespace: str, name: str, container=None) -> str:
        """stdout+stderr of a pod's container (first container when None); on a real
        node, as `kubectl logs` shows it (the current run of the container)."""
        if self.agent is not None:
            return self.agent.pod_log(namespace, name, container)
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        if container is None:
            container = core.read_namespaced_pod(name, namespace).spec.containers[0].name
        return core.read_namespaced_pod_log(name, namespace, container=container)

    # --- internals -----------------------------------------------------------

    def _timed(self, what: str, action):
        started = time.monotonic()
        result = action()
        self.log(f"[localcluster] {what} in {time.monotonic() - started:.1f}s")
        return result

    def _real_node(self) -> "node.RealNode":
        spec = self.nodes[0]
        return node.RealNode(
            name=spec.name, gpus=spec.gpus, labels=spec.labels, bin_dir=self.bin_dir,
            state_dir=self.state_dir, processes=self.processes, pki_dir=self.state_dir / "pki",
            kubeconfig_for=self._identity_kubeconfig, free_port=free_port, log=self.log)

    def _start_dns(self, deadline: float) -> None:
        """dns.py on the node IP (the kubelet's clusterDNS), as kube-proxy's identity (it may list Services
        and Endpoints); returns once it answers for the `kubernetes` Service."""
        import sys

        from localcluster import dns

        process = self.processes.spawn(
            [sys.executable, "-m", "localcluster.dns", "--kubeconfig", self._identity_kubeconfig("kube-proxy"),
             "--listen", node.NODE_IP], log_path=self.state_dir / "logs" / "dns.log")
        name = f"kubernetes.default.svc.{dns.CLUSTER_DOMAIN}"
        while True:
            if process.poll() is not None:
                raise ClusterError(f"cluster DNS exited with {process.returncode}: "
                                   f"{_tail(self.state_dir / 'logs' / 'dns.log')}")
            try:
                if dns.query(node.NODE_IP, name, timeout=0.5).addresses:
                    return
            except (OSError, ValueError):  # not listening yet, or a garbled reply
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster DNS on {node.NODE_IP}:53 did not answer for {name}: "
                                   f"{_tail(self.state_dir / 'logs' / 'dns.log')}")
            time.sleep(0.1)

    def _identity_kubeconfig(self, identity: str) -> pathlib.Path:
        """A kubeconfig that authenticates with the signed identity's certificate."""
        pki_dir = self.state_dir / "pki"
        document = kubeconfig_document(
            server=self.server, ca_pem=(pki_dir / "ca.crt").read_bytes(), token=None, user=identity,
            client_cert=pki_dir / f"{identity}.crt", client_key=pki_dir / f"{identity}.key")
        path = self._path(f"{identity}.kubeconfig")
        path.write_text(yaml.safe_dump(document))
        path.chmod(0o600)
        return path

    def _path(self, *parts) -> pathlib.Path:
        path = self.state_dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _write_pki_and_configs(self) -> None:
        identities, apiserver_ips = {}, ()
        if self.node is not None:
            identities = pki.node_identities(self.node.name, node.NODE_IP)
            apiserver_ips = (node.GATEWAY_IP,)
        material = pki.generate(now=datetime.datetime.now(datetime.timezone.utc),
                                apiserver_ips=apiserver_ips, identities=identities)
        files = {
            "ca.crt": material.ca_cert, "ca.key": material.ca_key,
            "apiserver.crt": material.apiserver_cert, "apiserver.key": material.apiserver_key,
            "sa.key": material.service_account_key, "sa.pub": material.service_account_pub,
        }
        for identity, (cert, key) in material.identities.items():
            files[f"{identity}.crt"], files[f"{identity}.key"] = cert, key
        for name, content in files.items():
            path = self._path("pki", name)
            path.write_bytes(content)
            path.chmod(0o600)
        self.apiserver_port = free_port()
        # token,user,uid,"group1,group2"
        self._path("pki", "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        )
        config = kubeconfig_document(
            server=self.server, ca_pem=material.ca_cert, token=self.admin_token, user=ADMIN_USER
        )
        self._path("admin.kubeconfig").write_text(yaml.safe_dump(config))
        os.chmod(self.kubeconfig, 0o600)

    def _start_etcd(self, deadline: float) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        # tmpfs when available: etcd fsyncs on every write and we never need the data again.
        data_root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(self.state_dir)
        self.etcd_data = pathlib.Path(tempfile.mkdtemp(prefix="localcluster-etcd-", dir=data_root))
        self.processes.spawn(
            [self.bin_dir / "etcd", "--name", "default", "--data-dir", self.etcd_data,
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"default={peer_url}", "--log-level", "warn"],
            log_path=self._path("logs", "etcd.log"),
        )
        self._poll(f"{self.etcd_url}/health", deadline=deadline, what="etcd", tls=False)

    def _start_apiserver(self, deadline: float) -> None:
        pki_dir = self.state_dir / "pki"
        if self.node is not None:
            # Pods reach the API server through the `kubernetes` Service, whose endpoint
            # is the advertised address: the bridge's gateway. The server then calls the
            # kubelet (logs, exec, port-forward) with its own client certificate.
            network = ["--bind-address=0.0.0.0", f"--advertise-address={node.GATEWAY_IP}",
                       f"--kubelet-client-certificate={pki_dir / 'apiserver-kubelet-client.crt'}",
                       f"--kubelet-client-key={pki_dir / 'apiserver-kubelet-client.key'}",
                       f"--kubelet-certificate-authority={pki_dir / 'ca.crt'}",
                       "--kubelet-preferred-address-types=InternalIP",
                       "--enable-admission-plugins=NodeRestriction"]
        else:
            network = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"]
        self.processes.spawn(
            [self.bin_dir / "kube-apiserver",
             f"--etcd-servers={self.etcd_url}",
             *network,
             f"--secure-port={self.apiserver_port}", "--insecure-port=0",
             f"--tls-cert-file={pki_dir / 'apiserver.crt'}",
             f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
             f"--client-ca-file={pki_dir / 'ca.crt'}",
             f"--token-auth-file={pki_dir / 'tokens.csv'}",
             # Node: each kubelet may touch only its node and its pods' objects.
             "--authorization-mode=Node,RBAC",
             f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
             f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
             f"--service-account-key-file={pki_dir / 'sa.pub'}",
             f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
             f"--service-cluster-ip-range={SERVICE_CIDR}",
             # Pods get a projected token volume (TokenRequest) instead of a
             # legacy token Secret, as on current clusters.
             "--feature-gates=BoundServiceAccountTokenVolume=true",
             "--allow-privileged=true",
             "--enable-aggregator-routing=true",
             "--profiling=false", "--v=1"],
            log_path=self._path("logs", "kube-apiserver.log"),
        )
        self._poll(f"{self.server}/readyz", deadline=deadline, what="kube-apiserver", tls=True)

    def _start_controllers(self) -> None:
        pki_dir = self.state_dir / "pki"
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                  "--port=0", "--secure-port=0", "--v=1"]
        self.processes.spawn(
            [self.bin_dir / "kube-controller-manager", *common,
             "--controllers=*",
             f"--service-account-private-key-file={pki_dir / 'sa.key'}",
             f"--root-ca-file={pki_dir / 'ca.crt'}",
             f"--service-cluster-ip-range={SERVICE_CIDR}",
             "--use-service-account-credentials=false",
             # A node that stops reporting is NotReady after 30 s (default 40 s), so the
             # lost-node test takes one minute; a loaded 2-core machine still renews in time.
             "--node-monitor-grace-period=30s", "--node-monitor-period=2s",
             "--concurrent-gc-syncs=5"],
            log_path=self._path("logs", "kube-controller-manager.log"),
        )
        scheduler_config = self._path("kube-scheduler.yaml")
        scheduler_config.write_text(yaml.safe_dump(
            scheduler_configuration(self.kubeconfig, health_port=free_port(),
                                    volume_plugins=self.node is not None)))
        self.processes.spawn(
            [self.bin_dir / "kube-scheduler", f"--config={scheduler_config}",
             "--port=0", "--secure-port=0", "--v=1"],
            log_path=self._path("logs", "kube-scheduler.log"),
        )

    def _wait_until_usable(self, deadline: float) -> None:
        """Ready nodes and a `default` ServiceAccount (pods are rejected without it)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        patched = False
        while True:
            ready = self._ready_node_names(core)
            if self.node is not None and ready:
                if not self._gpus_advertised(core):
                    if not patched:
                        self.node.advertise_gpus(core)
                        patched = True
                    ready = set()  # the kubelet copies capacity to allocatable at its next status update
            has_sa = _exists(lambda: core.read_namespaced_service_account("default", "default"))
            has_ca = _exists(lambda: core.read_namespaced_config_map("kube-root-ca.crt", "default"))
            if ready >= {n.name for n in self.nodes} and has_sa and has_ca:
                return
            self._check_alive("waiting for nodes and the default ServiceAccount")
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"cluster not usable in time: ready nodes {sorted(ready)}, default "
                    f"ServiceAccount {has_sa}, kube-root-ca.crt {has_ca}; logs in "
                    f"{self.state_dir / 'logs'}"
                )
            time.sleep(0.2)

    def _gpus_advertised(self, core) -> bool:
        wanted = str(self.nodes[0].gpus)
        allocatable = core.read_node(self.nodes[0].name).status.allocatable or {}
        return self.nodes[0].gpus == 0 or allocatable.get("nvidia.com/gpu") == wanted

    @staticmethod
    def _ready_node_names(core) -> set:
        ready = set()
        for node in core.list_node().items:
            conditions = {c.type: c.status for c in node.status.conditions or []}
            taints = [t.key for t in node.spec.taints or []]
            if conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints:
                ready.add(node.metadata.name)
        return ready

    def _check_alive(self, during: str) -> None:
        for process in self.processes.children.values():
            if process.poll() is not None and process.args[0].startswith(str(self.bin_dir)):
                name = os.path.basename(process.args[0])
                tail = _tail(self.state_dir / "logs" / f"{name}.log")
                raise ClusterError(f"{name} exited with {process.returncode} {during}:\n{tail}")

    def _poll(self, url: str, *, deadline: float, what: str, tls: bool) -> None:
        context = None
        headers = {}
        if tls:
            context = ssl.create_default_context(cafile=str(self.state_dir / "pki" / "ca.crt"))
            headers["Authorization"] = f"Bearer {self.admin_token}"
        last_error = None
        while time.monotonic() < deadline:
            self._check_alive(f"while waiting for {what}")
            try:
                request = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(request, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last_error = exc
            time.sleep(0.1)
        raise ClusterError(f"{what} not ready at {url} in time (last error: {last_error}); "
                           f"logs in {self.state_dir / 'logs'}")


# With the node agent, pods name PVCs that need not exist (the agent maps a
# claim name to a host dir), so the scheduler must not wait for claims to be
# bound; a real node mounts real PersistentVolumes and keeps them on.
VOLUME_PLUGINS = ("VolumeBinding", "VolumeRestrictions", "VolumeZone", "NodeVolumeLimits",
                  "EBSLimits", "GCEPDLimits", "AzureDiskLimits", "CinderLimits")


def scheduler_configuration(kubeconfig: str, *, health_port: int, volume_plugins: bool = False) -> dict:
    """Scheduler settings; with --config its --port flags are ignored, so the
    health/metrics listener (default 0.0.0.0:10251) is moved to a free loopback
    port here, letting two clusters run side by side."""
    disabled = {"disabled": [{"name": name} for name in VOLUME_PLUGINS]}
    address = f"127.0.0.1:{health_port}"
    profile = {"schedulerName": "default-scheduler"}
    if not volume_plugins:
        profile["plugins"] = {point: disabled for point in ("preFilter", "filter", "reserve", "preBind", "score")}
    return {
        "healthzBindAddress": address,
        "metricsBindAddress": address,
        "apiVersion": "kubescheduler.config.k8s.io/v1beta1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig},
        "leaderElection": {"leaderElect": False},
        "profiles": [profile],
    }


def kubeconfig_document(*, server: str, ca_pem: bytes, token, user: str,
                        client_cert=None, client_key=None) -> dict:
    """An admin kubeconfig with a bearer token, or one with a client certificate (files)."""
    credentials = {"token": token} if token else {
        "client-certificate": str(client_cert), "client-key": str(client_key)}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localcluster", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode(),
        }}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "localcluster", "context": {"cluster": "localcluster", "user": user}}],
        "current-context": "localcluster",
    }


def run_kubectl(kubectl_path, kubeconfig, args, *, check=True, input=None):
    result = subprocess.run(
        [str(kubectl_path), "--kubeconfig", str(kubeconfig), *map(str, args)],
        capture_output=True, text=True, input=input,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"kubectl {' '.join(map(str, args))} exited with {result.returncode}:\n"
            f"{result.stderr.strip()}"
        )
    return result


def _exists(read) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read()
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def _tail(path: pathlib.Path, *, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"

