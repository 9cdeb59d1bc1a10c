"""Rollbacks hold against image automation, on the sandbox with its real OCI registry:
a Flux v1 glob (a HelmRelease, Flux v1's lock) and a Flux v2 setter (a plain
Deployment, conveyor's pin). After `conveyor rollback`, `images update` leaves the bad
version out; `conveyor unpin` and a promotion lift the pin and automation follows again."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.images.push import push
from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, chart_repo, conveyor, deployment, kubectl_json
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster

UI_GOOD = "refs-heads-master-aaa0001-1700000100"
UI_BAD = "refs-heads-master-bbb0002-1700000200"


def flux_v1_ui(namespace: str, charts: str, image: str, tag: str) -> str:
    return f"""
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: ui
  namespace: {namespace}
  annotations:
    fluxcd.io/automated: "true"
    filter.fluxcd.io/chart-image: glob:refs-heads-master-*
spec:
  releaseName: ui
  timeout: 60
  chart:
    git: {charts}
    path: service
    ref: master
  values:
    replicaCount: 1
    image:
      repository: {image}
      tag: "{tag}" # filled in by CI. do not modify.
"""


def image_policy(name: str, image: str) -> str:
    return f"""
apiVersion: image.toolkit.fluxcd.io/v1beta2
kind: ImageRepository
metadata: {{name: {name}, namespace: flux-system}}
spec: {{image: {image}}}
---
apiVersion: image.toolkit.fluxcd.io/v1beta2
kind: ImagePolicy
metadata: {{name: {name}, namespace: flux-system}}
spec:
  imageRepositoryRef: {{name: {name}}}
  policy: {{semver: {{range: ">=1.0.0"}}}}
