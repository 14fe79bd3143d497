"""The real node: pods are containers (kubelet 1.20.2, containerd, runc, a CNI bridge, kube-proxy).

Each test proves something the old process-running node agent could not show: the image's root
filesystem and user, a memory limit the kernel enforces, a pod network, Services, volumes and security
contexts done by the kubelet, pull failures, and kubectl logs/exec/port-forward.
"""

import ipaddress
import json
import socket
import subprocess
import urllib.request
import uuid

import pytest
from kubernetes import client

from localcluster import node
from localcluster.images import TRAINER_IMAGE
from localcluster.polling import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def core(kube_cluster):
    return client.CoreV1Api(kube_cluster.api_client())


@pytest.fixture(scope="module")
def namespace(kube_cluster, core):
    name = f"lc-node-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name),
             timeout=30, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


def python_pod(name: str, code: str, *, image: str = TRAINER_IMAGE, pod_fields=None, **container_fields) -> dict:
    container = {"name": "main", "image": image, "imagePullPolicy": "Never",
                 "command": ["python", "-c", code]}
    container.update(container_fields)
    spec = {"restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 1}
    spec.update(pod_fields or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def wait_finished(core, namespace: str, name: str, *, timeout: float = 120):
    def finished():
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(finished, timeout=timeout, what=f"pod {namespace}/{name} to finish")


def wait_running(core, namespace: str, name: str, *, timeout: float = 120):
    def running():
        pod = core.read_namespaced_pod(name, namespace)
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return pod if pod.status.phase == "Running" and ready else None

    return wait_for(running, timeout=timeout, what=f"pod {namespace}/{name} to run")


def run_to_json(kube_cluster, core, namespace: str, pod: dict) -> dict:
    """Run a pod whose program prints one JSON line; return it (fail with the pod's story otherwise)."""
    core.create_namespaced_pod(namespace, pod)
    name = pod["metadata"]["name"]
    finished = wait_finished(core, namespace, name)
    log = kube_cluster.pod_log(namespace, name)
    assert finished.status.phase == "Succeeded", (
        f"{name} {finished.status.phase}: {finished.status.container_statuses}\n{log}")
    return json.loads(log.strip().splitlines()[-1])


HTTP_SERVER = """
import http.server, socket
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + socket.gethostname()).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"""


@pytest.fixture(scope="module")
def http_server(kube_cluster, core, namespace):
    pod = python_pod("web", HTTP_SERVER, ports=[{"containerPort": 8080}],
                     readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1})
    pod["metadata"]["labels"] = {"app": "web"}
    core.create_namespaced_pod(namespace, pod)
    service = core.create_namespaced_service(namespace, {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    pod = wait_running(core, namespace, "web")

    def service_answers():  # endpoints written and kube-proxy's rules synced: the host is routed too
        try:
            return urllib.request.urlopen(f"http://{service.spec.cluster_ip}/", timeout=2).read()
        except OSError:
            return None

    wait_for(service_answers, timeout=60, what="the web Service to answer on its ClusterIP")
    return pod


def test_the_node_is_a_kubelet_on_containerd_with_fake_gpus(kube_cluster):
    (item,) = json.loads(kube_cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    info = item["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert info["kubeletVersion"] == "v1.20.2"
    assert item["status"]["allocatable"]["nvidia.com/gpu"] == "2"


def test_a_container_has_the_image_filesystem_and_user_and_its_own_ip(kube_cluster, core, namespace):
    code = """
import json, os, socket, torch
print(json.dumps({"uid": os.getuid(), "hostname": socket.gethostname(),
                  "os_release": open("/etc/os-release").read(),
                  "project_in_image": os.path.exists("/src/pyproject.toml"),
                  "host_checkout_visible": os.path.exists(%r),
                  "torch": torch.__version__}))
""" % (str(__file__),)
    seen = run_to_json(kube_cluster, core, namespace, python_pod("whoami", code))

    assert seen["uid"] == 65532  # the image's USER, not root
    assert seen["hostname"] == "whoami"
    assert "bookworm" in seen["os_release"]
    assert seen["project_in_image"] is True
    assert seen["host_checkout_visible"] is False  # the host's files are not there
    assert seen["torch"].startswith("2.13.0")
    pod = core.read_namespaced_pod("whoami", namespace)
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(node.POD_CIDR)


def test_the_kernel_enforces_the_memory_limit_and_the_pod_says_oomkilled(kube_cluster, core, namespace):
    pod = python_pod("hog", "b = bytearray(512 * 2**20); print('survived')",
                     resources={"limits": {"memory": "128Mi"}})
    core.create_namespaced_pod(namespace, pod)

    finished = wait_finished(core, namespace, "hog")

    terminated = finished.status.container_statuses[0].state.terminated
    assert finished.status.phase == "Failed"
    assert (terminated.reason, terminated.exit_code) == ("OOMKilled", 137)


def test_pods_reach_each_other_and_services_and_the_api_server(kube_cluster, core, namespace, http_server):
    code = """
import json, os, ssl, urllib.request
get = lambda url: urllib.request.urlopen(url, timeout=10).read().decode()
direct = get("http://" + os.environ["WEB_POD_IP"] + ":8080/")
service = get("http://" + os.environ["WEB_SERVICE_HOST"] + "/")  # env of the Service made before this pod
sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
api = "https://" + os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"] + "/version"
request = urllib.request.Request(api, headers={"Authorization": "Bearer " + open(sa + "token").read()})
tls = ssl.create_default_context(cafile=sa + "ca.crt")
version = json.load(urllib.request.urlopen(request, context=tls, timeout=10))
print(json.dumps({"direct": direct, "service": service, "version": version["gitVersion"]}))
"""
    pod = python_pod("client", code, env=[{"name": "WEB_POD_IP", "value": http_server.status.pod_ip}])
    seen = run_to_json(kube_cluster, core, namespace, pod)

    assert seen["direct"] == "hello from web"
    assert seen["service"] == "hello from web"  # ClusterIP through kube-proxy's rules
    assert seen["version"] == "v1.20.2"  # the `kubernetes` Service, TLS-verified with the pod's CA


def test_kubectl_logs_exec_and_port_forward_reach_the_container(kube_cluster, namespace, http_server):
    exec_result = kube_cluster.kubectl("exec", "-n", namespace, "web", "--", "python", "-c",
                                       "import os; print('uid', os.getuid())")
    assert exec_result.stdout.strip() == "uid 65532"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    forward = subprocess.Popen(
        [kube_cluster.kubectl_path, "--kubeconfig", kube_cluster.kubeconfig, "port-forward", "-n", namespace,
         "pod/web", f"{port}:8080"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Forwarding from" in forward.stdout.readline()  # printed once the listener is up
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
    finally:
        forward.terminate()
        forward.wait(timeout=10)
    assert body == "hello from web"
    assert "GET / HTTP/1.1" in kube_cluster.kubectl("logs", "-n", namespace, "web").stdout


def test_volumes_are_mounted_by_the_kubelet(kube_cluster, core, namespace):
    data = kube_cluster.pvc_dir(namespace, "inputs")
    (data / "sub").mkdir(exist_ok=True)
    (data / "sub" / "hello.txt").write_text("from the host")
    code = """
import json, os
def writable(path):
    try:
        open(path, "w").close(); return True
    except OSError:
        return False
mounts = {line.split()[1]: line.split()[2] for line in open("/proc/mounts")}
print(json.dumps({
    "read": open("/data/sub/hello.txt").read(), "subpath": open("/only-sub/hello.txt").read(),
    "pvc_writable": writable("/data/new.txt"), "root_writable": writable("/etc/new.txt"),
    "shm": mounts.get("/dev/shm"), "shm_bytes": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize,
    "scratch_gid": os.stat("/scratch").st_gid, "groups": os.getgroups(),
    "capabilities": [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]}))
"""
    pod = python_pod(
        "volumes", code,
        volumeMounts=[{"name": "inputs", "mountPath": "/data", "readOnly": True},
                      {"name": "inputs", "mountPath": "/only-sub", "subPath": "sub", "readOnly": True},
                      {"name": "shm", "mountPath": "/dev/shm"},
                      {"name": "scratch", "mountPath": "/scratch"}],
        securityContext={"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                         "capabilities": {"drop": ["ALL"]}},
        pod_fields={"securityContext": {"fsGroup": 4242, "runAsNonRoot": True,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "volumes": [{"name": "inputs", "persistentVolumeClaim": {"claimName": "inputs"}},
                                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
                                {"name": "scratch", "emptyDir": {}}]})
    seen = run_to_json(kube_cluster, core, namespace, pod)

    assert seen["read"] == seen["subpath"] == "from the host"
    assert seen["pvc_writable"] is False  # readOnly mount
    assert seen["root_writable"] is False  # readOnlyRootFilesystem
    assert seen["shm"] == "tmpfs"
    assert seen["scratch_gid"] == 4242 and 4242 in seen["groups"]  # fsGroup applied by the kubelet
    assert int(seen["capabilities"], 16) == 0  # every capability dropped


def test_run_as_non_root_refuses_a_root_user(kube_cluster, core, namespace):
    pod = python_pod("rooted", "print('ran')",
                     securityContext={"runAsUser": 0, "runAsNonRoot": True})
    core.create_namespaced_pod(namespace, pod)

    def refused():
        statuses = core.read_namespaced_pod("rooted", namespace).status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting if waiting and waiting.reason == "CreateContainerConfigError" else None

    waiting = wait_for(refused, timeout=60, what="CreateContainerConfigError for runAsUser 0")
    assert "non-root" in waiting.message


def test_an_image_that_cannot_be_pulled_is_reported(kube_cluster, core, namespace):
    pod = python_pod("no-image", "print('never')", image="localhost/finetune-does-not-exist:1",
                     imagePullPolicy="IfNotPresent")
    core.create_namespaced_pod(namespace, pod)

    def pull_failed():
        statuses = core.read_namespaced_pod("no-image", namespace).status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting if waiting and waiting.reason in ("ErrImagePull", "ImagePullBackOff") else None

    waiting = wait_for(pull_failed, timeout=60, what="ErrImagePull")
    assert "finetune-does-not-exist" in waiting.message
