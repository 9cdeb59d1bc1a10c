"""The pipeline's and the journey's shapes, from statuses and versions alone: what waits
in a cell (a newer version upstream, a closed gate, git ahead), which actions apply, and
where each version went; and the release versions read from git as promotion reads
them (real git, a real repository)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from conveyor.promote.pipeline import environment_versions
from conveyor.reconcile.status import READY, STALLED, WAITING_FOR_GATE, AppStatus
from conveyor.web import views
from conveyor.web.repo import ConfigRepo, built_from

ORDER = ["dev", "staging", "production"]


def status(scope: str, *, state: str = READY, reason: str = "", message: str = "") -> AppStatus:
    return AppStatus(scope=scope, app="api", state=state, reason=reason, message=message)


def shaped(
    statuses: list[AppStatus],
    versions: dict[str, str],
    *,
    desired: dict[str, str] | None = None,
    held: dict[str, str] | None = None,
    approvals: set[str] | None = None,
) -> views.Pipeline:
    return views.pipeline(
        views.matrix(statuses, versions, order=ORDER),
        {s.name: s for s in statuses},
        order=ORDER,
        desired=desired or {},
        held=held or {},
        approvals=approvals or set(),
    )


def test_a_newer_version_upstream_waits_with_a_promote_action() -> None:
    statuses = [status("dev"), status("staging"), status("production")]
    pipeline = shaped(
        statuses, {"dev.api": "1.5.0", "staging.api": "1.5.0", "production.api": "1.4.2"}
    )
    assert [e.name for e in pipeline.environments] == ORDER
    production = pipeline.cell("production", "api")
    assert production is not None and production.version == "1.4.2"
    (waiting,) = production.waiting
    assert (waiting.kind, waiting.version, waiting.environment) == ("previous", "1.5.0", "staging")
    assert waiting.message == "staging runs 1.5.0"
    assert production.promote_from == "staging" and not production.diff
    staging = pipeline.cell("staging", "api")
    assert staging is not None and staging.waiting == [] and staging.promote_from is None
    dev = pipeline.cell("dev", "api")
    assert dev is not None and dev.promote_from is None  # the first environment has none


def test_an_older_version_upstream_is_not_offered() -> None:
    statuses = [status("staging"), status("production")]
    pipeline = shaped(statuses, {"staging.api": "1.4.0", "production.api": "v1.4.3"})
    production = pipeline.cell("production", "api")
    assert production is not None and production.waiting == []  # hotfixed past staging


def test_a_closed_gate_says_why_and_offers_approval_of_the_held_version() -> None:
    gated = status(
        "production",
        state=WAITING_FOR_GATE,
        reason="GateClosed",
        message="approval: 0 of 1 approvals of 1.5.0; soak: 8m left",
    )
    statuses = [status("staging"), gated]
    versions = {"staging.api": "1.5.0", "production.api": "1.4.2"}
    held = {"production.api": "1.5.0"}
    pipeline = shaped(statuses, versions, held=held, approvals={"production"})
    cell = pipeline.cell("production", "api")
    assert cell is not None
    (waiting,) = cell.waiting  # staging's 1.5.0 is the held one: said once
    assert waiting.kind == "gate" and "soak: 8m left" in waiting.message
    assert cell.approve_version == "1.5.0" and cell.diff
    assert cell.promote_from is None
    without = shaped(statuses, versions, held=held).cell("production", "api")
    assert without is not None and without.approve_version is None  # no approval gate


def test_git_ahead_of_the_cluster_and_why() -> None:
    failed = status("staging", state=STALLED, reason="ApplyFailed")
    pipeline = shaped(
        [status("dev"), failed],
        {"dev.api": "2.0.0", "staging.api": "1.9.0"},
        desired={"staging.api": "2.0.0", "dev.api": "2.0.0"},
    )
    cell = pipeline.cell("staging", "api")
    assert cell is not None
    (waiting,) = cell.waiting  # dev's 2.0.0 is in git already: not offered again
    assert (waiting.kind, waiting.message) == ("git", "git has 2.0.0 (ApplyFailed)")
    assert cell.diff and cell.promote_from is None
    dev = pipeline.cell("dev", "api")
    assert dev is not None and dev.waiting == [] and not dev.diff


def test_environments_outside_the_order_have_no_previous() -> None:
    statuses = [status("adhoc"), status("zz-other")]
    pipeline = shaped(statuses, {"adhoc.api": "1.0.0", "zz-other.api": "2.0.0"})
    assert all(c.waiting == [] for c in pipeline.cells)


def test_the_journey_lists_arrivals_per_environment_newest_first() -> None:
    def commit(sha: str, date: str, change: str, version: str) -> views.GitCommit:
        return views.GitCommit(
            sha=sha * 40, date=date, author="ci", subject=change, change=change, version=version
        )

    staging = [
        commit("c", "2026-12-01T12:00:00+00:00", "publish", "1.5.0"),
        commit("b", "2026-12-01T11:00:00+00:00", "manual", "1.4.0"),  # replicas only
        commit("a", "2026-12-01T10:00:00+00:00", "publish", "1.4.0"),
    ]
    production = [
        commit("f", "2026-12-01T15:00:00+02:00", "rollback", "1.4.0"),  # 13:00 UTC
        commit("e", "2026-12-01T12:30:00+00:00", "promotion", "1.5.0"),
        commit("d", "2026-12-01T10:30:00+00:00", "promotion", "1.4.0"),
    ]
    journey = views.journey(
        "api",
        {"staging": staging, "production": production},
        running={"staging": "1.5.0", "production": "1.4.0"},
    )
    assert journey.environments == ["staging", "production"]
    assert [row.version for row in journey.versions] == ["1.5.0", "1.4.0"]
    newest, oldest = journey.versions
    assert [a.change for a in newest.arrivals["production"]] == ["promotion"]
    assert [a.change for a in oldest.arrivals["production"]] == ["rollback", "promotion"]
    assert [a.sha[0] for a in oldest.arrivals["staging"]] == ["a"]  # not the replicas commit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  template:
    spec:
      containers:
        - {{name: {name}, image: "registry.local/{name}:{tag}"}}
        - {{name: envoy, image: "envoy:1.30"}}
"""
CONFIGMAP = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: b}\n"


