{{- define "kmsgrant-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kmsgrant-operator.fullname" -}}
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

{{- define "kmsgrant-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kmsgrant-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is needed when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* repository:tag, or repository@digest when a digest pins it. */}}
{{- define "kmsgrant-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "kmsgrant-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kmsgrant-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kmsgrant-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kmsgrant-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kmsgrant-operator
{{- end }}

{{- define "kmsgrant-operator.leaseName" -}}
{{- default (include "kmsgrant-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "kmsgrant-operator.checks" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled: without it every replica writes to KMS" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes that Service" }}
{{- end }}
{{- if not (has .Values.logFormat (list "text" "json")) }}
{{- fail "logFormat must be text or json" }}
{{- end }}
{{- end }}

{{- /* The rules on KmsGrants: cluster-wide, or in watchNamespace only. */}}
{{- define "kmsgrant-operator.grantRules" }}
  # Watch grants; patch them to add and remove the kmsgrant.io/grant finalizer.
  - apiGroups: [kmsgrant.io]
    resources: [kmsgrants]
    verbs: [get, list, watch, patch]
  - apiGroups: [kmsgrant.io]
    resources: [kmsgrants/status]
    verbs: [patch]
  # Tenants' own provider configs (KmsNamespacedProviderConfig): watched; patched only for the
  # kmsgrant.io/in-use finalizer; their status reports whether the credentials work.
  - apiGroups: [kmsgrant.io]
    resources: [kmsnamespacedproviderconfigs]
    verbs: [get, list, watch, patch]
  - apiGroups: [kmsgrant.io]
    resources: [kmsnamespacedproviderconfigs/status]
    verbs: [patch]
  # GrantCreated, GrantRevoked, Warnings...: events.k8s.io/v1 Events next to the grants.
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [create, patch]
{{- end }}

{{- /* Kept on helm uninstall, and by Argo CD and Flux when they render the chart themselves. */}}
{{- define "kmsgrant-operator.crdKeepAnnotations" -}}
{{ "\n" }}metadata:
  annotations:
    helm.sh/resource-policy: keep
    argocd.argoproj.io/sync-options: Delete=false,Prune=false
    kustomize.toolkit.fluxcd.io/prune: disabled
{{ end }}

{{/*
The pre-upgrade check of docs/versioning.md: a chart whose CRD no longer serves (or lists)
kmsgrant.io/v1alpha1 is refused while the live cluster still stores it (the CRD's
status.storedVersions) or any object's managedFields name it. Needs a live cluster (`lookup`
returns nothing in `helm template`), so it guards `helm install` and `helm upgrade`.
*/}}
{{- define "kmsgrant-operator.refuseToStopServingTooSoon" -}}
{{- $crd := . -}}
{{- $serves := false -}}
{{- range $crd.spec.versions -}}
{{- if and (eq .name "v1alpha1") .served -}}{{- $serves = true -}}{{- end -}}
{{- end -}}
{{- if not $serves -}}
{{- $live := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" $crd.metadata.name -}}
{{- if $live -}}
{{- $stored := list -}}
{{- if $live.status -}}{{- $stored = $live.status.storedVersions | default list -}}{{- end -}}
{{- if has "v1alpha1" $stored -}}
{{- fail (printf "refusing to stop serving kmsgrant.io/v1alpha1: CRD %s still lists it in status.storedVersions %v (objects may be stored at v1alpha1). Let the operator finish its storage migration, or run `kmsgrant-operator migrate --cluster`, then `kmsgrant-operator migrate --check` (docs/versioning.md)" $crd.metadata.name $stored) -}}
{{- end -}}
{{- $objects := lookup "kmsgrant.io/v1beta1" $crd.spec.names.kind "" "" -}}
{{- range ($objects.items | default list) -}}
{{- $object := . -}}
{{- range ($object.metadata.managedFields | default list) -}}
{{- if eq .apiVersion "kmsgrant.io/v1alpha1" -}}
{{- fail (printf "refusing to stop serving kmsgrant.io/v1alpha1: the managedFields of %s %s/%s (manager %s) still name it; server-side apply would fail on them. Run `kmsgrant-operator migrate --cluster`, then `kmsgrant-operator migrate --check` (docs/versioning.md)" $crd.spec.names.kind ($object.metadata.namespace | default "") $object.metadata.name .manager) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
