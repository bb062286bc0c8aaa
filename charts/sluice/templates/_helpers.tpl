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
{{- $config := mustMergeOverwrite (deepCopy (default (dict) $spec.config)) $owned }}
{{- $s3path := include "sluice.s3ConfigPath" .stage }}
{{- $s3 := .root.Values.s3 }}
{{- if and $s3path $s3.endpoint }}
{{- /* Walk (creating) the stage's object-store block and set the chart-owned keys. */}}
{{- $node := $config }}
{{- range $key := splitList "." $s3path }}
{{- if not (kindIs "map" (get $node $key)) }}
{{- $_ := set $node $key (dict) }}
{{- end }}
{{- $node = get $node $key }}
{{- end }}
{{- $_ := set $node "endpoint" $s3.endpoint }}
{{- $_ := set $node "secure" $s3.secure }}
{{- $_ := set $node "region" $s3.region }}
{{- with $s3.bucket }}
{{- $_ := set $node "bucket" . }}
{{- end }}
{{- end }}
{{- $config | toYaml }}
{{- end }}

{{/*
"true" when the stage is density in two_pass_sample mode (services/density/settings.py's
default mode): it then needs a build Job (density-build-job.yaml) for config.sketch.version.
*/}}
{{- define "sluice.densityTwoPass" -}}
{{- if and (eq .stage "density") (eq (default "two_pass_sample" (default (dict) .spec.config).mode) "two_pass_sample") }}true{{ end }}
{{- end }}

{{/*
Fail early on stage values that render but cannot start, or cannot be scaled right:
density's pass 1 as a Deployment; two-pass sampling without an object store or a pinned
sketch version (the build Job, the pass-2 group and the operator all need the version); an
autoscaled stage whose env overrides a setting that decides its consumer group (the
SluiceScaler carries the config, not the env).
*/}}
{{- define "sluice.checkStage" -}}
{{- $stage := .stage }}
{{- if .spec.autoscaling.enabled }}
{{- if gt (int .spec.autoscaling.minReplicas) (int .spec.autoscaling.maxReplicas) }}
{{- fail (printf "stages.%s.autoscaling: minReplicas must not exceed maxReplicas" $stage) }}
{{- end }}
{{- /* The operator names the group from config only: env must not change it under it. */}}
{{- $prefix := include "sluice.envPrefix" $stage }}
{{- range .spec.env }}
{{- $rest := trimPrefix $prefix .name }}
{{- if and (ne $rest .name) (or (hasPrefix "KAFKA__" $rest) (and (eq $stage "density") (or (eq $rest "MODE") (hasPrefix "SKETCH__" $rest)))) }}
{{- fail (printf "stages.%s.env: %s decides the consumer group the SluiceScaler reads; set it in stages.%s.config (or topics/group) instead" $stage .name $stage) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq .stage "density" }}
{{- $config := default (dict) .spec.config }}
{{- if eq (default "" $config.mode) "two_pass_build" }}
{{- fail "stages.density.config.mode: two_pass_build is pass 1, which the chart runs as the sketch build Job; set two_pass_sample (or online)" }}
{{- end }}
{{- if include "sluice.densityTwoPass" . }}
{{- if not .root.Values.s3.endpoint }}
{{- fail "stages.density: mode two_pass_sample needs the object store (s3.endpoint); or set stages.density.config.mode: online" }}
{{- end }}
{{- if not (default (dict) $config.sketch).version }}
{{- fail "stages.density: mode two_pass_sample needs config.sketch.version (the sketch version the build Job builds and pass 2 samples against)" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The consumer group a stage's workers commit, for people (NOTES, alert texts): the stage's
group, or for two-pass density pass 2's "<group>.sample.<sketch>.v<N>". The operator does not
use this: it asks the registry (services/runtime/registry.py consumer_group); a test keeps
the two equal.
*/}}
{{- define "sluice.committedGroup" -}}
{{- if include "sluice.densityTwoPass" . }}
{{- $sketch := default (dict) .spec.config.sketch }}
{{- printf "%s.sample.%s.v%d" .spec.group (default "default" $sketch.name) (int $sketch.version) }}
{{- else }}
{{- .spec.group }}
{{- end }}
{{- end }}

{{/*
The build settings of a two-pass density stage: its config with mode two_pass_build.
*/}}
{{- define "sluice.densityBuildConfig" -}}
{{- $config := include "sluice.stageConfig" . | fromYaml }}
{{- $_ := set $config "mode" "two_pass_build" }}
{{- $config | toYaml }}
{{- end }}

{{/*
Where a stage's settings keep their S3 block ("a.b", dotted), or "" for stages without one.
The block has endpoint, bucket, secure, region, access_key and secret_key fields
(services/density/settings.py StoreSettings, services/distill/settings.py S3Settings).
*/}}
{{- define "sluice.s3ConfigPath" -}}
{{- get (dict "density" "store" "distill" "topk_store.s3") . }}
{{- end }}

{{/* "SLUICE_<STAGE>_": the env prefix of a stage's settings class. */}}
{{- define "sluice.envPrefix" -}}
{{- printf "SLUICE_%s_" (upper .) }}
{{- end }}

