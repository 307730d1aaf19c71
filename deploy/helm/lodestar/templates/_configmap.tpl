{{/* ConfigMap of one service: the global file and the module's own file. */}}
{{- define "lodestar.configmap.data" -}}
data:
  lodestar.yaml: |
    {{- toYaml (.root.Values.global.config | default dict) | nindent 4 }}
  {{ printf "%s.yaml" .name }}: |
    {{- toYaml (.svc.config | default dict) | nindent 4 }}
{{- end }}

{{- define "lodestar.configmap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "lodestar.serviceName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" .root "component" .name) | nindent 4 }}
{{ include "lodestar.configmap.data" . }}
{{- end }}
