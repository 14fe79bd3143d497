"""Node agent: a stand-in for the kubelet that runs containers as local processes.

* registers the Nodes, keeps them Ready (status heartbeats + Leases in
  kube-node-lease) and removes the not-ready taint;
* watches pods (list + watch, relisting on every watch restart) and gives each
  pod bound to one of its nodes a `PodWorker` thread;
* a PodWorker materialises volumes, runs init containers then containers (the
  image is ignored: command+args run with the project's Python first on PATH),
  each in a private mount namespace with its volumes bind-mounted, reports
  status like a kubelet and, on deletion, SIGTERMs then SIGKILLs the process
  group and removes the pod object.
"""

import base64
import datetime
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

from localcluster import podspec
from localcluster.container_launcher import Bind, command_line
from localcluster.processes import ProcessGroups, signal_group

HEARTBEAT_SECONDS = 10
LEASE_SECONDS = 40
WATCH_SECONDS = 30
POLL_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 10
INHERITED_ENV = ("PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "HF_HOME",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
MERGE_PATCH = "application/merge-patch+json"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    def __init__(self, *, api_client_factory, nodes, state_dir: pathlib.Path,
                 processes: ProcessGroups, apiserver_port: int, ca_file: pathlib.Path, log=print):
        from kubernetes import client

        self.api = api_client_factory()
        self.watch_api = api_client_factory()
        self.core = client.CoreV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        self.nodes = nodes
        self.node_names = {n.name for n in nodes}
        self.state_dir = state_dir
        self.processes = processes
        self.apiserver_port = apiserver_port
        self.ca_file = ca_file
        self.workers: dict = {}  # pod uid -> PodWorker
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.log_path = state_dir / "logs" / "node-agent.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._threads = []

    def log(self, message: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"{now_micro()} {message}\n")

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        for node in self.nodes:
            self._register(node)
        for target in (self._heartbeat_loop, self._watch_loop):
            thread = threading.Thread(target=target, name=f"node-agent-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.request_stop(grace_seconds=2, delete_object=False)
        for worker in workers:
            worker.join(timeout=15)
        for thread in self._threads:
            thread.join(timeout=1)

    # --- nodes -------------------------------------------------------------

    def _node_status(self, node) -> dict:
        now = now_rfc3339()
        conditions = [
            {"type": kind, "status": "False", "reason": f"LocalClusterNo{kind}",
             "lastHeartbeatTime": now, "lastTransitionTime": now}
            for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ]
        conditions.append({"type": "Ready", "status": "True", "reason": "LocalClusterAgentReady",
                           "message": "localcluster node agent is posting ready status",
                           "lastHeartbeatTime": now, "lastTransitionTime": now})
        return {
            "capacity": node.capacity(),
            "allocatable": node.capacity(),
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": node.name}],
            "nodeInfo": {
                "kubeletVersion": "v1.20.2-localcluster", "kubeProxyVersion": "v0.0.0",
                "operatingSystem": "linux", "architecture": "amd64",
                "containerRuntimeVersion": "localprocess://1", "osImage": "localcluster",
                "kernelVersion": os.uname().release, "machineID": "", "systemUUID": "", "bootID": "",
            },
        }

    def _register(self, node) -> None:
        from kubernetes.client.exceptions import ApiException

        labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", **node.labels}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": labels},
                "status": self._node_status(node)}
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._heartbeat(node)
        current = self.core.read_node(node.name)
        taints = [self.api.sanitize_for_serialization(t) for t in current.spec.taints or []
                  if t.key != "node.kubernetes.io/not-ready"]
        self.core.patch_node(node.name, {"spec": {"taints": taints or None}},
                             _content_type=MERGE_PATCH)

    def _heartbeat(self, node) -> None:
        from kubernetes.client.exceptions import ApiException

        self.core.patch_node_status(node.name, {"status": self._node_status(node)},
                                    _content_type="application/strategic-merge-patch+json")
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": node.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": node.name, "leaseDurationSeconds": LEASE_SECONDS,
                          "renewTime": now_micro()}}
        try:
            self.coordination.patch_namespaced_lease(node.name, "kube-node-lease", lease,
                                                     _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            for node in self.nodes:
                try:
                    self._heartbeat(node)
                except Exception as exc:  # keep beating; the apiserver may be restarting
                    self.log(f"heartbeat for {node.name} failed: {exc}")

    # --- pods --------------------------------------------------------------

    def _watch_loop(self) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self.watch_api)
        while not self.stopping.is_set():
            try:
                listing = core.list_pod_for_all_namespaces()
                seen = set()
                for pod in listing.items:
                    seen.add(pod.metadata.uid)
                    self.handle("LISTED", self.api.sanitize_for_serialization(pod))
                self._forget_vanished(seen)
                stream = watch.Watch().stream(
                    core.list_pod_for_all_namespaces,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=WATCH_SECONDS, _request_timeout=WATCH_SECONDS + 10,
                )
                for event in stream:
                    if self.stopping.is_set():
                        break
                    pod = self.api.sanitize_for_serialization(event["object"])
                    self.handle(event["type"], pod)
            except Exception as exc:  # relist after any watch failure (410 Gone, connection reset)
                if not self.stopping.is_set():
                    self.log(f"pod watch restarting after: {exc!r}")
                    self.stopping.wait(1)

    def _forget_vanished(self, seen_uids: set) -> None:
        with self.lock:
            vanished = [w for uid, w in self.workers.items() if uid not in seen_uids]
        for worker in vanished:
            worker.request_stop(grace_seconds=0, delete_object=False)

    def handle(self, event_type: str, pod: dict) -> None:
        """React to one observed pod state; safe to call repeatedly with the same pod."""
        metadata, spec = pod["metadata"], pod.get("spec") or {}
        if spec.get("nodeName") not in self.node_names:
            return
        uid = metadata["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if event_type == "DELETED":
                if worker is not None:
                    worker.request_stop(grace_seconds=0, delete_object=False)
                return
            if metadata.get("deletionTimestamp"):
                if worker is not None and worker.is_alive():
                    grace = metadata.get("deletionGracePeriodSeconds")
                    worker.request_stop(grace_seconds=30 if grace is None else grace,
                                        delete_object=True)
                else:
                    self._force_delete(metadata["namespace"], metadata["name"], uid)
                return
            phase = (pod.get("status") or {}).get("phase")
            if worker is None and phase in (None, "Pending"):
                worker = PodWorker(agent=self, pod=pod)
                self.workers[uid] = worker
                worker.start()

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def pod_dir(self, pod: dict) -> pathlib.Path:
        metadata = pod["metadata"]
        return self.state_dir / "pods" / f"{metadata['namespace']}_{metadata['name']}_{metadata['uid']}"

    def pod_log(self, namespace: str, name: str, container=None) -> str:
        candidates = sorted((self.state_dir / "pods").glob(f"{namespace}_{name}_*"),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"no pod {namespace}/{name} ever ran on this cluster's nodes")
        pod_dir = candidates[-1]
        if container is None:
            order = _read_text(pod_dir / "containers").split()
            container = order[0] if order else None
        path = pod_dir / "logs" / f"{container}.log"
        if not path.exists():
            raise FileNotFoundError(f"pod {namespace}/{name} has no log for container {container}")
        return path.read_text(errors="replace")

    # --- API reads used by workers ------------------------------------------

    def read_config_map(self, namespace, name, key):
        data = self._read("config_map", namespace, name)
        if data is None:
            return None
        values = dict(data.get("data") or {})
        values.update({k: base64.b64decode(v).decode(errors="replace")
                       for k, v in (data.get("binaryData") or {}).items()})
        return values if key is None else values.get(key)

    def read_secret(self, namespace, name, key):
        data = self._read("secret", namespace, name)
        if data is None:
            return None
        values = {k: base64.b64decode(v).decode(errors="replace")
                  for k, v in (data.get("data") or {}).items()}
        return values if key is None else values.get(key)

    def _read(self, kind: str, namespace: str, name: str):
        from kubernetes.client.exceptions import ApiException

        try:
            obj = getattr(self.core, f"read_namespaced_{kind}")(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self.api.sanitize_for_serialization(obj)

    def _read_bytes(self, kind: str, namespace: str, name: str):
        """{key: bytes} of a ConfigMap or Secret, None when missing."""
        data = self._read(kind, namespace, name)
        if data is None:
            return None
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (data.get("data") or {}).items()}
        values = {k: v.encode() for k, v in (data.get("data") or {}).items()}
        values.update({k: base64.b64decode(v) for k, v in (data.get("binaryData") or {}).items()})
        return values

    def request_token(self, pod: dict, *, audience, expiration_seconds) -> str:
        metadata, spec = pod["metadata"], pod["spec"]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [audience] if audience else None,
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                               "name": metadata["name"], "uid": metadata["uid"]},
        }}
        response = self.core.create_namespaced_service_account_token(
            spec.get("serviceAccountName") or "default", metadata["namespace"], body)
        return response.status.token


