{{/* Egress rule to DNS. */}}
{{- define "lodestar.np.dnsEgress" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.global.networkPolicy.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.global.networkPolicy.dns.podSelector | nindent 8 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/* Egress rule to PostgreSQL: the dev StatefulSet, the configured peers, or the port anywhere. */}}
{{- define "lodestar.np.postgresEgress" -}}
{{- $np := .Values.global.networkPolicy -}}
- ports:
    - port: {{ $np.postgres.port }}
      protocol: TCP
  {{- if .Values.postgresql.enabled }}
  to:
    - podSelector:
        matchLabels:
          {{- include "lodestar.componentSelector" (dict "root" . "component" "postgresql") | nindent 10 }}
  {{- else if $np.postgres.to }}
  to:
    {{- toYaml $np.postgres.to | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Pod selector peer of a component of this release; pass (dict "root" $ "component" name). */}}
{{- define "lodestar.np.peer" -}}
- podSelector:
    matchLabels:
      {{- include "lodestar.componentSelector" . | nindent 6 }}
{{- end }}

{{/* The gRPC ports a client may use (grpc, plus health under TLS). */}}
{{- define "lodestar.np.grpcPorts" -}}
- port: {{ .Values.global.ports.grpc }}
  protocol: TCP
{{- if .Values.global.tls.enabled }}
- port: {{ .Values.global.ports.health }}
  protocol: TCP
{{- end }}
{{- end }}

{{/*
Allow-list of one service (the deny-all policy covers everything else):
  ingress: core <-> modules on gRPC, health-monitor -> every service, the helm test pod,
           the service's clients on gRPC, Prometheus on the metrics port, extraIngress;
  egress:  DNS, PostgreSQL, core <-> modules, health-monitor -> every service and the providers,
           the OpenTelemetry collector when configured, extraEgress.
*/}}
{{- define "lodestar.networkpolicy" -}}
{{- $root := .root }}
{{- $g := $root.Values.global }}
{{- if $g.networkPolicy.enabled }}
{{- $enabled := (include "lodestar.enabledNames" $root | fromYaml).names }}
{{- $modules := without $enabled "core" }}
{{- $isCore := eq .name "core" }}
{{- $clients := list }}
{{- if $isCore }}{{ $clients = $modules }}{{ else if $root.Values.core.enabled }}{{ $clients = list "core" }}{{ end }}
{{- if and (has "health-monitor" $enabled) (ne .name "health-monitor") (not (has "health-monitor" $clients)) }}
{{- $clients = append $clients "health-monitor" }}
{{- end }}
{{- if $root.Values.tests.enabled }}{{ $clients = append $clients "helm-test" }}{{ end }}
{{- $servers := list }}
{{- if eq .name "health-monitor" }}{{ $servers = without $enabled "health-monitor" }}
{{- else if $isCore }}{{ $servers = $modules }}
{{- else if $root.Values.core.enabled }}{{ $servers = list "core" }}{{ end }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "lodestar.serviceName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" $root "component" .name) | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "lodestar.componentSelector" (dict "root" $root "component" .name) | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  ingress:
    {{- if $clients }}
    - from:
        {{- range $clients }}
        {{- include "lodestar.np.peer" (dict "root" $root "component" .) | nindent 8 }}
        {{- end }}
      ports:
        {{- include "lodestar.np.grpcPorts" $root | nindent 8 }}
    {{- end }}
    - from:
        {{- toYaml $g.networkPolicy.prometheus | nindent 8 }}
      ports:
        - port: {{ $g.ports.metrics }}
          protocol: TCP
    {{- with .svc.networkPolicy.clients }}
    - from:
        {{- toYaml . | nindent 8 }}
      ports:
        {{- include "lodestar.np.grpcPorts" $root | nindent 8 }}
    {{- end }}
    {{- with .svc.networkPolicy.extraIngress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  egress:
    {{- include "lodestar.np.dnsEgress" $root | nindent 4 }}
    {{- include "lodestar.np.postgresEgress" $root | nindent 4 }}
    {{- if $servers }}
    - to:
        {{- range $servers }}
        {{- include "lodestar.np.peer" (dict "root" $root "component" .) | nindent 8 }}
        {{- end }}
      ports:
        {{- include "lodestar.np.grpcPorts" $root | nindent 8 }}
    {{- end }}
    {{- if and (ne .name "core") (not $root.Values.core.enabled) $g.coreEndpoint }}
    {{- /* core lives elsewhere: allow its gRPC port to any destination */}}
    - ports:
        - port: {{ regexFind "[0-9]+$" $g.coreEndpoint | default $g.ports.grpc }}
          protocol: TCP
    {{- end }}
    {{- if eq .name "health-monitor" }}
    {{- with .svc.networkPolicy.providers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- end }}
    {{- if $g.otel.endpoint }}
    - ports:
        - port: {{ $g.networkPolicy.otel.port }}
          protocol: TCP
      {{- with $g.networkPolicy.otel.to }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
    {{- with .svc.networkPolicy.extraEgress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- if include "lodestar.migrationsAsHook" . }}
---
# The migration Job: DNS and PostgreSQL only.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "lodestar.migrationName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" $root "component" (printf "%s-migrate" .name)) | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "lodestar.componentSelector" (dict "root" $root "component" (printf "%s-migrate" .name)) | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  egress:
    {{- include "lodestar.np.dnsEgress" $root | nindent 4 }}
    {{- include "lodestar.np.postgresEgress" $root | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}
