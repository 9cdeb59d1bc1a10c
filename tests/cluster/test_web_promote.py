"""Promotion, approval and rollback through the dashboard's API reach git and the cluster,
through the same package code as `conveyor promote`, `approve` and `rollback`; the
rollback's pin shows on the app's page and in its history."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, kubectl_json, wait_for
from tests.cluster.serve import ServeProcess
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


def image(sandbox: SandboxHandle, namespace: str) -> str | None:
    live = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    return live["spec"]["template"]["spec"]["containers"][0]["image"] if live else None


def test_promote_approve_and_rollback_through_the_api(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    staging, production = f"stg-{suffix}", f"prd-{suffix}"
    prod_ns = f"{namespace}-prod"
    sandbox.run("kubectl", "create", "namespace", prod_ns)
    repo = ConfigRepo(tmp_path)
    repo.write(
        "conveyor.yaml",
        f"""
        environments:
          - {{name: {staging}, path: {staging}}}
          - {{name: {production}, path: {production}}}
        """,
    )
    repo.write(
        f"{staging}/web/deploy.yaml", deployment("web", namespace, replicas=1, image="web:2.0.0")
    )
    repo.write(
        f"{production}/web/deploy.yaml", deployment("web", prod_ns, replicas=3, image="web:1.0.0")
    )
    repo.commit("two environments")
    for env in (staging, production):
        result = conveyor(sandbox, "reconcile", "--repo", repo.url, "--env", env)
        assert result.returncode == 0, result.stdout + result.stderr
    serve = ServeProcess(sandbox, tmp_path, "--repo", repo.url)
    try:
        api = f"{serve.url}/api/v1/environments/{production}"
        refused = httpx.post(f"{api}/apps/web/actions/promote", json={"params": {}})
        assert refused.status_code == 401  # no token, no promotion

        started = httpx.post(
            f"{api}/apps/web/actions/promote",
            headers=serve.auth,
            json={"params": {"from": staging}, "reason": "weekly release"},
            timeout=60,
        )
        assert started.status_code == 202, started.text
        wait_for(
            lambda: image(sandbox, prod_ns) == "registry.local/web:2.0.0",
            timeout=120,
            what="the promoted version in production",
        )
        live = kubectl_json(sandbox, "get", "deployment", "web", "-n", prod_ns)
        assert live is not None and live["spec"]["replicas"] == 3  # production's own setting
        log = run_git(["--git-dir", repo.url, "log", "--format=%an", "-1"])
        assert "alice" in log  # who did it, in git

        approved = httpx.post(
            f"{api}/actions/approve",
            headers=serve.auth,
            json={"params": {"version": "2.0.0"}},
            timeout=60,
        )
        assert approved.status_code == 200, approved.text
        assert "approved 2.0.0" in approved.json()["message"]
        stored = run_git(["--git-dir", repo.url, "show", f"HEAD:approvals/{production}/2.0.0.yaml"])
        assert "by: alice" in stored
        missing = httpx.post(f"{api}/actions/approve", headers=serve.auth, json={"params": {}})
        assert missing.status_code == 422

        rolled = httpx.post(f"{api}/apps/web/actions/rollback", headers=serve.auth, timeout=60)
        assert rolled.status_code == 202, rolled.text
        wait_for(
            lambda: image(sandbox, prod_ns) == "registry.local/web:1.0.0",
            timeout=120,
            what="the rollback in production",
        )
        # The rollback pins web against image automation, by the dashboard's user.
        pin = wait_for(
            lambda: httpx.get(f"{api}/apps/web/history", timeout=60).json()["pin"],
            timeout=60,
            what="the pin in the app's history",
        )
        assert (pin["by"], pin["reason"]) == (
            "alice (dashboard)",
            "rolled back from 2.0.0 to 1.0.0",
        )
        assert pin["annotation"] == "conveyor.dev/pinned"
        page = httpx.get(f"{serve.url}/environments/{production}/apps/web", timeout=60).text
        assert ('<span class="badge pinned" id="pin" title="conveyor.dev/pinned since ') in page
        assert ">pinned by alice (dashboard): rolled back from 2.0.0 to 1.0.0</span>" in page
    finally:
        serve.stop()
        sandbox.run("kubectl", "delete", "namespace", prod_ns, "--wait=false", check=False)
