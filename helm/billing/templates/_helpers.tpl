{{- define "billing.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "billing.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "billing.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "billing.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "billing.selectorLabels" -}}
app.kubernetes.io/name: {{ include "billing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "billing.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "billing.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "billing.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Environment shared by the server and the migration Job: config and secrets. */}}
{{- define "billing.env" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "secrets.database.existingSecret is required" .Values.secrets.database.existingSecret }}
      key: {{ .Values.secrets.database.key }}
{{- /* Without a key each pod would make a development key of its own: every token refused, replicas disagreeing. */}}
{{- if not (or .Values.secrets.jwt.publicKeyKey .Values.secrets.jwt.hs256SecretKey .Values.config.jwtJwksUrl .Values.config.jwtOidcDiscovery) }}
{{- fail "a JWT verification key is required: secrets.jwt.publicKeyKey or secrets.jwt.hs256SecretKey (in secrets.jwt.existingSecret), or config.jwtJwksUrl, or config.jwtOidcDiscovery" }}
{{- end }}
{{- if eq .Values.secrets.jwt.publicKeyKey "*" }}
- name: BILLING_JWT_PUBLIC_KEY_FILE
  value: /etc/billing/jwt
{{- else if .Values.secrets.jwt.publicKeyKey }}
- name: BILLING_JWT_PUBLIC_KEY_FILE
  value: /etc/billing/jwt/{{ .Values.secrets.jwt.publicKeyKey }}
{{- else if .Values.secrets.jwt.hs256SecretKey }}
- name: BILLING_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ required "secrets.jwt.existingSecret is required with secrets.jwt.hs256SecretKey" .Values.secrets.jwt.existingSecret }}
      key: {{ .Values.secrets.jwt.hs256SecretKey }}
{{- end }}
{{- if .Values.secrets.smtp.existingSecret }}
- name: BILLING_SMTP_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.smtp.existingSecret }}
      key: {{ .Values.secrets.smtp.key }}
{{- if .Values.secrets.smtp.usernameKey }}
- name: BILLING_SMTP_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.smtp.existingSecret }}
      key: {{ .Values.secrets.smtp.usernameKey }}
{{- end }}
{{- end }}
{{- if eq .Values.gateway.kind "stripe" }}
- name: BILLING_STRIPE_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ required "gateway.stripe.secretKey.existingSecret is required with gateway.kind=stripe" .Values.gateway.stripe.secretKey.existingSecret }}
      key: {{ .Values.gateway.stripe.secretKey.key }}
{{- if .Values.gateway.stripe.webhookSecret.existingSecret }}
- name: BILLING_STRIPE_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.gateway.stripe.webhookSecret.existingSecret }}
      key: {{ .Values.gateway.stripe.webhookSecret.key }}
{{- end }}
{{- end }}
{{- end -}}

{{/* True when the Stripe webhook is served (its own port and Service port). */}}
{{- define "billing.webhook" -}}
{{- if and (eq .Values.gateway.kind "stripe") .Values.gateway.stripe.webhookSecret.existingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* Labels of the migration Job's pods: not matched by the Service, PDB or Deployment selectors. */}}
{{- define "billing.migrationLabels" -}}
app.kubernetes.io/name: {{ include "billing.name" . }}-migration
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: migration
{{- end -}}
