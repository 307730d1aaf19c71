{{- define "lodestar.serviceaccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "lodestar.serviceName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" .root "component" .name) | nindent 4 }}
  {{- with .svc.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end }}
