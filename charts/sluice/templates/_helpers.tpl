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
        "group_id" $spec.group
        "processing_guarantee" .root.Values.kafka.processingGuarantee)
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
Where a stage's settings keep their S3 block ("a.b", dotted), or "" for stages without one:
the registry's object_store (services/runtime/registry.py; tests/unit/runtime/test_registry.py
keeps the two equal). The block is an ObjectStoreSettings (services/runtime/objectstore.py:
endpoint, bucket, secure, region, access_key, secret_key). Scoring's is where an s3://
classifier artifact is read from (its bucket comes from the artifact's URI).
*/}}
{{- define "sluice.s3ConfigPath" -}}
{{- get (dict "scoring" "classifier.store" "density" "store" "distill" "topk_store.s3" "sink" "store") . }}
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
  {{- $prefix := include "sluice.envPrefix" .stage }}
  {{- with include "sluice.kafkaSecurityEnv" (dict "root" .root "prefix" (printf "%sKAFKA__SECURITY__" $prefix)) | trim }}
  # Kafka TLS/SASL (kafka.security): files from the mounted Secrets.
  {{- . | nindent 2 }}
  {{- end }}
  # The pod's name is the worker's stable identity (static group membership, transactional
  # id): a container restarted in this pod fences its killed predecessor at once.
  - name: {{ $prefix }}KAFKA__INSTANCE_ID
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  {{- if .grpc }}
  {{- with include "sluice.grpcSecurityEnv" (dict "root" .root "prefix" (printf "%sGRPC__" $prefix)) | trim }}
  # gRPC TLS and token (grpc.*): files from the mounted Secrets.
  {{- . | nindent 2 }}
  {{- end }}
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
  {{- include "sluice.secretMounts" . | nindent 2 }}
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
  {{- include "sluice.secretVolumes" . | nindent 2 }}
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
The dropped-samples topic of a stage spec, as ServiceSettings.dropped_topic_name has it:
config.dropped_topic, "" = "<output>.dropped", "none" = no topic ("").
*/}}
{{- define "sluice.droppedTopic" -}}
{{- $dropped := toString (default "" (default (dict) .config).dropped_topic) }}
{{- if ne (lower $dropped) "none" }}
{{- default (printf "%s.dropped" .topics.output) $dropped }}
{{- end }}
{{- end }}

{{/*
Every topic the enabled stages read or write (input, output, dead-letter, dropped samples)
plus topics.extra: sorted, without repeats, one per line.
*/}}
{{- define "sluice.topicList" -}}
{{- $topics := list }}
{{- range $stage, $spec := .Values.stages }}
{{- if $spec.enabled }}
{{- $topics = concat $topics (list $spec.topics.input $spec.topics.output (include "sluice.dlqTopic" $spec)) }}
{{- with include "sluice.droppedTopic" $spec }}
{{- $topics = append $topics . }}
{{- end }}
{{- end }}
{{- end }}
{{- $topics = concat $topics .Values.topics.extra }}
{{- $topics | compact | uniq | sortAlpha | join "\n" }}
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

{{/*
Transport security, by reference to Secrets only. Secret files are mounted read-only (group
readable: the pods' fsGroup) at fixed paths, and the settings name the paths:

  /etc/sluice-kafka/ca/ca.crt            kafka.security.caSecret
  /etc/sluice-kafka/client/tls.crt|key   kafka.security.clientCertSecret
  /etc/sluice-kafka/sasl/password        kafka.security.sasl.passwordSecret
  /etc/sluice-grpc/tls/tls.crt|key       grpc.tls.certSecret
  /etc/sluice-grpc/client-ca/ca.crt      grpc.tls.clientCaSecret
  /etc/sluice-grpc/token/token           grpc.authTokenSecret

Each Kafka client container gets the Kafka ones; a stage container serving gRPC (".grpc" in
its context) also the gRPC ones. Values that cannot work fail the render (sluice.checkSecurity).
*/}}

{{/* The files of the Secrets a container mounts: list of (volume, secret, key, path). */}}
{{- define "sluice.secretFiles" -}}
{{- $files := list }}
{{- $sec := .root.Values.kafka.security }}
{{- if has $sec.protocol (list "SSL" "SASL_SSL") }}
{{- with $sec.caSecret.name }}
{{- $files = append $files (list "kafka-ca" . $sec.caSecret.key "/etc/sluice-kafka/ca/ca.crt") }}
{{- end }}
{{- with $sec.clientCertSecret.name }}
{{- $files = append $files (list "kafka-client-cert" . $sec.clientCertSecret.certKey "/etc/sluice-kafka/client/tls.crt") }}
{{- $files = append $files (list "kafka-client-cert" . $sec.clientCertSecret.keyKey "/etc/sluice-kafka/client/tls.key") }}
{{- end }}
{{- end }}
{{- if hasPrefix "SASL_" $sec.protocol }}
{{- $files = append $files (list "kafka-sasl" $sec.sasl.passwordSecret.name $sec.sasl.passwordSecret.key "/etc/sluice-kafka/sasl/password") }}
{{- end }}
{{- if .grpc }}
{{- $g := .root.Values.grpc }}
{{- if $g.tls.enabled }}
{{- $files = append $files (list "grpc-tls" $g.tls.certSecret.name $g.tls.certSecret.certKey "/etc/sluice-grpc/tls/tls.crt") }}
{{- $files = append $files (list "grpc-tls" $g.tls.certSecret.name $g.tls.certSecret.keyKey "/etc/sluice-grpc/tls/tls.key") }}
{{- with $g.tls.clientCaSecret.name }}
{{- $files = append $files (list "grpc-client-ca" . $g.tls.clientCaSecret.key "/etc/sluice-grpc/client-ca/ca.crt") }}
{{- end }}
{{- end }}
{{- with $g.authTokenSecret.name }}
{{- $files = append $files (list "grpc-token" . $g.authTokenSecret.key "/etc/sluice-grpc/token/token") }}
{{- end }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* volumeMounts entries for sluice.secretFiles: one directory per volume. */}}
{{- define "sluice.secretMounts" -}}
{{- $seen := dict }}
{{- range (include "sluice.secretFiles" . | fromJsonArray) }}
{{- $volume := index . 0 }}
{{- if not (hasKey $seen $volume) }}
{{- $_ := set $seen $volume true }}
- name: {{ $volume }}
  mountPath: {{ dir (index . 3) }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* volumes entries for sluice.secretFiles: a Secret volume with only the named keys. */}}
{{- define "sluice.secretVolumes" -}}
{{- $volumes := dict }}
{{- $order := list }}
{{- range (include "sluice.secretFiles" . | fromJsonArray) }}
{{- $volume := index . 0 }}
{{- if not (hasKey $volumes $volume) }}
{{- $_ := set $volumes $volume (dict "secret" (index . 1) "items" (list)) }}
{{- $order = append $order $volume }}
{{- end }}
{{- $v := get $volumes $volume }}
{{- $_ := set $v "items" (append $v.items (dict "key" (index . 2) "path" (base (index . 3)))) }}
{{- end }}
{{- range $order }}
{{- $v := get $volumes . }}
- name: {{ . }}
  secret:
    secretName: {{ $v.secret }}
    defaultMode: 0440
    items:
      {{- toYaml $v.items | nindent 6 }}
{{- end }}
{{- end }}

