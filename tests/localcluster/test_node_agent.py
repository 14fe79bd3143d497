"""The node agent runs pods as local processes and reports status like a kubelet.

It is kept for what a single real node cannot do: many fake nodes (the operator
scale benchmark, multi-node scheduling); these tests start an agent cluster of
their own beside the session's real-node cluster.
"""

import os
import pathlib
import sys
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from localcluster.agent import project_paths
from localcluster.polling import wait_for

POD_NAME_ENV = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
POD_NAMESPACE_ENV = {"name": "POD_NAMESPACE",
                     "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}


@pytest.fixture(scope="module")
def agent_cluster():
    """A cluster of its own with the node agent (the session's cluster has a real node)."""
    from localcluster.cluster import Cluster

    with Cluster(runtime="agent", log=lambda message: None) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def namespace(agent_cluster):
    name = f"lc-agent-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(agent_cluster.api_client())
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name),
             timeout=30, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def core(agent_cluster):
    return client.CoreV1Api(agent_cluster.api_client())


def python_pod(name: str, code: str, *, restart_policy="Never", **container_fields) -> dict:
    container = {"name": "main", "image": "ghcr.io/example/trainer:latest",
                 "command": ["python", "-c", code], "env": [POD_NAME_ENV, POD_NAMESPACE_ENV]}
    container.update(container_fields)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart_policy, "containers": [container]}}


def wait_finished(core, namespace: str, name: str, *, timeout: float = 30):
    def finished():
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(finished, timeout=timeout, what=f"pod {namespace}/{name} to finish")


def test_gpu_pod_runs_its_command_to_success(agent_cluster, core, namespace):
    pod = python_pod(
        "hello-gpu", "import os, sys; print('hello from', os.environ['POD_NAME'], sys.prefix)",
        resources={"limits": {"nvidia.com/gpu": "1"}},
    )
    core.create_namespaced_pod(namespace, pod)

    finished = wait_finished(core, namespace, "hello-gpu")

    assert finished.status.phase == "Succeeded"
    terminated = finished.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert finished.status.pod_ip == "127.0.0.1"
    log = agent_cluster.pod_log(namespace, "hello-gpu")
    # `python` in the pod is the project's interpreter, not whatever the image had.
    assert log.split() == ["hello", "from", "hello-gpu", sys.prefix]


def test_failing_command_reports_exit_code_and_termination_message(core, namespace):
    code = ("open('/dev/termination-log', 'w').write('boom: bad learning rate')\n"
            "raise SystemExit(3)")
    core.create_namespaced_pod(namespace, python_pod("fails", code))

    finished = wait_finished(core, namespace, "fails")

    assert finished.status.phase == "Failed"
    terminated = finished.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert terminated.message == "boom: bad learning rate"


def test_fallback_to_logs_on_error_uses_the_log_tail(core, namespace):
    code = "import sys; print('traceback-ish line', file=sys.stderr); sys.exit(2)"
    core.create_namespaced_pod(namespace, python_pod(
        "fails-logs", code, terminationMessagePolicy="FallbackToLogsOnError"))

    terminated = wait_finished(core, namespace, "fails-logs").status.container_statuses[0].state.terminated

    assert terminated.exit_code == 2
    assert "traceback-ish line" in terminated.message


def test_init_containers_run_first_and_on_failure_restarts(core, namespace, agent_cluster):
    # The init container leaves a marker in the shared emptyDir; the main
    # container fails once (no second marker yet), then succeeds on restart.
    init = {"name": "init", "image": "busybox", "command": [
        "python", "-c", "open('/scratch/init-done', 'w').write('1')"],
        "volumeMounts": [{"name": "work", "mountPath": "/scratch"}]}
    main_code = ("import os, sys\n"
                 "assert os.path.exists('/scratch/init-done')\n"
                 "if not os.path.exists('/scratch/second'):\n"
                 "    open('/scratch/second', 'w').write('1'); sys.exit(1)\n"
                 "print('second attempt ok')")
    pod = python_pod("init-restart", main_code, restart_policy="OnFailure",
                     volumeMounts=[{"name": "work", "mountPath": "/scratch"}])
    pod["spec"]["initContainers"] = [init]
    pod["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    core.create_namespaced_pod(namespace, pod)

    finished = wait_finished(core, namespace, "init-restart")

    assert finished.status.phase == "Succeeded"
    assert finished.status.init_container_statuses[0].state.terminated.exit_code == 0
    status = finished.status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1
    assert "second attempt ok" in agent_cluster.pod_log(namespace, "init-restart")


def test_pvc_volume_maps_to_pvc_dir(agent_cluster, core, namespace):
    data = agent_cluster.pvc_dir(namespace, "dataset")
    (data / "input.txt").write_text("21")
    pod = python_pod(
        "pvc-user", "n = int(open('/data/input.txt').read()); open('/data/out.txt', 'w').write(str(2 * n))",
        volumeMounts=[{"name": "data", "mountPath": "/data"}])
    pod["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "dataset"}}]
    core.create_namespaced_pod(namespace, pod)

    assert wait_finished(core, namespace, "pvc-user").status.phase == "Succeeded"
    assert (data / "out.txt").read_text() == "42"


def test_configmap_and_secret_reach_env_and_volumes(core, namespace):
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"},
                                                  "data": {"lr": "0.001", "cfg.yaml": "a: 1\n"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "sec"},
                                              "stringData": {"token": "s3cr3t"}})
    code = ("import os\n"
            "assert os.environ['LR'] == '0.001', os.environ['LR']\n"
            "assert os.environ['TOKEN'] == 's3cr3t'\n"
            "assert open('/etc/cfg/cfg.yaml').read() == 'a: 1\\n'\n"
            "assert open('/etc/sec/token').read() == 's3cr3t'\n")
    pod = python_pod("config-user", code, volumeMounts=[
        {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
        {"name": "sec", "mountPath": "/etc/sec", "readOnly": True}])
    pod["spec"]["containers"][0]["env"] += [
        {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "lr"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}}]
    pod["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "cfg"}},
                              {"name": "sec", "secret": {"secretName": "sec"}}]
    core.create_namespaced_pod(namespace, pod)

    finished = wait_finished(core, namespace, "config-user")

    terminated = finished.status.container_statuses[0].state.terminated
    assert finished.status.phase == "Succeeded", terminated.message