def test_release_versions_at_a_revision_are_what_promotion_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path / "cache"))  # the dashboard's clone
    origin = tmp_path / "config"
    (origin / "staging" / "api").mkdir(parents=True)
    (origin / "staging" / "settings").mkdir(parents=True)
    git(tmp_path, "init", "-q", "-b", "main", str(origin))
    tag = "refs-heads-master-0123456789abcdef0123456789abcdef01234567-1733050000"
    (origin / "staging/api/deploy.yaml").write_text(DEPLOYMENT.format(name="api", tag=tag))
    (origin / "staging/settings/cm.yaml").write_text(CONFIGMAP)
    git(origin, "add", ".")
    git(origin, "commit", "-qm", "Update from https://github.com/acme/api/commit/0123")
    first = git(origin, "rev-parse", "HEAD")
    (origin / "staging/api/deploy.yaml").write_text(DEPLOYMENT.format(name="api", tag="1.5.0"))
    git(origin, "commit", "-qam", "Promote api")

    versions = environment_versions(origin, "staging", first)
    assert versions["api"].version == tag  # the main container's tag, not envoy's
    assert versions["settings"].version is None  # nothing names a version
    assert environment_versions(origin, "nowhere", first) == {}

    async def read() -> tuple[dict[str, str], dict[str, str] | None, list[str]]:
        repo = ConfigRepo(str(origin), branch="main", kubeconfig=None, context=None)
        at_first = await repo.releases("staging", first)
        history = await repo.history("staging", "api")
        return at_first, repo.known_releases("staging", first), [c.version for c in history]

    at_first, known, history = asyncio.run(read())
    assert at_first == {"api": tag, "settings": ""} and known == at_first
    assert history == ["1.5.0", tag]

    # A commit the clone cannot reach is asked for once, and never announced as known
    # (the announcement redraws pages, which would ask again, in a loop).
    async def unreachable() -> tuple[list[str], bool]:
        repo = ConfigRepo(str(origin), branch="main", kubeconfig=None, context=None)
        announced: list[str] = []
        missing = "f" * 40
        repo.request("staging", missing, then=lambda: announced.append("missing"))
        repo.request("staging", first, then=lambda: announced.append("first"))
        while repo._pending or any(not t.done() for t in repo._requests):
            await asyncio.sleep(0.05)
        repo.request("staging", missing, then=lambda: announced.append("again"))
        return announced, bool(repo._requests and not all(t.done() for t in repo._requests))

    announced, asked_again = asyncio.run(unreachable())
    assert announced == ["first"] and not asked_again


def test_a_publish_commit_names_the_app_commit_its_version_was_built_from() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    github = f"Update from https://github.com/hms-dbmi-cellenics/ui/commit/{sha}"
    assert built_from(github) == ("https://github.com/hms-dbmi-cellenics/ui", sha)
    gitlab = "Update from https://gitlab.com/acme/api/-/commit/abc1234 (pipeline 7)"
    assert built_from(gitlab) == ("https://gitlab.com/acme/api", "abc1234")
    assert built_from("Promote api from staging") is None
    assert built_from(f"Update from {sha}") is None  # a bare SHA: no repository named
