"""`ExistingCluster`: the same test-facing API for a cluster someone else runs (kind, ...).

Selected by FINETUNE_E2E_CLUSTER=kind|existing with KUBECONFIG set. There is no
node agent: pods run in real containers, so host-side helpers like pvc_dir are
unavailable and say so.
"""

import os
import shutil

from localcluster import tools
from localcluster.cluster import ClusterError, run_kubectl


class ExistingCluster:
    uses_node_agent = False

    def __init__(self, *, kubeconfig: str, mode: str):
        if not kubeconfig or not os.path.isfile(kubeconfig.split(os.pathsep)[0]):
            raise ClusterError(
                f"FINETUNE_E2E_CLUSTER={mode} needs KUBECONFIG to name an existing kubeconfig file "
                f"(got {kubeconfig!r})"
            )
        self.kubeconfig = kubeconfig.split(os.pathsep)[0]
        self.mode = mode

    def start(self):
        self.kubectl("version")
        return self

    def stop(self) -> None:
        """Nothing to stop: the cluster belongs to someone else."""

    @property
    def kubectl_path(self) -> str:
        try:
            return str(tools.kubectl_path())
        except Exception:
            found = shutil.which("kubectl")
            if not found:
                raise
            return found

    @property
    def helm_path(self) -> str:
        try:
            return str(tools.helm_path())
        except Exception:
            found = shutil.which("helm")
            if not found:
                raise
            return found

    def kubectl(self, *args, check=True, input=None):
        return run_kubectl(self.kubectl_path, self.kubeconfig, args, check=check, input=input)

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def pvc_dir(self, namespace: str, claim: str):
        raise ClusterError(
            f"pvc_dir({namespace!r}, {claim!r}) needs the local node agent, but "
            f"FINETUNE_E2E_CLUSTER={self.mode}: pods run in real containers whose volumes are not "
            "host directories. Copy data in with a pod, or skip this test when "
            "kube_cluster.uses_node_agent is False."
        )

    def pod_log(self, namespace: str, name: str, container=None) -> str:
        from kubernetes import client

        return client.CoreV1Api(self.api_client()).read_namespaced_pod_log(
            name, namespace, container=container)
