{{/* Names and labels shared by every object of the chart. */}}
{{- define "conveyor.labels" -}}
app.kubernetes.io/name: conveyor
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "conveyor.selector" -}}
app.kubernetes.io/name: conveyor
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conveyor.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The namespaces a namespaced agent may use: the given ones and its own. */}}
{{- define "conveyor.namespaces" -}}
{{- $all := concat .Values.rbac.namespaces (list .Release.Namespace) | uniq -}}
{{- toJson $all -}}
{{- end }}

{{/* Refusals with one line each, before anything is rendered. */}}
{{- define "conveyor.validate" -}}
{{- if ne .Release.Namespace "conveyor-system" -}}
{{- fail "conveyor keeps its statuses and Leases in conveyor-system: install the chart there (--namespace conveyor-system)" -}}
{{- end -}}
{{- if not .Values.git.url -}}
{{- fail "git.url: the config repository is required" -}}
{{- end -}}
{{- if eq (empty .Values.git.path) (empty .Values.git.env) -}}
{{- fail "give exactly one of git.path (the environment's folder) or git.env (an environment of conveyor.yaml)" -}}
{{- end -}}
{{- if not (has .Values.rbac.mode (list "cluster" "namespaced")) -}}
{{- fail (printf "rbac.mode: cluster or namespaced, not %q" .Values.rbac.mode) -}}
{{- end -}}
{{- if and (eq .Values.rbac.mode "namespaced") (empty .Values.rbac.namespaces) -}}
{{- fail "rbac.namespaces: namespaced mode needs the namespaces the agent may touch" -}}
{{- end -}}
{{- end }}

{{/* The pod settings the agent and the dashboard share. */}}
{{- define "conveyor.podCommon" -}}
serviceAccountName: {{ .Values.serviceAccount.name }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* git over ssh with the deploy key: the Secret's identity and known_hosts. */}}
{{- define "conveyor.gitEnv" -}}
{{- if .Values.git.secretName }}
- name: GIT_SSH_COMMAND
  value: "ssh -o BatchMode=yes -o IdentitiesOnly=yes -i /etc/conveyor/git/identity -o UserKnownHostsFile=/etc/conveyor/git/known_hosts"
{{- end }}
{{- end }}

{{- define "conveyor.volumeMounts" -}}
- {name: cache, mountPath: /home/conveyor/.cache}
- {name: tmp, mountPath: /tmp}
{{- if .Values.git.secretName }}
- {name: git, mountPath: /etc/conveyor/git, readOnly: true}
{{- end }}
{{- end }}

{{- define "conveyor.volumes" -}}
- {name: cache, emptyDir: {}}
- {name: tmp, emptyDir: {}}
{{- if .Values.git.secretName }}
- name: git
  secret:
    secretName: {{ .Values.git.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
