{{/* The labels every object carries (the selector's too). */}}
{{- define "datapath.labels" -}}
app.kubernetes.io/name: datapathd
{{- end }}

{{/* "true" when the Kubernetes service source is on: it needs the RBAC and the API token. */}}
{{- define "datapath.kubernetesSource" -}}
{{- if dig "kubernetes" "enabled" false .Values.config }}true{{ end }}
{{- end }}
