{{- define "fedsilo-silo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart>, or the override. */}}
{{- define "fedsilo-silo.fullname" -}}
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

{{- define "fedsilo-silo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedsilo-silo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: silo-agent
{{- end -}}

{{- define "fedsilo-silo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fedsilo-silo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedsilo
fedsilo.io/job: {{ .Values.job | quote }}
fedsilo.io/silo: {{ .Values.silo | quote }}
{{- end -}}

{{- define "fedsilo-silo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedsilo-silo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels of the agent pod: no chart or app version, so a chart upgrade alone does not
     change the pod template (immutable in a Job). */}}
{{- define "fedsilo-silo.podLabels" -}}
{{ include "fedsilo-silo.selectorLabels" . }}
app.kubernetes.io/part-of: fedsilo
fedsilo.io/job: {{ .Values.job | quote }}
fedsilo.io/silo: {{ .Values.silo | quote }}
{{- end -}}

{{/* The silo agent pod (shared by the Job and the Deployment form). */}}
{{- define "fedsilo-silo.podTemplate" -}}
metadata:
  labels:
    {{- include "fedsilo-silo.podLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  restartPolicy: {{ eq .Values.agent.kind "Job" | ternary "OnFailure" "Always" }}
  serviceAccountName: {{ include "fedsilo-silo.serviceAccountName" . }}
  # The agent never talks to the Kubernetes API.
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: silo-agent
      image: {{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["fedsilo", "silo-agent"]
      env:
        - name: FEDSILO_AGGREGATOR_URL
          value: {{ .Values.aggregator.url | quote }}
        - name: FEDSILO_JOB
          value: {{ .Values.job | quote }}
        - name: FEDSILO_SILO
          value: {{ .Values.silo | quote }}
        # a file, not an env var: a token the hub rotates reaches the running agent when the Secret changes
        - name: FEDSILO_TOKEN_FILE
          value: /etc/fedsilo/token/token
        - name: FEDSILO_DATA_ROOT
          value: /data
        {{- if or .Values.model.path .Values.model.existingClaim }}
        - name: FEDSILO_MODEL_PATH
          value: {{ default "/models" .Values.model.path | quote }}
        {{- end }}
        {{- if or .Values.aggregator.caBundle.configMap .Values.aggregator.caBundle.secret }}
        - name: FEDSILO_CA_BUNDLE
          value: {{ printf "/etc/fedsilo/ca/%s" .Values.aggregator.caBundle.key | quote }}
        {{- end }}
        {{- with .Values.aggregator.clientCert }}
        {{- if .secret }}
        - name: FEDSILO_CLIENT_CERT
          value: {{ printf "/etc/fedsilo/client/%s" .certKey | quote }}
        - name: FEDSILO_CLIENT_KEY
          value: {{ printf "/etc/fedsilo/client/%s" .keyKey | quote }}
        {{- end }}
        {{- end }}
        {{- if not (kindIs "invalid" .Values.aggregator.longPollSeconds) }}
        - name: FEDSILO_LONG_POLL_SECONDS
          value: {{ .Values.aggregator.longPollSeconds | quote }}
        {{- end }}
        - name: FEDSILO_METRICS_PORT
          value: {{ .Values.metrics.port | quote }}
        - name: FEDSILO_CACHE_DIR
          value: /cache
        - name: FEDSILO_STATE_DIR
          value: /state
        - name: FEDSILO_TORCH_THREADS
          value: {{ .Values.agent.torchThreads | quote }}
        # Nothing is downloaded inside a silo: the model comes from the model volume or cache.
        - name: HF_HUB_OFFLINE
          value: "1"
        - name: TRANSFORMERS_OFFLINE
          value: "1"
        - name: HOME
          value: /tmp
        {{- with .Values.agent.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if gt (int .Values.metrics.port) 0 }}
      ports:
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      {{- $resources := deepCopy (default dict .Values.resources) }}
      {{- if gt (int .Values.gpus) 0 }}
      {{- $limits := default dict $resources.limits }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpus) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: token
          mountPath: /etc/fedsilo/token
          readOnly: true
        - name: data
          mountPath: /data
          readOnly: true
          {{- with .Values.data.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- if .Values.model.existingClaim }}
        - name: model
          mountPath: /models
          readOnly: true
          {{- with .Values.model.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
        {{- if or .Values.aggregator.caBundle.configMap .Values.aggregator.caBundle.secret }}
        - name: ca-bundle
          mountPath: /etc/fedsilo/ca
          readOnly: true
        {{- end }}
        {{- if .Values.aggregator.clientCert.secret }}
        - name: client-cert
          mountPath: /etc/fedsilo/client
          readOnly: true
        {{- end }}
        - name: cache
          mountPath: /cache
        - name: state
          mountPath: /state
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: token
      secret:
        secretName: {{ .Values.token.existingSecret }}
        defaultMode: 0400
        items:
          - key: {{ .Values.token.key }}
            path: token
    - name: data
      persistentVolumeClaim:
        claimName: {{ .Values.data.existingClaim }}
        readOnly: true
    {{- if .Values.model.existingClaim }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ .Values.model.existingClaim }}
        readOnly: true
    {{- end }}
    {{- if .Values.aggregator.caBundle.configMap }}
    - name: ca-bundle
      configMap:
        name: {{ .Values.aggregator.caBundle.configMap }}
        items:
          - key: {{ .Values.aggregator.caBundle.key }}
            path: {{ .Values.aggregator.caBundle.key }}
    {{- else if .Values.aggregator.caBundle.secret }}
    - name: ca-bundle
      secret:
        secretName: {{ .Values.aggregator.caBundle.secret }}
        items:
          - key: {{ .Values.aggregator.caBundle.key }}
            path: {{ .Values.aggregator.caBundle.key }}
    {{- end }}
    {{- with .Values.aggregator.clientCert }}
    {{- if .secret }}
    - name: client-cert
      secret:
        secretName: {{ .secret }}
        defaultMode: 0400
        items:
          - key: {{ .certKey }}
            path: {{ .certKey }}
          - key: {{ .keyKey }}
            path: {{ .keyKey }}
    {{- end }}
    {{- end }}
    - name: cache
      {{- if .Values.cache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.cache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.cache.sizeLimit }}
      {{- end }}
    - name: state
      {{- if .Values.state.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.state.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.state.sizeLimit }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Name of the agent Job: the full name plus a hash of its pod template. A Job's pod
     template is immutable, so an upgrade that changes it (a new image, new values) makes a
     new Job, and Helm deletes the old one; an upgrade that does not keeps the same Job. */}}
{{- define "fedsilo-silo.jobName" -}}
{{- $hash := include "fedsilo-silo.podTemplate" . | sha256sum | trunc 8 -}}
{{- printf "%s-%s" (include "fedsilo-silo.fullname" . | trunc 54 | trimSuffix "-") $hash -}}
{{- end -}}
