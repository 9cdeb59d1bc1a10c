"""A Secret first made with `kubectl apply` carries its plaintext in kubectl's
last-applied annotation: no diff conveyor shows (the CLI against the cluster, a pull
request's head against the cluster, the dashboard's page and its API, readable without
a token) may print it, nor a copy of it in another object's annotation, while each
still says that the Secret changes."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import httpx
import pytest

from conveyor.cluster.diff import LAST_APPLIED
from conveyor.render.discover import app_name
from tests.cluster.gitops import ConfigRepo, conveyor, kubectl_json, reconcile_json
from tests.cluster.serve import ServeProcess
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


def secret(namespace: str, password: str) -> str:
    return f"""
apiVersion: v1
kind: Secret
metadata:
  name: db
  namespace: {namespace}
stringData:
  password: {password}
"""


def web(namespace: str, *, annotation: str = "none") -> str:
    """The app's Deployment; its Pods carry an annotation (that may copy the password)."""
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {namespace}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
      annotations:
        copied-password: "{annotation}"
    spec:
      containers:
        - name: main
          image: registry.local/web:1
"""


def test_no_diff_shows_a_secret_value_from_kubectl_apply_or_a_copy_of_it(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    applied = f"s3cr3t-{uuid.uuid4().hex}"  # what `kubectl apply` wrote
    in_git = f"n3w-s3cr3t-{uuid.uuid4().hex}"  # what git now says
    plaintexts = [applied, in_git]
    forbidden = [*plaintexts, *(base64.b64encode(p.encode()).decode() for p in plaintexts)]

    repo = ConfigRepo(tmp_path)
    path = f"envs/secret-{namespace}"
    repo.write(f"{path}/web/deploy.yaml", web(namespace))
    repo.commit("web")
    code, report = reconcile_json(sandbox, repo, path)
    assert code == 0, report

    manual = tmp_path / "manual-secret.yaml"
    manual.write_text(secret(namespace, applied))
    sandbox.run("kubectl", "apply", "-f", str(manual))
    live = kubectl_json(sandbox, "get", "secret", "db", "-n", namespace)
    assert live is not None
    assert applied in live["metadata"]["annotations"][LAST_APPLIED]  # the leak to plug

    repo.write(f"{path}/web/secret.yaml", secret(namespace, in_git))
    repo.write(f"{path}/web/deploy.yaml", web(namespace, annotation=in_git))
    repo.commit("the password changes, not reconciled yet")

    def assert_masked(output: str, where: str) -> None:
        for value in forbidden:
            assert value not in output, f"{where} shows a Secret value:\n{output}"
        assert "password: '*** (secret value changed)'" in output, (
            f"{where} does not say it changed:\n{output}"
        )
        assert "copied-password: '***'" in output, f"{where} does not mask the copy:\n{output}"

    against_cluster = conveyor(sandbox, "diff", "--repo", repo.url, "--path", path)
    assert against_cluster.returncode == 1, against_cluster.stdout + against_cluster.stderr
    assert "# web: update Secret" in against_cluster.stdout
    assert_masked(against_cluster.stdout + against_cluster.stderr, "conveyor diff")

    head_against_cluster = conveyor(
        sandbox,
        "diff",
        "--repo",
        str(repo.work),
        "--head",
        "main",
        "--against",
        "live",
        "--path",
        path,
        "--format",
        "markdown",
    )
    assert head_against_cluster.returncode == 1, head_against_cluster.stderr
    assert_masked(
        head_against_cluster.stdout + head_against_cluster.stderr, "conveyor diff --against live"
    )

    serve = ServeProcess(sandbox, tmp_path, "--repo", repo.url)
    try:
        scope = app_name(path.replace("/", "-"))
        api = httpx.get(f"{serve.url}/api/v1/environments/{scope}/apps/web/diff", timeout=120)
        api = api.json()
        assert api["error"] is None, api
        changes = {c["object"]: c for c in api["changes"]}
        assert changes[f"Secret {namespace}/db"]["action"] == "update"
        assert_masked("".join(c["diff"] for c in api["changes"]), "the diff API")
        page = httpx.get(f"{serve.url}/partials/diff/{scope}/web", timeout=120).text
        assert_masked(page.replace("&#39;", "'"), "the dashboard's diff page")
    finally:
        serve.stop()
    assert all(value not in serve.log.read_text() for value in forbidden)
