{{- define "lodestar.deployment" -}}
{{- $root := .root }}
{{- $svc := .svc }}
{{- $ports := $root.Values.global.ports }}
{{- $probePort := include "lodestar.probePort" $root | int }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "lodestar.serviceName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "lodestar.labels" (dict "root" $root "component" .name) | nindent 4 }}
  {{- with $svc.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if not $svc.autoscaling.enabled }}
  replicas: {{ $svc.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "lodestar.componentSelector" (dict "root" $root "component" .name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "lodestar.labels" (dict "root" $root "component" .name) | nindent 8 }}
        {{- with $svc.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "lodestar.configmap.data" . | sha256sum }}
        {{- if $root.Values.global.credentials.generate }}
        checksum/credentials: {{ include "lodestar.generatedCredentials" $root | sha256sum }}
        {{- end }}
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "lodestar.serviceName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $svc.terminationGracePeriodSeconds }}
      {{- with include "lodestar.imagePullSecrets" $root }}
      imagePullSecrets:
        {{- . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "lodestar.podSecurityContext" . | nindent 8 }}
      {{- with $svc.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $svc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if include "lodestar.migrationsAsInit" . }}
      initContainers:
        - {{ include "lodestar.migrateContainer" . | indent 10 | trim }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "lodestar.image" . }}
          imagePullPolicy: {{ $root.Values.global.image.pullPolicy }}
          args: ["serve"]
          ports:
            - name: grpc
              containerPort: {{ $ports.grpc }}
              protocol: TCP
            {{- if $root.Values.global.tls.enabled }}
            - name: health
              containerPort: {{ $ports.health }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ $ports.metrics }}
              protocol: TCP
          env:
            {{- include "lodestar.env" . | nindent 12 }}
            {{- include "lodestar.serveEnv" . | nindent 12 }}
            {{- with $svc.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with $svc.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          startupProbe:
            grpc:
              port: {{ $probePort }}
              service: readiness
            {{- toYaml $svc.probes.startup | nindent 12 }}
          livenessProbe:
            grpc:
              port: {{ $probePort }}
              service: liveness
            {{- toYaml $svc.probes.liveness | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ $probePort }}
              service: readiness
            {{- toYaml $svc.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- include "lodestar.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "lodestar.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "lodestar.configVolume" (dict "root" $root "svc" $svc "name" .name "key" .key "configMap" (include "lodestar.serviceName" .) "serve" true) | nindent 8 }}
{{- end }}
