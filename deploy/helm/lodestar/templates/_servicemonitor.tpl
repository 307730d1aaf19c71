{{- define "lodestar.servicemonitor" -}}
{{- $sm := .root.Values.monitoring.serviceMonitor }}
{{- if $sm.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "lodestar.serviceName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" .root "component" .name) | nindent 4 }}
    {{- with $sm.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "lodestar.componentSelector" (dict "root" .root "component" .name) | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .root.Release.Namespace }}
  endpoints:
    - port: metrics
      path: /metrics
      scheme: http
      interval: {{ $sm.interval }}
      scrapeTimeout: {{ $sm.scrapeTimeout }}
{{- end }}
{{- end }}
