{{/*
The operator's permissions in a namespace where it handles FineTuneRuns.
Shared by the ClusterRole (rbac.scope=cluster) and the per-namespace Roles
(rbac.scope=namespace) so both grant exactly the same.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# The custom resource: watch, patch status and kopf's finalizers/annotations.
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns/status"]
  verbs: ["get", "patch", "update"]
# Children carry blockOwnerDeletion; clusters with the OwnerReferencesPermissionEnforcement
# admission plugin (OpenShift, hardened clusters) require this to set it.
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns/finalizers"]
  verbs: ["update"]
# Children of a run: trainer pods, the stage-config/progress ConfigMaps and a
# ServiceAccount per run.
- apiGroups: [""]
  resources: ["pods", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# update is held because the operator grants it (by resourceName) to the run's
# ServiceAccount, and RBAC only lets you grant what you hold.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete", "patch", "update"]
# A Role + RoleBinding per run, letting its pods write only their progress ConfigMap.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "delete", "patch"]
# kopf posts events about the objects it handles.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
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
