"""pytest plugin: the session-scoped `kube_cluster` fixture.

Enable with `pytest_plugins = ["localcluster.pytest_plugin"]` in the root
conftest.py. By default it builds (once, cached; images are rebuilt when the
code they hold changed) and starts a local cluster with one real node (kubelet,
containerd, runc); with FINETUNE_E2E_CLUSTER=kind (or `existing`) and KUBECONFIG
set it uses that cluster instead. If the cluster cannot start, the tests using
it FAIL with the reason: an end-to-end suite that silently skips proves nothing.

The yielded object has: kubeconfig (path), kubectl(*args, check=True,
input=None) -> CompletedProcess, kubectl_path, helm_path, api_client(),
pvc_dir(namespace, claim), pod_log(namespace, name, container=None),
uses_node_agent.
"""

import os

import pytest

ENV_MODE = "FINETUNE_E2E_CLUSTER"


def start_cluster_for_tests():
    mode = os.environ.get(ENV_MODE, "local").strip().lower() or "local"
    if mode in ("kind", "existing"):
        from localcluster.existing import ExistingCluster

        return ExistingCluster(kubeconfig=os.environ.get("KUBECONFIG", ""), mode=mode).start()
    if mode != "local":
        raise ValueError(f"{ENV_MODE}={mode!r}: expected local, kind or existing")
    from localcluster import build
    from localcluster.cluster import Cluster

    build.build()
    return Cluster().start()


@pytest.fixture(scope="session")
def kube_cluster():
    try:
        cluster = start_cluster_for_tests()
    except Exception as exc:
        pytest.fail(f"kube_cluster could not start: {type(exc).__name__}: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
