{{/* Chart name, overridable. */}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-derived prefix of object names. */}}
{{- define "tollgate.fullname" -}}
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

{{/* The operator's Deployment, Service and RBAC objects: `<fullname>-operator`. */}}
{{- define "tollgate.operator" -}}
{{- printf "%s-operator" (include "tollgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tollgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tollgate.operator" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tollgate.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "tollgate.operator" .)) .Values.tls.secretName }}
{{- end }}

{{- define "tollgate.leaseName" -}}
{{- default (include "tollgate.operator" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* registry/repository:tag or registry/repository@digest; call with an image values map and the root context. */}}
{{- define "tollgate.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- $repo := $image.repository }}
{{- if $image.registry }}
{{- $repo = printf "%s/%s" $image.registry $image.repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repo $image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* DNS names the sidecar channel's certificate is valid for. */}}
{{- define "tollgate.dnsNames" -}}
{{- $svc := include "tollgate.operator" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson }}
{{- end }}

{{/* The sidecar injection webhook's MutatingWebhookConfiguration. */}}
{{- define "tollgate.webhookConfiguration" -}}
{{- printf "%s-sidecar-injector" (include "tollgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret of the webhook's serving certificate: the operator's own CA and certificate, or cert-manager's. */}}
{{- define "tollgate.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "tollgate.operator" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ConfigMap carrying the sidecar channel's CA in every namespace. */}}
{{- define "tollgate.caConfigMap" -}}
{{- printf "%s-ca" (include "tollgate.operator" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Namespaces never injected, as a JSON list: the system ones, webhook.excludedNamespaces, the release's. */}}
{{- define "tollgate.excludedNamespaces" -}}
{{- concat (list "kube-system" "kube-public" "kube-node-lease") .Values.webhook.excludedNamespaces (list .Release.Namespace) | uniq | toJson }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "tollgate.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: without it every replica would write status" }}
{{- end }}
{{- if and .Values.webhook.enabled (eq (int .Values.webhook.port) (int .Values.ports.sidecars)) }}
{{- fail "webhook.port must differ from ports.sidecars" }}
{{- end }}
{{- if and .Values.webhook.enabled (eq (int .Values.webhook.port) (int .Values.ports.admin)) }}
{{- fail "webhook.port must differ from ports.admin" }}
{{- end }}
{{- if and (not .Values.tls.create) (not .Values.certManager.enabled) (not .Values.tls.secretName) }}
{{- fail "tls.create false needs tls.secretName: the Secret (tls.crt, tls.key, ca.crt) you provide" }}
{{- end }}
{{- end }}

{{/* The rules for watched namespaces (operator/README.md, "RBAC it needs"). */}}
{{- define "tollgate.watchRules" -}}
# Reconcile PartnerIntegrations; patch: the finalizer.
- apiGroups: ["tollgate.dev"]
  resources: ["partnerintegrations"]
  verbs: ["get", "list", "watch", "patch"]
# Status, by server-side apply (the leader only).
- apiGroups: ["tollgate.dev"]
  resources: ["partnerintegrations/status"]
  verbs: ["patch"]
# Credentials: only Secrets labelled tollgate.dev/credential=true are listed and watched
# (RBAC cannot narrow by label). Read only.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Contract schemas: only ConfigMaps labelled tollgate.dev/contract-schema=true are listed and
# watched (read from that cache, never got by name). Read only.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "watch"]
# Sidecar authentication: the Pod a token is bound to must exist with the token's uid.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
# KillSwitchEnabled/Disabled, InvalidSpec, SecretMissing.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
