{{- define "idemq.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "idemq.labels" -}}
app.kubernetes.io/name: idemq
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "idemq.selectorLabels" -}}
app.kubernetes.io/name: idemq
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "idemq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "idemq.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* The Secret the webhook serves from: the operator's own (CA and
serving certificate), or the one cert-manager issues into. */ -}}
{{- define "idemq.webhookSecret" -}}
{{- if .Values.webhook.certManager.enabled -}}
{{- printf "%s-webhook-cert" (include "idemq.fullname" .) -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "idemq.fullname" .) -}}
{{- end -}}
{{- end -}}
