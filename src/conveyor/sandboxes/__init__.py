"""Staging sandboxes: a whole environment per pull request, from the candidates CI writes.

Cellenics' CI writes `staging-candidates/<app>/<REF_ID>.yaml` for every pull request and
branch push. `conveyor stage api/42 ui/my-branch` takes one candidate per app, fills its
markers, pins the apps that should not move, and commits them as one file,
`<env folder>/<sandbox-id>.yaml`; the environment's agent deploys it into `<app>-<id>`
namespaces like any other file, and `conveyor unstage` (or expiry, or the agent's auto
mode) removes it again through a commit. Not to be confused with `conveyor.sandbox`, the
local test cluster.

candidates.py  which candidate each app comes from; sandbox IDs
manifest.py    a sandbox's file: built from candidates, read back
hooks.py       the commands conveyor.yaml runs beside a sandbox
stage.py       stage, unstage, extend, list (each change one commit)
housekeeping.py  what the agent does: expiry and automatic sandboxes
"""