class ContainerRun:
    """Mutable record of one container across its restarts."""

    def __init__(self, container: dict, *, init: bool):
        self.spec = container
        self.name = container["name"]
        self.init = init
        self.process = None
        self.restart_count = 0
        self.state = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state = {}
        self.exit_code = None
        self.restart_at = None  # monotonic time of the next restart, when backing off

    def status(self) -> dict:
        running = "running" in self.state
        return {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": "",
            "containerID": f"localprocess://{self.process.pid}" if self.process else None,
            "ready": running and not self.init, "started": running,
            "restartCount": self.restart_count,
            "state": self.state, "lastState": self.last_state,
        }


class PodWorker(threading.Thread):
    """Runs one pod to completion (or until deleted) and reports its status."""

    def __init__(self, *, agent: NodeAgent, pod: dict):
        metadata = pod["metadata"]
        super().__init__(name=f"pod-{metadata['namespace']}-{metadata['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.key = f"{metadata['namespace']}/{metadata['name']}"
        self.dir = agent.pod_dir(pod)
        self.stop_requested = threading.Event()
        self.grace_seconds = 30
        self.delete_object = False
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.init_runs = [ContainerRun(c, init=True) for c in spec.get("initContainers") or []]
        self.runs = [ContainerRun(c, init=False) for c in spec.get("containers") or []]
        self.volume_paths: dict = {}  # volume name -> host path
        self.token_refresh_at = None
        self.phase = "Pending"
        self.initialized = not self.init_runs
        self.start_time = now_rfc3339()
        self.transition_times: dict = {}
        self.last_pushed = None
        self.message = None

    def request_stop(self, *, grace_seconds: float, delete_object: bool) -> None:
        self.grace_seconds = min(self.grace_seconds, max(0, grace_seconds))
        self.delete_object = self.delete_object or delete_object
        self.stop_requested.set()

    # --- main loop -----------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # report instead of dying silently
            self.agent.log(f"{self.key}: worker crashed: {exc!r}")
            self.phase, self.message = "Failed", f"localcluster node agent error: {exc}"
            self._push_status()
        finally:
            self._kill_all()
            if self.delete_object:
                metadata = self.pod["metadata"]
                self.agent._force_delete(metadata["namespace"], metadata["name"], metadata["uid"])
                shutil.rmtree(self.dir / "volumes", ignore_errors=True)

    def _run(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "containers").write_text("\n".join(r.name for r in self.runs))
        self._push_status()
        while not self._prepare_volumes():
            if self.stop_requested.wait(1):
                return
        for run in self.init_runs:
            if not self._run_init(run):
                return
        self.initialized = True
        for run in self.runs:
            self._start(run)
        self.phase = "Running"
        self._push_status()
        while not self.stop_requested.is_set():
            changed = False
            for run in self.runs:
                changed |= self._observe(run)
            if all(r.process is None and r.restart_at is None for r in self.runs):
                self.phase = podspec.finished_phase([r.exit_code for r in self.runs])
                self._push_status()
                return
            if changed:
                self._push_status()
            self._refresh_tokens_if_due()
            self.stop_requested.wait(POLL_SECONDS)

    def _run_init(self, run: ContainerRun) -> bool:
        """Run an init container until it succeeds; False when the pod failed or stops."""
        self._start(run)
        self._push_status()
        while not self.stop_requested.is_set():
            if self._observe(run):
                self._push_status()
            if run.process is None and run.restart_at is None:
                if run.exit_code == 0:
                    return True
                self.phase = "Failed"
                self._push_status()
                return False
            self.stop_requested.wait(POLL_SECONDS)
        return False

    def _observe(self, run: ContainerRun) -> bool:
        """Notice an exit or a due restart; True when the status changed."""
        if run.restart_at is not None:
            if time.monotonic() >= run.restart_at:
                run.restart_at = None
                run.restart_count += 1
                self._start(run)
                return True
            return False
        if run.process is None or run.process.poll() is None:
            return False
        code = run.process.returncode
        exit_code = code if code >= 0 else 128 - code
        self.agent.processes.forget(run.process)
        log_path = self.dir / "logs" / f"{run.name}.log"
        message = podspec.termination_message(
            message_file=_read_text(self._termination_file(run)),
            log_tail=_tail_text(log_path), exit_code=exit_code,
            policy=run.spec.get("terminationMessagePolicy", "File"),
        )
        started = run.state.get("running", {}).get("startedAt")
        terminated = {"exitCode": exit_code, "reason": podspec.terminated_reason(exit_code),
                      "startedAt": started, "finishedAt": now_rfc3339(),
                      "containerID": f"localprocess://{run.process.pid}"}
        if code < 0:
            terminated["signal"] = -code
        if message:
            terminated["message"] = message
        run.exit_code = exit_code
        run.process = None
        self.agent.log(f"{self.key}/{run.name}: exited with {exit_code}")
        if (not run.init or exit_code != 0) and podspec.should_restart(
                restart_policy=self._init_restart_policy() if run.init else self.restart_policy,
                exit_code=exit_code) and not self.stop_requested.is_set():
            backoff = min(MAX_BACKOFF_SECONDS, 2 ** run.restart_count)
            run.restart_at = time.monotonic() + backoff
            run.last_state = {"terminated": terminated}
            run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                     "message": f"back-off {backoff}s restarting failed container"}}
        else:
            run.state = {"terminated": terminated}
        return True

    def _init_restart_policy(self) -> str:
        """Init containers are retried until they succeed, unless the pod never restarts."""
        return "Never" if self.restart_policy == "Never" else "OnFailure"

    # --- processes ------------------------------------------------------------

    def _termination_file(self, run: ContainerRun) -> pathlib.Path:
        return self.dir / "termination" / f"{run.name}-{run.restart_count}"

    def _start(self, run: ContainerRun) -> None:
        container = run.spec
        try:
            env = podspec.container_env(
                self.pod, container, base_env=self._base_env(container),
                read_config_map=self.agent.read_config_map, read_secret=self.agent.read_secret,
            )
        except podspec.MissingReference as exc:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            run.restart_at = time.monotonic() + 1
            return
        argv = podspec.container_argv(container, env)
        if not argv:
            run.state = {"terminated": {"exitCode": 127, "reason": "NoCommand", "message":
                         f"image {container.get('image')} is not pulled: the local node agent "
                         "needs an explicit command", "finishedAt": now_rfc3339()}}
            run.exit_code = 127
            return
        self.agent.log(f"{self.key}/{run.name}: image {container.get('image')} not pulled: "
                       f"running command with the project's Python environment: {argv}")
        termination_file = self._termination_file(run)
        termination_file.parent.mkdir(parents=True, exist_ok=True)
        termination_file.write_text("")
        binds = self._binds(container, termination_file)
        # Without a workingDir (an image's WORKDIR is unknown here) the command
        # runs in the pod's own dir rather than in the host's `/`.
        workdir = container.get("workingDir") or str(self.dir)
        run.process = self.agent.processes.spawn(
            command_line(binds=binds, workdir=workdir, argv=argv,
                         workdir_on_host=not container.get("workingDir")),
            log_path=self.dir / "logs" / f"{run.name}.log", env=env,
        )
        run.state = {"running": {"startedAt": now_rfc3339()}}
        (self.dir / f"{run.name}.pid").write_text(str(run.process.pid))

    def _base_env(self, container: dict) -> dict:
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        project_bin = os.path.dirname(sys.executable)
        env["PATH"] = f"{project_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env["HOSTNAME"] = self.pod["metadata"]["name"]
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.agent.apiserver_port)
        env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(self.agent.apiserver_port)
        return env

    def _binds(self, container: dict, termination_file: pathlib.Path) -> list:
        """The container's `Bind`s in mount order: parents first, the termination file last."""
        binds = []
        for mount in container.get("volumeMounts") or []:
            source = pathlib.Path(self.volume_paths[mount["name"]])
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            binds.append(Bind(source=str(source), target=mount["mountPath"],
                              read_only=bool(mount.get("readOnly"))))
        binds.sort(key=lambda b: len(pathlib.PurePath(b.target).parts))
        # Mounts go over the host's filesystem: one over a parent of the
        # project (an emptyDir at /tmp with the checkout under /tmp) would hide
        # the Python the command runs with, so the project is bound back on top.
        binds += [Bind(source=path, target=path, read_only=True) for path in shadowed_project_paths(container)]
        target = container.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_MESSAGE_PATH
        binds.append(Bind(source=str(termination_file), target=target, optional=True))
        return binds

    def _kill_all(self) -> None:
        running = [r for r in self.init_runs + self.runs if r.process is not None]
        for run in running:
            signal_group(run.process.pid, 15)
        deadline = time.monotonic() + self.grace_seconds
        for run in running:
            try:
                run.process.wait(timeout=max(0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.agent.processes.terminate(run.process, grace_seconds=0)
            run.process = None

    # --- volumes ---------------------------------------------------------------

    def _prepare_volumes(self) -> bool:
        """Materialise every volume; False (retry later) while a referenced object is missing."""
        try:
            for volume in self.pod["spec"].get("volumes") or []:
                self.volume_paths[volume["name"]] = str(self._volume(volume))
            return True
        except podspec.MissingReference as exc:
            for run in self.init_runs + self.runs:
                run.state = {"waiting": {"reason": "ContainerCreating", "message": str(exc)}}
            self._push_status()
            return False

    def _volume(self, volume: dict) -> pathlib.Path:
        name = volume["name"]
        namespace = self.pod["metadata"]["namespace"]
        own_dir = self.dir / "volumes" / name
        if "hostPath" in volume:
            path = pathlib.Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in (None, "", "DirectoryOrCreate") and not path.exists():
                path.mkdir(parents=True)
            return path
        if "persistentVolumeClaim" in volume:
            path = self.agent.state_dir / "pvcs" / namespace / volume["persistentVolumeClaim"]["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            return path
        own_dir.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            self._write_source(own_dir, kind, volume[kind], namespace)
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                self._write_projection(own_dir, source, namespace)
        elif "downwardAPI" in volume:
            self._write_downward(own_dir, volume["downwardAPI"].get("items") or [])
        elif "emptyDir" not in volume:
            self.agent.log(f"{self.key}: volume {name} has an unsupported type; using an empty dir")
        return own_dir

    def _write_source(self, directory: pathlib.Path, kind: str, source: dict, namespace: str) -> None:
        name = source.get("name") or source.get("secretName")
        values = self.agent._read_bytes("secret" if kind == "secret" else "config_map", namespace, name)
        if values is None:
            if source.get("optional"):
                return
            raise podspec.MissingReference(f"{kind} {namespace}/{name}")
        items = source.get("items") or [{"key": k, "path": k} for k in values]
        for item in items:
            if item["key"] not in values:
                if source.get("optional"):
                    continue
                raise podspec.MissingReference(f"{kind} {namespace}/{name} key {item['key']!r}")
            _write_atomic(directory / item["path"], values[item["key"]])

    def _write_projection(self, directory: pathlib.Path, source: dict, namespace: str) -> None:
        if "serviceAccountToken" in source:
            token_source = source["serviceAccountToken"]
            expiration = token_source.get("expirationSeconds") or 3607
            token = self.agent.request_token(self.pod, audience=token_source.get("audience"),
                                             expiration_seconds=expiration)
            _write_atomic(directory / token_source["path"], token.encode())
            # Rotate at 80% of the lifetime, like the kubelet.
            self.token_refresh_at = time.monotonic() + 0.8 * expiration
        elif "configMap" in source:
            self._write_source(directory, "configMap", source["configMap"], namespace)
        elif "secret" in source:
            self._write_source(directory, "secret", source["secret"], namespace)
        elif "downwardAPI" in source:
            self._write_downward(directory, source["downwardAPI"].get("items") or [])

    def _write_downward(self, directory: pathlib.Path, items: list) -> None:
        for item in items:
            if "fieldRef" in item:
                value = podspec.field_ref_value(self.pod, item["fieldRef"]["fieldPath"])
            else:
                container = next((c for c in self.pod["spec"]["containers"]
                                  if c["name"] == item["resourceFieldRef"].get("containerName")),
                                 self.pod["spec"]["containers"][0])
                value = podspec.resource_field_value(container, item["resourceFieldRef"])
            _write_atomic(directory / item["path"], value.encode())

    def _refresh_tokens_if_due(self) -> None:
        if self.token_refresh_at is None or time.monotonic() < self.token_refresh_at:
            return
        self.token_refresh_at = None
        namespace = self.pod["metadata"]["namespace"]
        for volume in self.pod["spec"].get("volumes") or []:
            for source in (volume.get("projected") or {}).get("sources") or []:
                if "serviceAccountToken" in source:
                    self._write_projection(self.dir / "volumes" / volume["name"], source, namespace)

    # --- status --------------------------------------------------------------------

    def _condition(self, kind: str, status: bool, reason=None) -> dict:
        previous = self.transition_times.get(kind)
        if previous is None or previous[0] != status:
            self.transition_times[kind] = (status, now_rfc3339())
        entry = podspec.condition(kind, status, now=self.transition_times[kind][1], reason=reason)
        return entry

    def _status(self) -> dict:
        all_running = all("running" in r.state for r in self.runs)
        finished = self.phase in ("Succeeded", "Failed")
        not_ready_reason = "PodCompleted" if finished else (None if all_running else "ContainersNotReady")
        scheduled = [c for c in (self.pod.get("status") or {}).get("conditions") or []
                     if c.get("type") == "PodScheduled"]
        status = {
            "phase": self.phase,
            "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": scheduled + [
                self._condition("Initialized", self.initialized,
                                None if self.initialized else "ContainersNotInitialized"),
                self._condition("ContainersReady", all_running and not finished, not_ready_reason),
                self._condition("Ready", all_running and not finished, not_ready_reason),
            ],
            "containerStatuses": [r.status() for r in self.runs],
            "message": self.message,
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        return status

    def _push_status(self) -> None:
        from kubernetes.client.exceptions import ApiException

        status = self._status()
        if status == self.last_pushed:
            return
        metadata = self.pod["metadata"]
        try:
            self.agent.core.patch_namespaced_pod_status(
                metadata["name"], metadata["namespace"], {"status": status},
                _content_type=MERGE_PATCH,
            )
            self.last_pushed = status
        except ApiException as exc:
            if exc.status == 404:
                self.request_stop(grace_seconds=0, delete_object=False)
            else:
                self.agent.log(f"{self.key}: status update failed: {exc}")


def project_paths() -> list:
    """Host directories the container's command needs: the Python prefix and the project's sources."""
    paths = {os.path.realpath(sys.prefix), str(pathlib.Path(__file__).resolve().parents[2])}
    # A path inside another listed one comes along with it.
    return sorted(p for p in paths
                  if not any(q != p and pathlib.PurePath(p).is_relative_to(q) for q in paths))


def shadowed_project_paths(container: dict) -> list:
    """The project paths that one of the container's volumeMounts would hide (the mountPath is them or a parent)."""
    targets = [pathlib.PurePath(os.path.normpath(m["mountPath"])) for m in container.get("volumeMounts") or []]
    return [path for path in project_paths()
            if any(pathlib.PurePath(path).is_relative_to(t) and t != pathlib.PurePath("/") for t in targets)]


def _write_atomic(path: pathlib.Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_bytes(content)
    os.replace(partial, path)


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail_text(path: pathlib.Path, *, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            return log.read().decode(errors="replace")
    except OSError:
        return ""
