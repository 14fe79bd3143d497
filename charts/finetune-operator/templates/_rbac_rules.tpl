{{/*
The operator's permissions in a namespace where it handles FineTuneRuns.
Shared by the ClusterRole (rbac.scope=cluster) and the per-namespace Roles
(rbac.scope=namespace) so both grant exactly the same.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# Exactly what the operator uses (operator/ftoperator/permissions.py says why for
# each verb; tests/chart/test_rbac.py compares the two).
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion; clusters with the OwnerReferencesPermissionEnforcement
# admission plugin (OpenShift, hardened clusters) require this to set it.
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns/finalizers"]
  verbs: ["update"]
# Human-feedback rounds: the operator counts a round's labels, and grants the run's
# pods list (its reward stage retrains on them).
- apiGroups: ["finetune.dev"]
  resources: ["preferencelabels"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# patch and update are held because the operator grants them (by resourceName) to
# the run's ServiceAccount, and RBAC only lets you grant what you hold.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update"]
# A headless Service per attempt of a stage with resources.nodes > 1: rank 0's name for
# the other pods' rendezvous (deleted with the run by the garbage collector).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# spec.distributed.gangScheduler coscheduling or volcano: a PodGroup per attempt of a
# multi-node stage, so that scheduler binds all its pods or none.
- apiGroups: ["scheduling.x-k8s.io", "scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "create"]
# A ServiceAccount, Role and RoleBinding per run, letting its pods write only their
# progress ConfigMap (deleted with the run by the garbage collector).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
Cluster-scoped reads kopf needs in every scope: it scans CRDs to find its
resource, and lists/watches namespaces even when given exact names (without it
kopf retries for ~40 s at start-up, then logs that namespace changes go unnoticed).
*/}}
{{- define "finetune-operator.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
Leader election: the Lease in the release namespace (Role leader-election).
*/}}
{{- define "finetune-operator.leaderElectionRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end }}