def test_deleting_a_running_pod_ends_its_process(agent_cluster, core, namespace):
    pid_dir = agent_cluster.pvc_dir(namespace, "pids")
    pod = python_pod(
        "long-runner",
        "import os, time; open('/pids/pid', 'w').write(str(os.getpid())); time.sleep(600)",
        volumeMounts=[{"name": "pids", "mountPath": "/pids"}])
    pod["spec"]["volumes"] = [{"name": "pids", "persistentVolumeClaim": {"claimName": "pids"}}]
    core.create_namespaced_pod(namespace, pod)
    pid = int(wait_for(lambda: (pid_dir / "pid").read_text(), timeout=30, what="pid file"))
    assert os.path.exists(f"/proc/{pid}")

    core.delete_namespaced_pod("long-runner", namespace, grace_period_seconds=5)

    def pod_gone():
        try:
            core.read_namespaced_pod("long-runner", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(pod_gone, timeout=30, what="pod object removed after termination")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what=f"process {pid} gone")


def test_in_cluster_service_account_token_can_read_own_pod(agent_cluster, core, namespace):
    rbac = client.RbacAuthorizationV1Api(agent_cluster.api_client())
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    code = ("import os\n"
            "from kubernetes import client, config\n"
            "config.load_incluster_config()\n"
            "pod = client.CoreV1Api().read_namespaced_pod(os.environ['POD_NAME'], os.environ['POD_NAMESPACE'])\n"
            "print('service account', pod.spec.service_account_name, 'uid', pod.metadata.uid)\n")
    pod = python_pod("self-reader", code, terminationMessagePolicy="FallbackToLogsOnError")
    pod["spec"]["serviceAccountName"] = "reader"
    created = wait_for(lambda: core.create_namespaced_pod(namespace, pod), timeout=20,
                       what="pod creation once ServiceAccount reader is visible")

    finished = wait_finished(core, namespace, "self-reader")

    terminated = finished.status.container_statuses[0].state.terminated
    assert finished.status.phase == "Succeeded", terminated.message
    assert (f"service account reader uid {created.metadata.uid}"
            in agent_cluster.pod_log(namespace, "self-reader"))


def test_pod_with_empty_dir_at_tmp_still_sees_its_other_volumes_and_token(core, namespace):
    # The fixture keeps every volume's host dir under /tmp/localcluster-*; the
    # emptyDir at /tmp must not hide them (the chart's operator pod mounts one).
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "tmp-cfg"},
                                                  "data": {"mode": "strict"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "tmp-sec"},
                                              "stringData": {"password": "hunter2"}})
    # A checkout under /tmp is bound back on top of the emptyDir (the command needs its Python).
    project = {pathlib.PurePath(p).relative_to("/tmp").parts[0] for p in project_paths() if p.startswith("/tmp/")}
    code = ("import os\n"
            "from kubernetes import client, config\n"
            f"assert set(os.listdir('/tmp')) == {{'creds', *{sorted(project)!r}}}, os.listdir('/tmp')\n"
            "assert open('/etc/app/mode').read() == 'strict'\n"
            "assert open('/tmp/creds/password').read() == 'hunter2'\n"
            "open('/tmp/scratch', 'w').write('ok')\n"
            "config.load_incluster_config()\n"
            "print('apiserver', client.VersionApi().get_code().git_version)\n")
    pod = python_pod("tmp-empty-dir", code, terminationMessagePolicy="FallbackToLogsOnError",
                     volumeMounts=[{"name": "tmp", "mountPath": "/tmp"},
                                   {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
                                   {"name": "sec", "mountPath": "/tmp/creds", "readOnly": True}])
    pod["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}},
                              {"name": "cfg", "configMap": {"name": "tmp-cfg"}},
                              {"name": "sec", "secret": {"secretName": "tmp-sec"}}]
    core.create_namespaced_pod(namespace, pod)

    finished = wait_finished(core, namespace, "tmp-empty-dir")

    terminated = finished.status.container_statuses[0].state.terminated
    assert finished.status.phase == "Succeeded", terminated.message
