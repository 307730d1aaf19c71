{{/*
Schema migrations as pre-install / pre-upgrade hooks. Hooks run before the release's ordinary
objects exist, so the Job brings its own ConfigMap and ServiceAccount (hooks too, weight -10),
all deleted once the Job has succeeded. A failed Job stays for `kubectl logs`.
*/}}
{{- define "lodestar.migrationHookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{- define "lodestar.migrationName" -}}
{{- printf "%s-migrate" (include "lodestar.serviceName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lodestar.migration" -}}
{{- if include "lodestar.migrationsAsHook" . }}
{{- $root := .root }}
{{- $m := $root.Values.migrations }}
{{- $component := printf "%s-migrate" .name }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "lodestar.migrationName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" $root "component" $component) | nindent 4 }}
  annotations:
    {{- include "lodestar.migrationHookAnnotations" (dict "weight" -10) | nindent 4 }}
automountServiceAccountToken: false
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "lodestar.migrationName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" $root "component" $component) | nindent 4 }}
  annotations:
    {{- include "lodestar.migrationHookAnnotations" (dict "weight" -10) | nindent 4 }}
{{ include "lodestar.configmap.data" . }}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "lodestar.migrationName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" $root "component" $component) | nindent 4 }}
  annotations:
    {{- include "lodestar.migrationHookAnnotations" (dict "weight" 0) | nindent 4 }}
spec:
  backoffLimit: {{ $m.backoffLimit }}
  activeDeadlineSeconds: {{ $m.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $m.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "lodestar.labels" (dict "root" $root "component" $component) | nindent 8 }}
      annotations:
        checksum/config: {{ include "lodestar.configmap.data" . | sha256sum }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "lodestar.migrationName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- with include "lodestar.imagePullSecrets" $root }}
      imagePullSecrets:
        {{- . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "lodestar.podSecurityContext" . | nindent 8 }}
      {{- with .svc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .svc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - {{ include "lodestar.migrateContainer" . | indent 10 | trim }}
      volumes:
        {{- include "lodestar.configVolume" (dict "root" $root "svc" .svc "name" .name "key" .key "configMap" (include "lodestar.migrationName" .) "serve" false) | nindent 8 }}
{{- end }}
{{- end }}
