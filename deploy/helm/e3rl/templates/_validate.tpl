{{/*
Combinations of values that would render but not work, refused at render time with the
values named. (Types, ranges and unknown keys are values.schema.json's.)
*/}}
{{- define "e3rl.validate" -}}
{{- $v := .Values -}}
{{- $sidecar := and $v.trainer.enabled (eq $v.trainer.mode "sidecar") -}}
{{- if and $sidecar (gt (int $v.replicaCount) 1) -}}
{{- fail (printf "trainer.mode=sidecar follows only its own pod's server, so it needs replicaCount=1 (got %d): use trainer.mode=deployment to follow several replicas" (int $v.replicaCount)) -}}
{{- end -}}
{{- if and $sidecar $v.autoscaling.enabled -}}
{{- fail "autoscaling.enabled cannot scale a server pod that carries the trainer (trainer.mode=sidecar): every replica would run its own trainer; use trainer.mode=deployment" -}}
{{- end -}}
{{- if and $v.autoscaling.keda.enabled (not $v.autoscaling.enabled) -}}
{{- fail "autoscaling.keda.enabled chooses KEDA for autoscaling: set autoscaling.enabled=true too" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- $needed := add (int $v.server.preStopSleepSeconds) (ceil $v.server.drainTimeoutS | int) 10 -}}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least server.preStopSleepSeconds (%d) + server.drainTimeoutS (%v) + 10 s (open responses get 5 s after the drain, then the store flushes) = %d, or Kubernetes kills replicas mid-drain" (int $v.terminationGracePeriodSeconds) (int $v.server.preStopSleepSeconds) $v.server.drainTimeoutS (int $needed)) -}}
{{- end -}}
{{- if eq (int $v.server.port) (int $v.server.adminPort) -}}
{{- fail (printf "server.adminPort must differ from server.port (both %d)" (int $v.server.port)) -}}
{{- end -}}
{{- if and $v.trainer.enabled (or (eq (int $v.trainer.metricsPort) (int $v.server.port)) (eq (int $v.trainer.metricsPort) (int $v.server.adminPort))) -}}
{{- fail (printf "trainer.metricsPort (%d) must differ from server.port and server.adminPort" (int $v.trainer.metricsPort)) -}}
{{- end -}}
{{- with $v.auth.existingSecret -}}
{{- if and .name (not .adminKeyKey) -}}
{{- fail (printf "auth.existingSecret.name is set (%s): name the key that holds the admin key in auth.existingSecret.adminKeyKey (and the API key's in apiKeyKey, if any)" .name) -}}
{{- end -}}
{{- if and (not .name) (or .adminKeyKey .apiKeyKey) -}}
{{- fail "auth.existingSecret.adminKeyKey/apiKeyKey are set without auth.existingSecret.name" -}}
{{- end -}}
{{- if and .name (or $v.auth.apiKey $v.auth.adminKey) -}}
{{- fail "auth.apiKey/auth.adminKey cannot be used with auth.existingSecret.name: put the keys in that Secret" -}}
{{- end -}}
{{- end -}}
{{- if and $v.auth.apiKey (eq $v.auth.apiKey $v.auth.adminKey) -}}
{{- fail "auth.adminKey must differ from auth.apiKey (a client holding the API key must not hold the admin key)" -}}
{{- end -}}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) -}}
{{- fail "model.source=pvc needs model.pvc.claimName" -}}
{{- end -}}
{{- if and (eq $v.model.source "hostPath") (not $v.model.hostPath.path) -}}
{{- fail "model.source=hostPath needs model.hostPath.path" -}}
{{- end -}}
{{- with $v.podDisruptionBudget -}}
{{- if and .enabled (eq (kindIs "invalid" .maxUnavailable) (kindIs "invalid" .minAvailable)) -}}
{{- fail "podDisruptionBudget: set exactly one of maxUnavailable and minAvailable" -}}
{{- end -}}
{{- end -}}
{{- if and $v.trainer.enabled (eq $v.trainer.mode "deployment") $v.trainer.persistence.existingClaim (not $v.trainer.persistence.enabled) -}}
{{- fail "trainer.persistence.existingClaim needs trainer.persistence.enabled=true" -}}
{{- end -}}
{{- end -}}