{{/*
EnvVar entries of kafka.security for a settings block at .prefix (e.g.
"SLUICE_SCORING_KAFKA__SECURITY__"); empty for PLAINTEXT. Paths as in sluice.secretFiles.
*/}}
{{- define "sluice.kafkaSecurityEnv" -}}
{{- $sec := .root.Values.kafka.security }}
{{- if ne $sec.protocol "PLAINTEXT" }}
- name: {{ .prefix }}PROTOCOL
  value: {{ $sec.protocol | quote }}
{{- if has $sec.protocol (list "SSL" "SASL_SSL") }}
- name: {{ .prefix }}CHECK_HOSTNAME
  value: {{ $sec.checkHostname | quote }}
{{- if $sec.caSecret.name }}
- name: {{ .prefix }}CA_FILE
  value: /etc/sluice-kafka/ca/ca.crt
{{- end }}
{{- if $sec.clientCertSecret.name }}
- name: {{ .prefix }}CERT_FILE
  value: /etc/sluice-kafka/client/tls.crt
- name: {{ .prefix }}KEY_FILE
  value: /etc/sluice-kafka/client/tls.key
{{- end }}
{{- end }}
{{- if hasPrefix "SASL_" $sec.protocol }}
- name: {{ .prefix }}SASL_MECHANISM
  value: {{ $sec.sasl.mechanism | quote }}
- name: {{ .prefix }}SASL_USERNAME
  value: {{ $sec.sasl.username | quote }}
- name: {{ .prefix }}SASL_PASSWORD_FILE
  value: /etc/sluice-kafka/sasl/password
{{- end }}
{{- end }}
{{- end }}

{{/*
EnvVar entries of the grpc values for a stage's gRPC settings at .prefix (e.g.
"SLUICE_SCORING_GRPC__"): services/runtime/settings.py GrpcSettings.tls and auth_token_file.
*/}}
{{- define "sluice.grpcSecurityEnv" -}}
{{- $g := .root.Values.grpc }}
{{- if $g.tls.enabled }}
- name: {{ .prefix }}TLS__ENABLED
  value: "true"
- name: {{ .prefix }}TLS__CERT_FILE
  value: /etc/sluice-grpc/tls/tls.crt
- name: {{ .prefix }}TLS__KEY_FILE
  value: /etc/sluice-grpc/tls/tls.key
{{- if $g.tls.clientCaSecret.name }}
- name: {{ .prefix }}TLS__CLIENT_CA_FILE
  value: /etc/sluice-grpc/client-ca/ca.crt
{{- end }}
{{- end }}
{{- if $g.authTokenSecret.name }}
- name: {{ .prefix }}AUTH_TOKEN_FILE
  value: /etc/sluice-grpc/token/token
{{- end }}
{{- end }}

{{/* Fail on security values the services would refuse, before anything is deployed. */}}
{{- define "sluice.checkSecurity" -}}
{{- $sec := .Values.kafka.security }}
{{- $tls := has $sec.protocol (list "SSL" "SASL_SSL") }}
{{- if and (not $tls) (or $sec.caSecret.name $sec.clientCertSecret.name) }}
{{- fail (printf "kafka.security: caSecret/clientCertSecret are set but protocol %s has no TLS (use SSL or SASL_SSL)" $sec.protocol) }}
{{- end }}
{{- if hasPrefix "SASL_" $sec.protocol }}
{{- if not (and $sec.sasl.username $sec.sasl.passwordSecret.name) }}
{{- fail (printf "kafka.security: protocol %s needs sasl.username and sasl.passwordSecret.name" $sec.protocol) }}
{{- end }}
{{- end }}
{{- $g := .Values.grpc.tls }}
{{- if and $g.enabled (not $g.certSecret.name) }}
{{- fail "grpc.tls.enabled needs grpc.tls.certSecret.name (the server certificate and key)" }}
{{- end }}
{{- if and (not $g.enabled) $g.clientCaSecret.name }}
{{- fail "grpc.tls.clientCaSecret is set but grpc.tls.enabled is false: the stages would serve cleartext" }}
{{- end }}
{{- end }}