{{/*
Object-store credentials of a stage as EnvVar entries, all by reference to s3.existingSecret:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the convention S3 clients read) and the stage's own
settings fields (e.g. SLUICE_DISTILL_TOPK_STORE__S3__ACCESS_KEY), which distill's client
needs. Empty for stages without an object store, or without endpoint or Secret.
*/}}
{{- define "sluice.s3Env" -}}
{{- $s3 := .root.Values.s3 }}
{{- $path := include "sluice.s3ConfigPath" .stage }}
{{- if and $path $s3.endpoint $s3.existingSecret }}
{{- $field := printf "%s%s__" (include "sluice.envPrefix" .stage) ($path | replace "." "__" | upper) }}
{{- $pairs := list
      (list "AWS_ACCESS_KEY_ID" $s3.existingSecretKeys.accessKeyId)
      (list "AWS_SECRET_ACCESS_KEY" $s3.existingSecretKeys.secretAccessKey)
      (list (printf "%sACCESS_KEY" $field) $s3.existingSecretKeys.accessKeyId)
      (list (printf "%sSECRET_KEY" $field) $s3.existingSecretKeys.secretAccessKey) }}
{{- range $pairs }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $s3.existingSecret }}
      key: {{ index . 1 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What every container running a stage's service shares (the Deployment's and the density
build Job's): image, environment, resources (GPUs added as gpuResource limits), security
context and the mounts of the read-only root filesystem's writable places.
*/}}
{{- define "sluice.stageContainer" -}}
{{- $spec := .spec }}
{{- $resources := deepCopy (default (dict) $spec.resources) }}
{{- if gt (int $spec.gpus) 0 }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $limits $spec.gpuResource (int $spec.gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
image: {{ include "sluice.image" . | quote }}
imagePullPolicy: {{ $spec.image.pullPolicy }}
env:
  - name: SLUICE_SERVICE
    value: {{ .stage | quote }}
  # The writable volumes below: the root filesystem is read-only.
  - name: HOME
    value: /home/sluice
  - name: XDG_CACHE_HOME
    value: /home/sluice/.cache
  {{- with include "sluice.s3Env" . | trim }}
  # Object-store credentials, by reference to s3.existingSecret.
  {{- . | nindent 2 }}
  {{- end }}
  {{- with $spec.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
volumeMounts:
  - name: config
    mountPath: /etc/sluice
    readOnly: true
  - name: tmp
    mountPath: /tmp
  - name: home
    mountPath: /home/sluice
  - name: model-cache
    mountPath: /home/sluice/.cache
  {{- if $spec.shmSizeLimit }}
  - name: dshm
    mountPath: /dev/shm
  {{- end }}
{{- end }}

{{/*
The rest of a stage pod's spec after its containers: the volumes sluice.stageContainer
mounts, and the stage's scheduling.
*/}}
{{- define "sluice.stagePodTail" -}}
{{- $spec := .spec }}
volumes:
  - name: config
    configMap:
      name: {{ include "sluice.stageFullname" . }}
  - name: tmp
    emptyDir:
      sizeLimit: 1Gi
  - name: home
    emptyDir:
      sizeLimit: 256Mi
  - name: model-cache
    {{- if $spec.modelCache.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $spec.modelCache.existingClaim }}
    {{- else }}
    emptyDir:
      sizeLimit: {{ $spec.modelCache.sizeLimit }}
    {{- end }}
  {{- if $spec.shmSizeLimit }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $spec.shmSizeLimit }}
  {{- end }}
{{- with $spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The dead-letter topic of a stage spec: topics.dlq or "<input>.dlq". */}}
{{- define "sluice.dlqTopic" -}}
{{- default (printf "%s.dlq" .topics.input) .topics.dlq }}
{{- end }}

{{/*
Every topic the enabled stages read or write (input, output, dead-letter, config
dropped_topic) plus topics.extra: sorted, without repeats, one per line.
*/}}
{{- define "sluice.topicList" -}}
{{- $topics := list }}
{{- range $stage, $spec := .Values.stages }}
{{- if $spec.enabled }}
{{- $topics = concat $topics (list $spec.topics.input $spec.topics.output (include "sluice.dlqTopic" $spec)) }}
{{- with (default (dict) $spec.config).dropped_topic }}
{{- $topics = append $topics . }}
{{- end }}
{{- end }}
{{- end }}
{{- $topics = concat $topics .Values.topics.extra }}
{{- $topics | uniq | sortAlpha | join "\n" }}
{{- end }}

{{/* The ports of kafka.bootstrapServers, sorted, without repeats, one per line. */}}
{{- define "sluice.kafkaPorts" -}}
{{- $ports := list }}
{{- range splitList "," .Values.kafka.bootstrapServers }}
{{- $ports = append $ports (regexFind "[0-9]+$" .) }}
{{- end }}
{{- $ports | uniq | sortAlpha | join "\n" }}
{{- end }}

{{/*
PromQL label matchers of a component's series: the scrape job the ServiceMonitor gives its
targets (the Service name) in the release namespace. Takes (dict "root" $ "stage" $name).
*/}}
{{- define "sluice.promSelector" -}}
namespace="{{ .root.Release.Namespace }}", job="{{ include "sluice.stageFullname" . }}"
{{- end }}

{{/* The titles of the shipped dashboards (files/dashboards/*.json), quoted, comma-separated. */}}
{{- define "sluice.dashboardTitles" -}}
{{- $titles := list }}
{{- range $path, $_ := .Files.Glob "files/dashboards/*.json" }}
{{- $titles = append $titles (($.Files.Get $path | fromJson).title | default $path | quote) }}
{{- end }}
{{- $titles | join ", " }}
{{- end }}
