{{/* Chart name, truncated to a DNS label. */}}
{{- define "fedsilo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped full name. */}}
{{- define "fedsilo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; the operator's Deployment and pods add selectorLabels' component. */}}
{{- define "fedsilo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fedsilo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedsilo
{{- end -}}

{{- define "fedsilo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedsilo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "fedsilo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedsilo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fedsilo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A glob (* and ?) as an anchored RE2 regex, as the operator's fnmatch reads it. */}}
{{- define "fedsilo.globRegex" -}}
{{- printf "^%s$" (regexQuoteMeta . | replace "\\*" ".*" | replace "\\?" ".") -}}
{{- end -}}

{{/* Whether the operator watches some namespaces only: its rights are then Roles there. */}}
{{- define "fedsilo.namespaced" -}}
{{- if .Values.operator.watchNamespaces }}true{{ end -}}
{{- end -}}

{{/* Name of the tenancy ValidatingAdmissionPolicy and its binding (cluster-scoped). */}}
{{- define "fedsilo.tenancyPolicyName" -}}
{{- printf "%s-tenancy" (include "fedsilo.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
