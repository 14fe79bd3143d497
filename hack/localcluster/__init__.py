"""A real local Kubernetes control plane for tests and demos.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (Kubernetes
1.20.2, built once from Debian's source package) run on 127.0.0.1, and a node
agent stands in for the kubelet by running pod containers as local processes.
See README.md in this folder.

`Cluster` is imported lazily so that `python -m localcluster build` works with
a bare system Python (no kubernetes client installed yet).
"""


def __getattr__(name):
    if name in ("Cluster", "ClusterError"):
        from localcluster import cluster

        return getattr(cluster, name)
    raise AttributeError(name)
