{{- define "gantry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gantry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gantry.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gantry.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "gantry.agentImage" -}}
{{ .Values.agent.image.repository | default .Values.image.repository }}:{{ .Values.agent.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "gantry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "gantry.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{/* The etcd client URLs the coordinators use: external, or the chart's own; empty for the
embedded store. */}}
{{- define "gantry.etcdEndpoints" -}}
{{- if gt (int .Values.coordinator.replicas) 1 -}}
{{- if .Values.etcd.endpoints -}}
{{ join "," .Values.etcd.endpoints }}
{{- else if .Values.etcd.deploy -}}
{{- $name := printf "%s-etcd" (include "gantry.fullname" .) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s:2379" $name $i $name) -}}
{{- end -}}
{{ join "," $urls }}
{{- else -}}
{{- fail "coordinator.replicas > 1 needs etcd: set etcd.endpoints (an external etcd) or etcd.deploy: true" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gantry.grpcUrl" -}}
https://{{ include "gantry.fullname" . }}:{{ .Values.coordinator.grpcPort }}
{{- end -}}

{{- define "gantry.caSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-ca" (include "gantry.fullname" .)) -}}
{{- end -}}

{{- define "gantry.tokensSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-tokens" (include "gantry.fullname" .)) -}}
{{- end -}}