"""


class World:
    """A config repo with staging and production on the sandbox, images in its registry."""

    def __init__(self, sandbox: SandboxHandle, root: Path) -> None:
        self.sandbox = sandbox
        self.id = uuid.uuid4().hex[:6]
        self.staging, self.production = f"staging-{self.id}", f"production-{self.id}"
        self.namespaces = {env: f"{env}-apps" for env in (self.staging, self.production)}
        self.registry = sandbox.registry
        self.prefix = f"t-{self.id}"
        self.images = f"{self.registry}/{self.prefix}"
        self.repo = ConfigRepo(root)
        charts = chart_repo(root)
        environments = [
            {"name": self.staging, "path": "staging"},
            {"name": self.production, "path": "production"},
        ]
        self.repo.write("conveyor.yaml", yaml.safe_dump({"environments": environments}))
        # The image policies live apart from the environments' folders (they are not
        # applied: the sandbox serves no Flux kinds).
        self.repo.write("flux-system/web.yaml", image_policy(f"web-{self.id}", self.web))
        for env, folder in ((self.staging, "staging"), (self.production, "production")):
            namespace = self.namespaces[env]
            self.repo.write(f"{folder}/ui.yaml", flux_v1_ui(namespace, charts, self.ui, UI_GOOD))
            self.repo.write(
                f"{folder}/web/deploy.yaml",
                deployment(
                    "web",
                    namespace,
                    image="web:1.0.0",
                    registry=self.images,
                    setter=f"flux-system:web-{self.id}",
                ),
            )
        for namespace in self.namespaces.values():
            sandbox.run("kubectl", "create", "namespace", namespace)
        self.push("ui", UI_GOOD, "2024-01-01T00:00:00Z")
        self.push("web", "1.0.0", "2024-01-01T00:00:00Z")
        self.repo.commit("staging and production")

    @property
    def ui(self) -> str:
        return f"{self.images}/ui"

    @property
    def web(self) -> str:
        return f"{self.images}/web"

    def push(self, repository: str, tag: str, created: str) -> None:
        push(self.registry, f"{self.prefix}/{repository}", [tag], created=created)

    def run(self, *args: str) -> str:
        result = conveyor(self.sandbox, *args)
        assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    def update(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(
            conveyor(self.sandbox, "images", "update", "--repo", self.repo.url, "-o", "json").stdout
        )
        return report

    def scan(self) -> dict[str, dict[str, Any]]:
        out = conveyor(self.sandbox, "images", "scan", "--repo", self.repo.url, "-o", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        rows = json.loads(out.stdout)["automations"]
        return {f"{r['name']} {r['sites'][0].split(':')[0]}": r for r in rows}

    def reconcile(self) -> None:
        self.run("reconcile", "--repo", self.repo.url, "--env", self.production)

    def live(self, name: str) -> str:
        live = kubectl_json(
            self.sandbox, "get", "deployment", name, "-n", self.namespaces[self.production]
        )
        assert live is not None, name
        return str(live["spec"]["template"]["spec"]["containers"][0]["image"])

    def file(self, path: str) -> str:
        return run_git(["--git-dir", self.repo.url, "show", f"main:{path}"])

    def head(self) -> str:
        return run_git(["--git-dir", self.repo.url, "rev-parse", "main"]).strip()


def test_a_rollback_holds_against_image_automation_until_unpinned_or_promoted(
    sandbox: SandboxHandle, tmp_path: Path
) -> None:
    world = World(sandbox, tmp_path)
    world.reconcile()
    assert world.live("web") == f"{world.web}:1.0.0"
    assert world.live("ui") == f"{world.ui}:{UI_GOOD}"

    # CI pushes the bad builds; automation writes them, the agent (here: reconcile) runs them.
    world.push("ui", UI_BAD, "2024-01-02T00:00:00Z")
    world.push("web", "1.1.0", "2024-01-02T00:00:00Z")
    assert len(world.update()["changes"]) == 4  # staging and production, ui and web
    world.reconcile()
    assert world.live("web") == f"{world.web}:1.1.0"
    assert world.live("ui") == f"{world.ui}:{UI_BAD}"

    # Roll both back in production (each commit applies at once).
    rollback = ["rollback", "--repo", world.repo.url, "--env", world.production]
    output = world.run(
        *rollback, "--app", "web", "--author-name", "alice", "--reason", "uploads fail"
    )
    assert "web in " in output and "pinned by alice" in output
    world.run(*rollback, "--app", "ui", "--author-name", "alice")
    assert world.live("web") == f"{world.web}:1.0.0"
    assert world.live("ui") == f"{world.ui}:{UI_GOOD}"
    web_file, ui_file = world.file("production/web/deploy.yaml"), world.file("production/ui.yaml")
    assert 'conveyor.dev/pinned: "true"' in web_file
    assert 'conveyor.dev/pinned-reason: "uploads fail"' in web_file
    assert 'fluxcd.io/locked: "true"' in ui_file and 'fluxcd.io/locked_user: "alice"' in ui_file

    # The next images update does not bring the bad tags back; scan says who holds them.
    head = world.head()
    report = world.update()
    assert report["commit"] is None and report["changes"] == []
    assert world.head() == head
    rows = world.scan()
    web_row = rows[f"ImagePolicy flux-system:web-{world.id} production/web/deploy.yaml"]
    ui_row = rows[
        f"HelmRelease {world.namespaces[world.production]}/ui chart-image production/ui.yaml"
    ]
    assert (web_row["status"], web_row["current"], web_row["latest"]) == (
        "pinned",
        "1.0.0",
        "1.1.0",
    )
    assert web_row["pin"]["by"] == "alice" and web_row["pin"]["reason"] == "uploads fail"
    assert (ui_row["status"], ui_row["current"]) == ("pinned", UI_GOOD)
    assert ui_row["pin"]["annotation"] == "fluxcd.io/locked"
    staging_web = rows[f"ImagePolicy flux-system:web-{world.id} staging/web/deploy.yaml"]
    assert staging_web["status"] == "current" and staging_web["pin"] is None
    table = conveyor(sandbox, "images", "scan", "--repo", world.repo.url).stdout
    assert (
        f"ImagePolicy flux-system:web-{world.id} (production/web/deploy.yaml:21): pinned by "
        "alice at "
    ) in table
    assert ": uploads fail (conveyor.dev/pinned)" in table
    assert "(production/ui.yaml:23): pinned by alice: rolled back from " in table
    # And the agent's next pass keeps the rollback.
    world.reconcile()
    assert world.live("web") == f"{world.web}:1.0.0"

    # Unpinned, web follows automation again; ui stays held.
    world.run("unpin", "web", "--repo", world.repo.url, "--env", world.production)
    report = world.update()
    assert [(c["file"], c["new"]) for c in report["changes"]] == [
        ("production/web/deploy.yaml", "1.1.0")
    ]
    assert "conveyor.dev/pinned" not in world.file("production/web/deploy.yaml")

    # A promotion into production lifts ui's lock; the next build reaches it again.
    newer = "refs-heads-master-ccc0003-1700000300"
    world.push("ui", newer, "2024-01-03T00:00:00Z")
    report = world.update()
    assert [(c["file"], c["new"]) for c in report["changes"]] == [("staging/ui.yaml", newer)]
    promote = [
        "promote", "--repo", world.repo.url, "--from", world.staging, "--to", world.production,
        "--app", "ui", "-o", "json",
    ]  # fmt: skip
    result = conveyor(sandbox, *promote)
    assert result.returncode == 0, result.stdout + result.stderr
    [ui] = json.loads(result.stdout)["apps"]
    assert (ui["to"], ui["pin"]["by"], ui["unpinned"]) == (newer, "alice", True)
    assert "fluxcd.io/locked" not in world.file("production/ui.yaml")
    newest = "refs-heads-master-ddd0004-1700000400"
    world.push("ui", newest, "2024-01-04T00:00:00Z")
    report = world.update()
    assert sorted((c["file"], c["new"]) for c in report["changes"]) == [
        ("production/ui.yaml", newest),
        ("staging/ui.yaml", newest),
    ]
    world.reconcile()
    assert world.live("ui") == f"{world.ui}:{newest}"
    assert world.live("web") == f"{world.web}:1.1.0"
