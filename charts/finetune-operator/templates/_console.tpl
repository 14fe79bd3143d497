{{/*
Names and rules of the console (console/ftconsole; docs/console.md). Its own file so
the console's templates stay apart from the operator's.
*/}}

{{- define "finetune-operator.consoleName" -}}
{{- printf "%s-console" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Cluster-scoped objects of the console carry the release namespace, like the operator's. */}}
{{- define "finetune-operator.consoleClusterName" -}}
{{- printf "%s-console" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.consoleLabelsEditClusterRoleName" -}}
{{- printf "%s-labels-edit" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.consoleLabelsViewClusterRoleName" -}}
{{- printf "%s-labels-view" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.consoleSelectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}-console
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
What the console's ServiceAccount may read and write where runs are: exactly
ftconsole.kube.PERMISSIONS (tests/console/test_chart.py compares). It acts only after a
SubjectAccessReview said the *user* may; ConfigMaps only by name (get), never list.
*/}}
{{- define "finetune-operator.consoleDataRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruns"]
  verbs: ["get", "list"]
- apiGroups: ["finetune.dev"]
  resources: ["preferencelabels"]
  verbs: ["list", "create"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
{{- end }}
