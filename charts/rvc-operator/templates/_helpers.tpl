{{- define "rvc-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rvc-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "rvc-operator.labels" -}}
app.kubernetes.io/name: {{ include "rvc-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "rvc-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rvc-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rvc-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rvc-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rvc-operator.s3Secret" -}}
{{- if .Values.s3.credentialsSecret }}{{ .Values.s3.credentialsSecret }}{{- else if .Values.s3.createSecret }}{{ include "rvc-operator.fullname" . }}-s3{{- end }}
{{- end }}
