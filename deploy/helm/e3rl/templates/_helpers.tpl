{{/*
Names, labels and the pieces the server and trainer pod specs share.

Objects and the names other templates (monitoring included) can rely on:
  e3rl.fullname          StatefulSet and client Service (port "http": API and /metrics)
  e3rl.headlessName      headless Service (ports "http", "admin"; "trainer-metrics" with a
                         sidecar trainer)
  e3rl.trainerName       trainer Deployment, PVC and Service (port "metrics")
  e3rl.serverSelectorLabels / e3rl.trainerSelectorLabels   pod selectors
*/}}

{{/* The full name: 52 characters at most, so that a StatefulSet pod's
controller-revision-hash label (name + 11) fits Kubernetes' 63. */}}
{{- define "e3rl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "e3rl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "e3rl.headlessName" -}}
{{- printf "%s-headless" (include "e3rl.fullname" .) -}}
{{- end -}}

{{- define "e3rl.trainerName" -}}
{{- printf "%s-trainer" (include "e3rl.fullname" .) -}}
{{- end -}}

{{- define "e3rl.secretName" -}}
{{- .Values.auth.existingSecret.name | default (printf "%s-auth" (include "e3rl.fullname" .)) -}}
{{- end -}}

{{- define "e3rl.adminKeyKey" -}}
{{- if .Values.auth.existingSecret.name -}}{{ .Values.auth.existingSecret.adminKeyKey }}{{- else -}}admin-key{{- end -}}
{{- end -}}

{{/* The Secret key of the API key, or "" when there is no API key. */}}
{{- define "e3rl.apiKeyKey" -}}
{{- if .Values.auth.existingSecret.name -}}{{ .Values.auth.existingSecret.apiKeyKey }}{{- else if .Values.auth.apiKey -}}api-key{{- end -}}
{{- end -}}

