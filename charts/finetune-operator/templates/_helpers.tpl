{{/*
Named templates: every resource name, the labels, and the checks of values
that the JSON schema cannot express. Templates never build names inline.
*/}}

{{/* Chart name, overridable. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every namespaced resource of the release. */}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Cluster-scoped names carry the release namespace so two releases never collide. */}}
{{- define "finetune-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/* ---- names of the resources, one per template file ---- */}}

{{- define "finetune-operator.deploymentName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Everything the operator needs in a namespace (cluster scope: in all of them). */}}
{{- define "finetune-operator.operatorRoleName" -}}
{{- if eq .Values.rbac.scope "cluster" }}
{{- include "finetune-operator.clusterName" . }}
{{- else }}
{{- include "finetune-operator.fullname" . }}
{{- end }}
{{- end }}

{{/* Read-only cluster-scoped discovery (CRDs) needed in namespace scope too. */}}
{{- define "finetune-operator.discoveryClusterRoleName" -}}
{{- printf "%s-discovery" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.leaderElectionRoleName" -}}
{{- printf "%s-leader-election" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Aggregated into the built-in edit/admin and view ClusterRoles. */}}
{{- define "finetune-operator.editClusterRoleName" -}}
{{- printf "%s-edit" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.viewClusterRoleName" -}}
{{- printf "%s-view" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.webhookConfigurationName" -}}
{{- printf "%s-validation" (include "finetune-operator.clusterName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The TLS Secret the operator mounts: the user's, or the one the chart generates. */}}
{{- define "finetune-operator.webhookSecretName" -}}
{{- if .Values.webhook.certificate.existingSecret }}
{{- .Values.webhook.certificate.existingSecret }}
{{- else }}
{{- printf "%s-webhook-tls" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "finetune-operator.serviceMonitorName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}

{{- define "finetune-operator.podMonitorName" -}}
{{- printf "%s-trainers" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.crdName" -}}
finetuneruns.finetune.dev
{{- end }}

{{/* ---- images ---- */}}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{/* ---- webhook ---- */}}

{{/* Where the operator reads its serving certificate (the mounted Secret). */}}
{{- define "finetune-operator.webhookCertDir" -}}
/etc/finetune-operator/webhook
{{- end }}

{{/*
Path of the operator's validating handler on its webhook server. kopf serves
each admission handler at /<handler id>; this must match the id in
operator/ (tests/chart/test_chart_render.py checks it against the source).
*/}}
{{- define "finetune-operator.webhookPath" -}}
/validate-finetunerun
{{- end }}

{{/* Host of webhook.url ("127.0.0.1" from "https://127.0.0.1:9443/x"); empty without a URL. */}}
{{- define "finetune-operator.webhookUrlHost" -}}
{{- with .Values.webhook.url }}
{{- $host := (urlParse .).host }}
{{- if hasPrefix "[" $host }}
{{- regexReplaceAll "^\\[([^\\]]+)\\].*$" $host "${1}" }}
{{- else }}
{{- regexReplaceAll ":[0-9]+$" $host "" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The generated CA and serving certificate, as a dict {caCert, tlsCert, tlsKey}.

Generated once per render and cached in a dict stored on .Release-independent
state ($.Values is one map shared by all templates of a render), so the Secret
and the ValidatingWebhookConfiguration see the same CA. On upgrade the
existing Secret is reused (lookup), so clients never see a new CA unless the
Secret is deleted. `helm template` has no cluster, so it always generates.
*/}}
{{- define "finetune-operator.generatedCertificate" -}}
{{- if not (hasKey .Values "__generatedCertificate") }}
{{- $secretName := include "finetune-operator.webhookSecretName" . }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $secretName }}
{{- $hosts := include "finetune-operator.webhookDnsNames" . | fromYamlArray }}
{{- $ips := list }}
{{- $urlHost := include "finetune-operator.webhookUrlHost" . }}
{{- if $urlHost }}
{{- if regexMatch "^[0-9.]+$|:" $urlHost }}
{{- $ips = append $ips $urlHost }}
{{- else }}
{{- $hosts = append $hosts $urlHost }}
{{- end }}
{{- end }}
{{- $reuse := false }}
{{- if and $existing $existing.data }}
{{- if and (index $existing.data "ca.crt") (index $existing.data "tls.crt") (index $existing.data "tls.key") }}
{{- $reuse = true }}
{{- end }}
{{- end }}
{{- if and $reuse (eq (index ($existing.metadata.annotations | default dict) "finetune.dev/certificate-hosts") (join "," (concat $hosts $ips))) }}
{{- $_ := set .Values "__generatedCertificate" (dict "caCert" (index $existing.data "ca.crt") "tlsCert" (index $existing.data "tls.crt") "tlsKey" (index $existing.data "tls.key") "hosts" (join "," (concat $hosts $ips))) }}
{{- else }}
{{- $days := int .Values.webhook.certificate.validityDays }}
{{- $ca := genCA (printf "%s-webhook-ca" (include "finetune-operator.fullname" .)) $days }}
{{- $cert := genSignedCert (first $hosts) $ips $hosts $days $ca }}
{{- $_ := set .Values "__generatedCertificate" (dict "caCert" ($ca.Cert | b64enc) "tlsCert" ($cert.Cert | b64enc) "tlsKey" ($cert.Key | b64enc) "hosts" (join "," (concat $hosts $ips))) }}
{{- end }}
{{- end }}
{{- toYaml (get .Values "__generatedCertificate") }}
{{- end }}

{{/* DNS names the webhook Service answers to (YAML list). */}}
{{- define "finetune-operator.webhookDnsNames" -}}
{{- $svc := include "finetune-operator.webhookServiceName" . }}
- {{ $svc }}
- {{ printf "%s.%s" $svc .Release.Namespace }}
- {{ printf "%s.%s.svc" $svc .Release.Namespace }}
- {{ printf "%s.%s.svc.cluster.local" $svc .Release.Namespace }}
{{- end }}

{{/* Base64 PEM of the CA the API server trusts for the webhook. */}}
{{- define "finetune-operator.webhookCaBundle" -}}
{{- if .Values.webhook.certificate.existingSecret }}
{{- .Values.webhook.certificate.caBundle }}
{{- else }}
{{- (include "finetune-operator.generatedCertificate" . | fromYaml).caCert }}
{{- end }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express. Included by the
Deployment (always rendered), so any inconsistency stops `helm install`.
*/}}
{{- define "finetune-operator.validateValues" -}}
{{- if and (eq .Values.rbac.scope "namespace") (empty .Values.watchNamespaces) }}
{{- fail "rbac.scope=namespace needs watchNamespaces: list the namespaces whose FineTuneRuns the operator handles (it gets a Role in each), or use rbac.scope=cluster" }}
{{- end }}
{{- if and .Values.webhook.certificate.existingSecret (not .Values.webhook.certificate.caBundle) }}
{{- fail "webhook.certificate.existingSecret needs webhook.certificate.caBundle: the base64 PEM of the CA that signed it, so the API server can trust the webhook" }}
{{- end }}
{{- if and .Values.webhook.certificate.caBundle (not .Values.webhook.certificate.existingSecret) }}
{{- fail "webhook.certificate.caBundle is only used with webhook.certificate.existingSecret; set both, or neither to let the chart generate a certificate" }}
{{- end }}
{{- if and .Values.webhook.url (not (hasPrefix "https://" .Values.webhook.url)) }}
{{- fail (printf "webhook.url must start with https:// (the API server only calls webhooks over TLS), got %q" .Values.webhook.url) }}
{{- end }}
{{- $ports := list (int .Values.metrics.port) (int .Values.liveness.port) }}
{{- if .Values.webhook.enabled }}{{ $ports = append $ports (int .Values.webhook.port) }}{{ end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "metrics.port, liveness.port and webhook.port must differ, got %v" $ports) }}
{{- end }}
{{- end }}
