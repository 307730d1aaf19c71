{{- define "lodestar.service" -}}
{{- $ports := .root.Values.global.ports }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "lodestar.serviceName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" .root "component" .name) | nindent 4 }}
  {{- with .svc.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .svc.service.type }}
  selector:
    {{- include "lodestar.componentSelector" (dict "root" .root "component" .name) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $ports.grpc }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if .root.Values.global.tls.enabled }}
    - name: health
      port: {{ $ports.health }}
      targetPort: health
      protocol: TCP
      appProtocol: grpc
    {{- end }}
    - name: metrics
      port: {{ $ports.metrics }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}