{{- define "e3rl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "e3rl.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "e3rl.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "e3rl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "e3rl.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: e3rl
{{- end -}}

{{- define "e3rl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "e3rl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "e3rl.serverSelectorLabels" -}}
{{ include "e3rl.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "e3rl.trainerSelectorLabels" -}}
{{ include "e3rl.selectorLabels" . }}
app.kubernetes.io/component: trainer
{{- end -}}

{{- define "e3rl.testSelectorLabels" -}}
{{ include "e3rl.selectorLabels" . }}
app.kubernetes.io/component: test
{{- end -}}

{{/* The model directory inside the containers. */}}
{{- define "e3rl.modelPath" -}}
{{- if eq .Values.model.source "image" -}}{{ .Values.model.imagePath }}{{- else -}}{{ .Values.model.mountPath }}{{- end -}}
{{- end -}}

{{/* The model volume (pvc, hostPath; none for image), as a list item. */}}
{{- define "e3rl.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- end -}}

{{- define "e3rl.modelVolumeMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* An emptyDir source, inline: {} or {"sizeLimit": ...}. Arg: the size limit or "". */}}
{{- define "e3rl.emptyDir" -}}
{{- $d := dict -}}
{{- with . -}}{{- $_ := set $d "sizeLimit" . -}}{{- end -}}
{{- toJson $d -}}
{{- end -}}

{{/* Whole cores of a resources object: the CPU limit, else the request; 0 when neither. */}}
{{- define "e3rl.cores" -}}
{{- $cpu := "" -}}
{{- if and .limits (hasKey .limits "cpu") -}}{{- $cpu = toString .limits.cpu -}}
{{- else if and .requests (hasKey .requests "cpu") -}}{{- $cpu = toString .requests.cpu -}}
{{- end -}}
{{- if not $cpu -}}0
{{- else if hasSuffix "m" $cpu -}}{{ div (atoi (trimSuffix "m" $cpu)) 1000 }}
{{- else -}}{{ floor (float64 $cpu) | int }}
{{- end -}}
{{- end -}}

{{/* Container resources with the GPUs added to the limits. Args: dict "resources" "gpu". */}}
{{- define "e3rl.resources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if .gpu.enabled -}}
{{- $limits := deepCopy ($res.limits | default dict) -}}
{{- $_ := set $limits .gpu.resourceName .gpu.count -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Flags from an args map (name: value): null and "" are left out, a list repeats the
flag, an object goes as JSON. Booleans: true "--name"; false "--no-name" when noFlags,
else nothing. Args: dict "args" "noFlags". Renders YAML list items. */}}
{{- define "e3rl.flags" -}}
{{- $no := .noFlags -}}
{{- range $name, $value := .args -}}
{{- if kindIs "invalid" $value -}}
{{- else if kindIs "bool" $value -}}
{{- if $value }}
- {{ printf "--%s" $name | quote }}
{{- else if $no }}
- {{ printf "--no-%s" $name | quote }}
{{- end -}}
{{- else if kindIs "map" $value }}
- {{ printf "--%s" $name | quote }}
- {{ toJson $value | quote }}
{{- else if kindIs "slice" $value -}}
{{- range $value }}
- {{ printf "--%s" $name | quote }}
- {{ toString . | quote }}
{{- end -}}
{{- else if ne (toString $value) "" }}
- {{ printf "--%s" $name | quote }}
- {{ include "e3rl.scalar" $value | quote }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A number as the command line wants it: YAML numbers arrive as float64, so 64 would
print as "64" but 1e-5 as "1e-05"; integers print without a fraction. */}}
{{- define "e3rl.scalar" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}{{ int64 . }}
{{- else -}}{{ toString . }}
{{- end -}}
{{- end -}}

{{/* The keys from the Secret. Args: dict "ctx" $ "api" bool (the API key too). */}}
{{- define "e3rl.keyEnv" -}}
{{- $ctx := .ctx -}}
- name: E3RL_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "e3rl.secretName" $ctx }}
      key: {{ include "e3rl.adminKeyKey" $ctx }}
{{- if and .api (include "e3rl.apiKeyKey" $ctx) }}
- name: E3RL_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "e3rl.secretName" $ctx }}
      key: {{ include "e3rl.apiKeyKey" $ctx }}
{{- end }}
{{- end -}}

{{/* Environment every e3rl container gets: the writable places all under /tmp (the root
filesystem is read-only), no network for Hugging Face, and OpenMP sized like torch.
Arg: the thread count. */}}
{{- define "e3rl.runtimeEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/.cache/torchinductor
- name: MPLCONFIGDIR
  value: /tmp/.cache/matplotlib
- name: OMP_NUM_THREADS
  value: {{ . | quote }}
{{- end -}}

{{- define "e3rl.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "e3rl.containerSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- end }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of the trainer container (sidecar or Deployment). */}}
{{- define "e3rl.trainerEnv" -}}
{{ include "e3rl.keyEnv" (dict "ctx" . "api" false) }}
{{ include "e3rl.runtimeEnv" (include "e3rl.trainerThreads" .) }}
{{- with .Values.trainer.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Torch threads of the server: server.args.num-threads, else the cores of its resources
minus one (the HTTP loop's), at least 1. */}}
{{- define "e3rl.serverThreads" -}}
{{- $given := index .Values.server.args "num-threads" -}}
{{- if not (kindIs "invalid" $given) -}}{{ include "e3rl.scalar" $given }}
{{- else -}}{{ max 1 (sub (int (include "e3rl.cores" .Values.resources)) 1) }}
{{- end -}}
{{- end -}}

{{/* Torch threads of the trainer: trainer.args.num-threads, else its cores, at least 1. */}}
{{- define "e3rl.trainerThreads" -}}
{{- $given := index .Values.trainer.args "num-threads" -}}
{{- if not (kindIs "invalid" $given) -}}{{ include "e3rl.scalar" $given }}
{{- else -}}{{ max 1 (int (include "e3rl.cores" .Values.trainer.resources)) }}
{{- end -}}
{{- end -}}

{{/* The trainer container: sidecar (follows 127.0.0.1) or Deployment (follows the headless
Service). Its state dir is mounted from the volume "trainer-state" (sidecar: the replica's
data volume, subPath trainer). */}}
{{- define "e3rl.trainerContainer" -}}
{{- $sidecar := eq .Values.trainer.mode "sidecar" -}}
- name: trainer
  image: {{ include "e3rl.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - train
    - follow
    {{- if $sidecar }}
    - --server
    - {{ printf "http://127.0.0.1:%d" (int .Values.server.adminPort) | quote }}
    {{- else }}
    - --servers-dns
    - {{ printf "%s.%s.svc.%s:%d" (include "e3rl.headlessName" .) .Release.Namespace .Values.clusterDomain (int .Values.server.adminPort) | quote }}
    {{- end }}
    - --model
    - {{ include "e3rl.modelPath" . | quote }}
    - --state-dir
    - /var/lib/e3rl/trainer
    - --metrics-host
    - 0.0.0.0
    - --metrics-port
    - {{ .Values.trainer.metricsPort | quote }}
    {{- if .Values.trainer.gpu.enabled }}
    - --device
    - cuda
    {{- end }}
    {{- if kindIs "invalid" (index .Values.trainer.args "num-threads") }}
    - --num-threads
    - {{ include "e3rl.trainerThreads" . | quote }}
    {{- end }}
    {{- with include "e3rl.flags" (dict "args" .Values.trainer.args "noFlags" true) }}
    {{- . | nindent 4 }}
    {{- end }}
  env:
    {{- include "e3rl.trainerEnv" . | nindent 4 }}
  ports:
    - name: {{ ternary "trainer-metrics" "metrics" $sidecar }}
      containerPort: {{ .Values.trainer.metricsPort }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /health
      port: {{ ternary "trainer-metrics" "metrics" $sidecar }}
    {{- toYaml .Values.trainer.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /health
      port: {{ ternary "trainer-metrics" "metrics" $sidecar }}
    {{- toYaml .Values.trainer.probes.liveness | nindent 4 }}
  resources:
    {{- include "e3rl.resources" (dict "resources" .Values.trainer.resources "gpu" .Values.trainer.gpu) | nindent 4 }}
  securityContext:
    {{- include "e3rl.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: {{ ternary "data" "trainer-state" $sidecar }}
      mountPath: /var/lib/e3rl/trainer
      {{- if $sidecar }}
      subPath: trainer
      {{- end }}
    - name: tmp
      mountPath: /tmp
    {{- with include "e3rl.modelVolumeMount" . }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}
