{{/*
Names, labels and the table of services. Every per-service object is rendered by one named
template (lodestar.<kind>) called once per enabled service with a context made by
"lodestar.forEachService": {root, key, name, script, svc}, where svc is the service's values
merged over serviceDefaults ("lodestar.serviceValues").
*/}}

{{- define "lodestar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lodestar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lodestar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The services the chart knows (services.yaml): values key -> name, script, description. */}}
{{- define "lodestar.serviceTable" -}}
{{- .Files.Get "services.yaml" }}
{{- end }}

{{/*
The values of one service: a copy of serviceDefaults with the service's block merged over it
(maps merge key by key, other values replace the default, null removes it).
Pass (dict "root" $ "key" "core" "out" $out); the result is set as $out.svc.
*/}}
{{- define "lodestar.serviceValues" -}}
{{- $svc := deepCopy .root.Values.serviceDefaults }}
{{- $_ := include "lodestar.mergeValues" (dict "dst" $svc "src" (index .root.Values .key)) }}
{{- $_ = set .out "svc" $svc }}
{{- end }}

{{/* Merges the map .src into the map .dst in place (the rules of "lodestar.serviceValues"). */}}
{{- define "lodestar.mergeValues" -}}
{{- $dst := .dst }}
{{- range $k, $v := .src }}
{{- if kindIs "invalid" $v }}
{{- $_ := unset $dst $k }}
{{- else if and (kindIs "map" $v) (kindIs "map" (get $dst $k)) }}
{{- $_ := include "lodestar.mergeValues" (dict "dst" (get $dst $k) "src" $v) }}
{{- else }}
{{- $_ := set $dst $k (deepCopy $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names (module names) of the enabled services, as a YAML list. */}}
{{- define "lodestar.enabledNames" -}}
{{- $names := list }}
{{- range $key, $meta := include "lodestar.serviceTable" . | fromYaml }}
{{- if (index $.Values $key).enabled }}
{{- $names = append $names $meta.name }}
{{- end }}
{{- end }}
{{- toYaml (dict "names" $names) }}
{{- end }}

{{/* Selector labels shared by every object of the release. */}}
{{- define "lodestar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lodestar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object; pass (dict "root" $ "component" "core"). */}}
{{- define "lodestar.labels" -}}
helm.sh/chart: {{ include "lodestar.chart" .root }}
{{ include "lodestar.selectorLabels" .root }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/part-of: lodestar
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.global.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; pass (dict "root" $ "component" "core"). */}}
{{- define "lodestar.componentSelector" -}}
{{ include "lodestar.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Object name of a service: <fullname>-<module name>; pass the service context. */}}
{{- define "lodestar.serviceName" -}}
{{- printf "%s-%s" (include "lodestar.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lodestar.image" -}}
{{- $global := .root.Values.global.image }}
{{- $image := .svc.image }}
{{- $repo := $image.repository }}
{{- if $global.registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" $global.registry) $repo }}{{ end }}
{{- $tag := $image.tag | default $global.tag | default .root.Chart.AppVersion }}
{{- if $image.digest }}
{{- printf "%s:%s@%s" $repo $tag $image.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{- define "lodestar.postgresSecret" -}}
{{- .root.Values.global.postgres.existingSecret | default (printf "%s-postgres" (include "lodestar.fullname" .root)) }}
{{- end }}

{{- define "lodestar.credentialsSecret" -}}
{{- .Values.global.credentials.existingSecret | default (printf "%s-credentials" (include "lodestar.fullname" .)) }}
{{- end }}

{{- define "lodestar.tlsSecret" -}}
{{- .Values.global.tls.existingSecret | default (printf "%s-tls" (include "lodestar.fullname" .)) }}
{{- end }}

{{- define "lodestar.coreEndpoint" -}}
{{- .Values.global.coreEndpoint | default (printf "%s-core:%d" (include "lodestar.fullname" .) (int .Values.global.ports.grpc)) }}
{{- end }}

{{/* The port the kubelet's gRPC probes use: the plaintext health port under TLS. */}}
{{- define "lodestar.probePort" -}}
{{- if .Values.global.tls.enabled }}{{ .Values.global.ports.health }}{{ else }}{{ .Values.global.ports.grpc }}{{ end }}
{{- end }}

{{/* Migrations run as an init container when the dev Postgres is on (hooks run before it exists). */}}
{{- define "lodestar.migrationsAsHook" -}}
{{- if and .root.Values.migrations.enabled .svc.migrations.enabled (not .root.Values.postgresql.enabled) }}true{{ end }}
{{- end }}

{{- define "lodestar.migrationsAsInit" -}}
{{- if and .root.Values.migrations.enabled .svc.migrations.enabled .root.Values.postgresql.enabled }}true{{ end }}
{{- end }}

{{/* Pod-level restricted security context (Pod Security Standards "restricted"). */}}
{{- define "lodestar.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "lodestar.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The environment of a service container (serve and migrate); pass the service context. */}}
{{- define "lodestar.env" -}}
{{- $root := .root }}
{{- $g := $root.Values.global -}}
- name: LODESTAR_CONFIG_DIR
  value: /etc/lodestar
- name: LODESTAR_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .svc.database.existingSecret | default (include "lodestar.postgresSecret" .) }}
      key: {{ .svc.database.urlKey | default $g.postgres.urlKey }}
- name: LODESTAR_DATABASE__SCHEMA_NAME
  value: {{ .svc.database.schemaName | quote }}
- name: LODESTAR_LOG_FORMAT
  value: json
- name: LODESTAR_SPOOL_DIR
  value: /tmp/spool
- name: TMPDIR
  value: /tmp
{{- end }}

{{/* Extra environment of the server container. */}}
{{- define "lodestar.serveEnv" -}}
{{- $root := .root }}
{{- $g := $root.Values.global -}}
- name: LODESTAR_HOST
  value: 0.0.0.0
- name: LODESTAR_PORT
  value: {{ $g.ports.grpc | quote }}
- name: LODESTAR_METRICS_HOST
  value: 0.0.0.0
- name: LODESTAR_METRICS_PORT
  value: {{ $g.ports.metrics | quote }}
{{- if ne .key "core" }}
- name: LODESTAR_CORE_ENDPOINT
  value: {{ include "lodestar.coreEndpoint" $root | quote }}
{{- end }}
- name: LODESTAR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "lodestar.credentialsSecret" $root }}
      key: {{ printf "%s-token" .name }}
      {{- if eq .key "core" }}
      optional: true
      {{- end }}
- name: LODESTAR_CREDENTIALS_FILE
  value: /etc/lodestar/credentials/credentials.yaml
- name: LODESTAR_SHUTDOWN_GRACE_SECONDS
  value: {{ .svc.shutdownGraceSeconds | quote }}
- name: LODESTAR_TLS__ENABLED
  value: {{ $g.tls.enabled | quote }}
{{- if $g.tls.enabled }}
- name: LODESTAR_TLS__CERT_FILE
  value: /etc/lodestar/tls/tls.crt
- name: LODESTAR_TLS__KEY_FILE
  value: /etc/lodestar/tls/tls.key
{{- if $g.tls.mutual }}
- name: LODESTAR_TLS__CLIENT_CA_FILE
  value: /etc/lodestar/tls/ca.crt
{{- end }}
- name: LODESTAR_HEALTH_PORT
  value: {{ $g.ports.health | quote }}
{{- end }}
{{- if $g.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $g.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $g.otel.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "lodestar-%s" .name | quote }}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- $attrs := list "k8s.pod.name=$(K8S_POD_NAME)" "k8s.namespace.name=$(K8S_NAMESPACE)" (printf "service.namespace=%s" $root.Release.Namespace) }}
{{- range $k, $v := $g.otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}

{{/*
Projected config volume: /etc/lodestar/lodestar.yaml, modules/<name>.yaml, credentials/ and tls/.
One volume, so nothing is mounted inside a read-only ConfigMap mount. Pass the service context
plus "configMap" (its name) and "serve" (true for the server, false for migrations).
*/}}
{{- define "lodestar.configVolume" -}}
- name: config
  projected:
    defaultMode: 0440
    sources:
      - configMap:
          name: {{ .configMap }}
          items:
            - key: lodestar.yaml
              path: lodestar.yaml
            - key: {{ printf "%s.yaml" .name }}
              path: {{ printf "modules/%s.yaml" .name }}
      {{- if .serve }}
      - secret:
          name: {{ include "lodestar.credentialsSecret" .root }}
          items:
            - key: credentials.yaml
              path: credentials/credentials.yaml
      {{- if .root.Values.global.tls.enabled }}
      - secret:
          name: {{ include "lodestar.tlsSecret" .root }}
          items:
            - key: tls.crt
              path: tls/tls.crt
            - key: tls.key
              path: tls/tls.key
      - secret:
          name: {{ include "lodestar.tlsSecret" .root }}
          optional: {{ not .root.Values.global.tls.mutual }}
          items:
            - key: ca.crt
              path: tls/ca.crt
      {{- end }}
      {{- end }}
- name: tmp
  emptyDir:
    {{- with .svc.tmpDir.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .svc.tmpDir.sizeLimit }}
{{- end }}

{{- define "lodestar.volumeMounts" -}}
- name: config
  mountPath: /etc/lodestar
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The migrate container (hook Job or init container); pass the service context. */}}
{{- define "lodestar.migrateContainer" -}}
name: migrate
image: {{ include "lodestar.image" . }}
imagePullPolicy: {{ .root.Values.global.image.pullPolicy }}
args: ["migrate"]
env:
  {{- include "lodestar.env" . | nindent 2 }}
volumeMounts:
  {{- include "lodestar.volumeMounts" . | nindent 2 }}
resources:
  {{- toYaml .root.Values.migrations.resources | nindent 2 }}
securityContext:
  {{- include "lodestar.containerSecurityContext" . | nindent 2 }}
{{- end }}

{{- define "lodestar.imagePullSecrets" -}}
{{- range .Values.global.image.pullSecrets }}
- name: {{ . }}
{{- end }}
{{- end }}

{{/* Checks that fail rendering with a message. */}}
{{- define "lodestar.validate" -}}
{{- range $key, $meta := include "lodestar.serviceTable" . | fromYaml }}
{{- if (index $.Values $key).enabled }}
{{- $out := dict }}
{{- $_ := include "lodestar.serviceValues" (dict "root" $ "key" $key "out" $out) }}
{{- $svc := $out.svc }}
{{- if le (float64 $svc.terminationGracePeriodSeconds) (float64 $svc.shutdownGraceSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must be larger than %s.shutdownGraceSeconds (%v)" $key $svc.terminationGracePeriodSeconds $key $svc.shutdownGraceSeconds) }}
{{- end }}
{{- if and $svc.autoscaling.enabled (gt (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%v) exceeds maxReplicas (%v)" $key $svc.autoscaling.minReplicas $svc.autoscaling.maxReplicas) }}
{{- end }}
{{- if and $svc.autoscaling.enabled (not $svc.autoscaling.targetCPUUtilizationPercentage) (not $svc.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail (printf "%s.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" $key) }}
{{- end }}
{{- $pdb := $svc.podDisruptionBudget }}
{{- if and $pdb.enabled (eq (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail (printf "%s.podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (the other null)" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not .Values.core.enabled) (not .Values.global.coreEndpoint) }}
{{- range $key, $meta := include "lodestar.serviceTable" . | fromYaml }}
{{- if and (ne $key "core") (index $.Values $key).enabled }}
{{- fail (printf "%s is enabled but core is not: enable core or set global.coreEndpoint" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Render the named template .template once per enabled service, as separate YAML documents.
Usage: {{ include "lodestar.forEachService" (dict "root" $ "template" "lodestar.deployment") }}
*/}}
{{- define "lodestar.forEachService" -}}
{{- $root := .root }}
{{- $template := .template }}
{{- range $key, $meta := include "lodestar.serviceTable" $root | fromYaml }}
{{- if (index $root.Values $key).enabled }}
{{- $out := dict }}
{{- $_ := include "lodestar.serviceValues" (dict "root" $root "key" $key "out" $out) }}
{{- $ctx := dict "root" $root "key" $key "name" $meta.name "script" $meta.script "svc" $out.svc }}
{{- $doc := include $template $ctx }}
{{- if trim $doc }}
---
{{ $doc }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
