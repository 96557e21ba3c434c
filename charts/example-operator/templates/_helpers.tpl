{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "example-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "example-operator.fullname" -}}
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

{{- define "example-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "example-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "example-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "example-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "example-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "example-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "example-operator.leaseName" -}}
{{- default (printf "%s-leader" (include "example-operator.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The metrics Service: a DNS label, so at most 63 characters with its suffix. */}}
{{- define "example-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "example-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* `<fullname><suffix>` within 63 characters: the full name is cut to make room for the suffix. */}}
{{- define "example-operator.suffixedName" -}}
{{- $fullname := include "example-operator.fullname" .context }}
{{- printf "%s%s" ($fullname | trunc (sub 63 (len .suffix) | int) | trimSuffix "-") .suffix }}
{{- end }}

{{/* The image: `[global.imageRegistry/]repository`, then `@digest` when set (it wins over the tag), else `:tag`. */}}
{{- define "example-operator.image" -}}
{{- $registry := (.Values.global | default dict).imageRegistry | default "" | trimSuffix "/" }}
{{- $repository := .Values.image.repository }}
{{- if $registry }}
{{- $repository = printf "%s/%s" $registry $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Whether the messagebroadcast controller runs. */}}
{{- define "example-operator.broadcasts" -}}
{{- if has "messagebroadcast" .Values.controllers.enabled }}true{{ end }}
{{- end }}

{{/* A duration of the form the schema allows (1m30s, 500ms) in milliseconds. */}}
{{- define "example-operator.millis" -}}
{{- $total := 0 }}
{{- range $part := regexFindAll "[0-9]+(ms|h|m|s)" . -1 }}
{{- $number := regexFind "^[0-9]+" $part | atoi }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" $part) $part }}
{{- $scale := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit }}
{{- $total = add $total (mul $number $scale) }}
{{- end }}
{{- $total }}
{{- end }}

{{/* Fails the install with a clear message when the values cannot work together. */}}
{{- define "example-operator.validate" -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "leaderElection.enabled=false with replicaCount=%v: every replica would reconcile at once; use one replica or enable leader election" .Values.replicaCount) }}
{{- end }}
{{- if and (not .Values.leaderElection.enabled) .Values.strategy (ne (.Values.strategy.type | default "RollingUpdate") "Recreate") }}
{{- fail (printf "leaderElection.enabled=false with strategy.type=%s: an update would run the old and the new Pod side by side, two writers; leave strategy empty (Recreate is then used) or enable leader election" (.Values.strategy.type | default "RollingUpdate")) }}
{{- end }}
{{- if .Values.leaderElection.enabled }}
{{- $lease := include "example-operator.millis" .Values.leaderElection.leaseDuration | atoi }}
{{- $deadline := include "example-operator.millis" .Values.leaderElection.renewDeadline | atoi }}
{{- $retry := include "example-operator.millis" .Values.leaderElection.retryPeriod | atoi }}
{{- if or (lt $lease 1000) (ne (mod $lease 1000) 0) }}
{{- fail (printf "leaderElection.leaseDuration=%s must be a whole number of seconds, at least 1s (the Lease stores seconds)" .Values.leaderElection.leaseDuration) }}
{{- end }}
{{- if ge (add $deadline $retry) $lease }}
{{- fail (printf "leaderElection: renewDeadline (%s) + retryPeriod (%s) must be less than leaseDuration (%s), so a leader that cannot renew stops before another may take over" .Values.leaderElection.renewDeadline .Values.leaderElection.retryPeriod .Values.leaderElection.leaseDuration) }}
{{- end }}
{{- if le (mul $deadline 10) (mul $retry 12) }}
{{- fail (printf "leaderElection: renewDeadline (%s) must be more than 1.2 × retryPeriod (%s)" .Values.leaderElection.renewDeadline .Values.leaderElection.retryPeriod) }}
{{- end }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int .Values.probePort) }}
{{- fail (printf "metrics.port and probePort are both %v: the container cannot declare one port twice; choose two ports" .Values.probePort) }}
{{- end }}
{{- end }}

{{/* A list of strings as a CEL list literal, `['a', 'b']`; the schema keeps quotes out of them. */}}
{{- define "example-operator.celList" -}}
[{{ range $index, $item := . }}{{ if $index }}, {{ end }}{{ $item | squote }}{{ end }}]
{{- end }}
