{{/*
Names and labels, defined once. Stage-level helpers take (dict "root" $ "stage" $name).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
"<release>-<chart>" (or just the release name when it already contains the chart name),
or fullnameOverride. Truncated to leave room for the "-<stage>" suffix within 63 characters.
*/}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<stage>": the name of a stage's Deployment, Service and ConfigMap. */}}
{{- define "sluice.stageFullname" -}}
{{- printf "%s-%s" (include "sluice.fullname" .root) .stage | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "sluice-0.1.0" for the helm.sh/chart label. */}}
{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the one matchLabels set. Deployment selectors, pod labels and Service
selectors all come from here, so they cannot drift apart. Takes (dict "root" $ "stage" name);
without "stage" it selects every stage of the release.
*/}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .stage }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* Common labels: selector labels plus chart and version metadata. */}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" .root }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end }}

{{/* "<repository>:<tag>" of a stage; the tag defaults to the chart's appVersion. */}}
{{- define "sluice.image" -}}
{{- $image := .spec.image }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
The stage's config file: the user's `config` with the chart-owned keys laid over it (broker,
topics, group, ports: the probes and Service depend on the ports).
*/}}
{{- define "sluice.stageConfig" -}}
{{- $spec := .spec }}
{{- $owned := dict
      "kafka" (dict
        "bootstrap_servers" .root.Values.kafka.bootstrapServers
        "input_topic" $spec.topics.input
        "output_topic" $spec.topics.output
        "dlq_topic" (default "" $spec.topics.dlq)
        "group_id" $spec.group)
      "grpc" (dict "port" 50051)
      "metrics" (dict "port" 9100 "enabled" true) }}
{{- mustMergeOverwrite (deepCopy (default (dict) $spec.config)) $owned | toYaml }}
{{- end }}
