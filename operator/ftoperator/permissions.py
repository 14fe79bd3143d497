"""Every permission the operator needs, and why: the chart's RBAC rules must be exactly these.

tests/chart/test_rbac.py records the requests ``kubeapi.KubeApi`` makes (each maps to one
(group, resource, verb) by ``kubeapi.permission_of``) and checks they are all listed here, and that
the chart grants exactly this list -- nothing more. kopf's own requests (its watches, and the
patch that removes the finalizer older operators put on runs) are listed from its documented
behaviour.
"""

from __future__ import annotations

Permission = tuple[str, str, str]  # (API group, resource, verb)

NAMESPACED: dict[Permission, str] = {
    ("finetune.dev", "finetuneruns", "get"): "kubeapi.get_run, each reconcile pass",
    ("finetune.dev", "finetuneruns", "list"): "kopf watches runs",
    ("finetune.dev", "finetuneruns", "watch"): "kopf watches runs",
    ("finetune.dev", "finetuneruns", "patch"): "kopf removes the finalizer operators before 0.2 put on runs",
    ("finetune.dev", "finetuneruns/status", "patch"): "kubeapi.patch_run_status",
    ("finetune.dev", "finetuneruns/finalizers", "update"):
        "children carry blockOwnerDeletion; the OwnerReferencesPermissionEnforcement admission plugin checks it",
    ("finetune.dev", "preferencelabels", "list"):
        "kubeapi.list_objects counts a human-feedback round's labels; granted to the run's Role (its reward stage "
        "retrains on them)",
    ("", "pods", "get"): "kubeapi.get_object after a 409",
    ("", "pods", "list"): "kubeapi.list_pods; kopf watches pods",
    ("", "pods", "watch"): "kopf watches pods",
    ("", "pods", "create"): "stage pods",
    ("", "pods", "delete"): "suspend, deadline, stuck pods",
    ("", "configmaps", "get"): "kubeapi.get_object after a 409; granted to the run's Role (RBAC escalation check)",
    ("", "configmaps", "list"): "kubeapi.list_objects; kopf watches progress ConfigMaps",
    ("", "configmaps", "watch"): "kopf watches progress ConfigMaps",
    ("", "configmaps", "create"): "stage and progress ConfigMaps",
    ("", "configmaps", "patch"): "granted to the run's Role: RBAC lets you grant only what you hold",
    ("", "configmaps", "update"): "granted to the run's Role: RBAC lets you grant only what you hold",
    ("", "services", "get"): "kubeapi.get_object after a 409 (the rendezvous Service of a multi-node stage)",
    ("", "services", "create"): "the headless rendezvous Service of each attempt of a multi-node stage",
    ("scheduling.x-k8s.io", "podgroups", "get"): "kubeapi.get_object after a 409 (gangScheduler coscheduling)",
    ("scheduling.x-k8s.io", "podgroups", "create"): "the PodGroup of each attempt of a multi-node stage with "
                                                    "gangScheduler coscheduling",
    ("scheduling.volcano.sh", "podgroups", "get"): "kubeapi.get_object after a 409 (gangScheduler volcano)",
    ("scheduling.volcano.sh", "podgroups", "create"): "the PodGroup of each attempt of a multi-node stage with "
                                                      "gangScheduler volcano",
    ("", "serviceaccounts", "get"): "kubeapi.get_object, each pass",
    ("", "serviceaccounts", "create"): "the run's ServiceAccount",
    ("rbac.authorization.k8s.io", "roles", "get"): "kubeapi.get_object, each pass",
    ("rbac.authorization.k8s.io", "roles", "create"): "the run's Role",
    ("rbac.authorization.k8s.io", "rolebindings", "get"): "kubeapi.get_object, each pass",
    ("rbac.authorization.k8s.io", "rolebindings", "create"): "the run's RoleBinding",
    ("", "events", "create"): "kubeapi.post_event",
}
"""In every namespace whose runs the operator handles."""

CLUSTER: dict[Permission, str] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"): "kopf scans CRDs for its resource",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf scans CRDs for its resource",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf scans CRDs for its resource",
    ("", "namespaces", "list"): "kopf resolves --namespace globs",
    ("", "namespaces", "watch"): "kopf resolves --namespace globs",
}
"""Cluster-scoped reads, in every rbac scope."""

LEADER_ELECTION: dict[Permission, str] = {
    ("coordination.k8s.io", "leases", "get"): "election.LeaderElector",
    ("coordination.k8s.io", "leases", "create"): "election.LeaderElector (first replica)",
    ("coordination.k8s.io", "leases", "update"): "election.LeaderElector renews, takes over, releases",
}
"""In the operator's own namespace (--leader-election-namespace)."""
