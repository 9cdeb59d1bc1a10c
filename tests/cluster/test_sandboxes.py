"""Staging sandboxes on the sandbox cluster, with one agent for the whole module: stage
deploys `<app>-<id>` beside the shared api, unstage leaves nothing behind, a TTL expires
through a commit, auto mode follows a pull request's candidate, two concurrent stages
both land, and the dashboard's Sandboxes page shows, extends and removes them in
Chromium. The refusals write nothing to git and need no cluster: tests/unit/
test_sandboxes.py runs them through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conveyor.source.git import run_git
from tests.cellenics import CellenicsRepo, cellenics_repo
from tests.cluster.gitops import conveyor, kubectl_json, wait_for
from tests.cluster.serve import ServeProcess
from tests.cluster.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


@dataclass
class Staged:
    sandbox: SandboxHandle
    repo: CellenicsRepo
    run: str  # this run's suffix: IDs and namespaces of its own
    agent: subprocess.Popen[bytes]
    log: Path
    sandbox_id: str | None = None  # staged by the first test, unstaged by a later one
    concurrent: list[str] | None = None  # staged at once, unstaged by the dashboard test

    def stage(self, *args: str) -> subprocess.CompletedProcess[str]:
        return conveyor(self.sandbox, "stage", *args, "--repo", self.repo.url)

    def head(self) -> str:
        return run_git(["rev-parse", "master"], cwd=self.repo.config.bare).strip()

    def subjects(self, count: int = 20) -> list[str]:
        out = run_git(["log", "--format=%s", f"-{count}", "master"], cwd=self.repo.config.bare)
        return out.splitlines()

    def image(self, app: str, namespace: str) -> str | None:
        found = kubectl_json(self.sandbox, "get", "deployment", app, "-n", namespace)
        if found is None:
            return None
        return str(found["spec"]["template"]["spec"]["containers"][0]["image"])

    def status_names(self, release: str) -> set[str]:
        """The ConveyorApps of the Helm release `namespace/name`."""
        found = kubectl_json(self.sandbox, "get", "conveyorapps", "-n", "conveyor-system")
        items = found["items"] if found else []
        return {
            i["metadata"]["name"] for i in items if i.get("status", {}).get("release") == release
        }

    def gone(self, namespace: str) -> bool:
        return kubectl_json(self.sandbox, "get", "namespace", namespace) is None

    def listed(self) -> dict[str, dict]:
        result = self.stage("list", "-o", "json")
        assert result.returncode == 0, result.stderr
        return {s["id"]: s for s in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def staged(sandbox: SandboxHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    run = uuid.uuid4().hex[:5]
    root = tmp_path_factory.mktemp("sandboxes")
    repo = cellenics_repo(root, pr=100 + int(run, 16) % 9000, shared=f"default-{run}")
    log = root / "agent.log"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "agent",
            "--repo",
            repo.url,
            "--env",
            "staging",
            "--interval",
            "1s",
        ],
        env=sandbox.env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    state = Staged(sandbox, repo, run, agent, log)
    try:
        wait_for(
            lambda: state.image("api", f"api-default-{run}"), timeout=120, what="the shared api"
        )
        yield state
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        # The shared api outlives the sandboxes; nothing of this run stays behind.
        shared = f"api-default-{run}"
        sandbox.run("helm", "uninstall", "api", "-n", shared, check=False)
        sandbox.run("kubectl", "delete", "namespace", shared, "--wait=false", check=False)


def test_stage_deploys_the_sandbox_beside_the_shared_api(staged: Staged) -> None:
    run, pr = staged.run, staged.repo.pr
    shared = f"api-default-{run}"
    before = wait_for(
        lambda: staged.status_names(f"{shared}/api"), timeout=60, what="the shared api's status"
    )
    assert len(before) == 1
    sandbox_id = f"s{run}"
    result = staged.stage(f"api/{pr}", "ui/my-branch", "--id", sandbox_id, "--user", "alice")
    assert result.returncode == 0, result.stderr
    assert f"committed {staged.head()[:12]} as staging/{sandbox_id}.yaml" in result.stdout
    expected = {
        "api": f"registry.local/api:pr-{pr}-1",
        "ui": "registry.local/ui:my-branch-1",
        "worker": "registry.local/worker:master-1",
    }
    for app, image in expected.items():
        wait_for(
            lambda app=app, image=image: staged.image(app, f"{app}-{sandbox_id}") == image,
            timeout=120,
            what=f"{app} in {app}-{sandbox_id}",
        )
    # The shared api is untouched: same ConveyorApp, still its first Helm revision.
    assert staged.image("api", shared) == "registry.local/api:shared-1"
    assert staged.status_names(f"{shared}/api") == before
    assert wait_for(
        lambda: staged.status_names(f"api-{sandbox_id}/api"), timeout=60, what="status"
    ) == {f"{before.pop().split('.')[0]}.api-{sandbox_id}"}
    history = staged.sandbox.run("helm", "history", "api", "-n", shared, "-o", "json")
    assert [r["revision"] for r in json.loads(history.stdout)] == [1]
    # stage list: who, apps, refs, pins and chart refs, and the cluster's state
    listed = wait_for(
        lambda: (s := staged.listed().get(sandbox_id)) and s["state"] == "Ready" and s,
        timeout=60,
        what="the sandbox Ready in stage list",
    )
    apps = {a["app"]: a for a in listed["apps"]}
    assert listed["stagedBy"] == "alice"
    assert apps["api"]["ref"] == f"refs/pull/{pr}/merge" and not apps["api"]["pinned"]
    assert apps["ui"]["chartRef"] == "my-branch" and not apps["ui"]["pinned"]
    assert apps["worker"]["pinned"]
    assert apps["worker"]["chartRef"] == staged.repo.shas["refs/heads/master"]
    staged.sandbox_id = sandbox_id


@pytest.fixture(scope="module")
def dashboard(staged: Staged, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        staged.sandbox, tmp_path_factory.mktemp("serve"), "--repo", staged.repo.url
    )
    yield serve
    serve.stop()


@pytest.fixture
def page(dashboard: ServeProcess) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(base_url=dashboard.url)
        tab = context.new_page()
        tab.set_default_timeout(30_000)
        tab.on("dialog", lambda dialog: dialog.accept())
        tab.goto("/login?next=/sandboxes")
        tab.get_by_label("Token").fill(dashboard.token)
        tab.get_by_role("button", name="Log in").click()
        expect(tab.locator("#user")).to_have_text("alice")
        yield tab
        context.close()
        browser.close()
    print(dashboard.log.read_text()[-4000:])  # shown when the test failed


def test_the_sandboxes_page_shows_the_sandbox_and_extends_it(staged: Staged, page: Page) -> None:
    sandbox_id = staged.sandbox_id
    assert sandbox_id, "the first test staged it"
    row = page.locator(f'tr[data-sandbox="{sandbox_id}"]')
    expect(row.locator("td.state .badge")).to_have_text("Ready")
    expect(row.locator("a.url")).to_have_text(f"https://ui-{sandbox_id}.staging.test")
    expect(row.locator('tr[data-app="api"] td.ref')).to_have_text(
        f"refs/pull/{staged.repo.pr}/merge"
    )
    expect(row.locator('tr[data-app="api"] td.pin')).to_have_text("follows")
    expect(row.locator('tr[data-app="worker"] td.pin')).to_have_text("pinned")
    expect(row.locator('tr[data-app="worker"] td.chart')).to_have_text(
        staged.repo.shas["refs/heads/master"][:12]
    )
    expect(row.locator('tr[data-app="ui"] td.images')).to_have_text("registry.local/ui:my-branch-1")
    expect(row.locator("td.expires")).to_have_text("never")
    row.get_by_label(f"TTL of {sandbox_id}").fill("48h")
    row.get_by_role("button", name="Extend").click()
    expect(page.locator(".notice")).to_contain_text(f"sandbox {sandbox_id} expires ")
    assert staged.subjects(1)[0].startswith(f"Extend sandbox {sandbox_id} until ")
    expect(page.locator(f'tr[data-sandbox="{sandbox_id}"] td.expires')).not_to_have_text("never")


def test_unstage_leaves_nothing_behind(staged: Staged) -> None:
    sandbox_id = staged.sandbox_id
    assert sandbox_id, "the first test staged it"
    result = conveyor(staged.sandbox, "unstage", sandbox_id, "--repo", staged.repo.url)
    assert result.returncode == 0, result.stderr
    assert staged.subjects(1) == [f"Unstage sandbox {sandbox_id}"]
    for app in ("api", "ui", "worker"):
        wait_for(lambda app=app: staged.gone(f"{app}-{sandbox_id}"), timeout=120, what=app)
    releases = staged.sandbox.run("helm", "list", "-A", "-o", "json")
    assert not [r for r in json.loads(releases.stdout) if sandbox_id in r["namespace"]]
    for app in ("api", "ui", "worker"):
        assert staged.status_names(f"{app}-{sandbox_id}/{app}") == set()
    assert staged.image("api", f"api-default-{staged.run}") == "registry.local/api:shared-1"


def test_a_short_ttl_expires_through_a_commit(staged: Staged) -> None:
    sandbox_id = f"t{staged.run}"
    result = staged.stage("ui/my-branch", "--id", sandbox_id, "--ttl", "3s")
    assert result.returncode == 0, result.stderr
    wait_for(
        lambda: any(
            s.startswith(f"Unstage sandbox {sandbox_id} (expired at ") for s in staged.subjects(5)
        ),
        timeout=60,
        what="the expiry commit",
    )
    for app in ("api", "ui", "worker"):
        wait_for(lambda app=app: staged.gone(f"{app}-{sandbox_id}"), timeout=120, what=app)


def test_auto_mode_follows_a_pull_request_candidate(staged: Staged) -> None:
    repo = staged.repo
    number = repo.pr + 1
    repo.pull()
    conveyor_yaml = repo.config.work / "conveyor.yaml"
    conveyor_yaml.write_text(conveyor_yaml.read_text() + "  auto: true\n")
    repo.config.remove(f"staging-candidates/api/refs-pull-{repo.pr}-merge.yaml")
    repo.candidate("worker", f"refs/pull/{number}/merge", tag=f"pr-{number}-1")
    repo.chart_ref(f"refs/pull/{number}/merge")
    repo.config.commit("auto mode; worker opens a pull request")
    sandbox_id = f"pr-{number}-worker"
    wait_for(
        lambda: (
            staged.image("worker", f"worker-{sandbox_id}") == f"registry.local/worker:pr-{number}-1"
        ),
        timeout=120,
        what="the automatic sandbox",
    )
    assert any(s.startswith(f"Stage sandbox {sandbox_id}: ") for s in staged.subjects(5))
    repo.pull()
    repo.config.remove(f"staging-candidates/worker/refs-pull-{number}-merge.yaml")
    repo.config.commit("pull request closed")
    wait_for(
        lambda: f"Unstage sandbox {sandbox_id} (its candidate was removed)" in staged.subjects(5),
        timeout=60,
        what="the automatic unstage",
    )
    for app in ("api", "ui", "worker"):
        wait_for(lambda app=app: staged.gone(f"{app}-{sandbox_id}"), timeout=120, what=app)


def test_two_concurrent_stages_both_land(staged: Staged) -> None:
    user = f"u{staged.run}"
    command = [sys.executable, "-m", "conveyor", "stage", "ui/my-branch", "--repo"]
    runs = [
        subprocess.Popen(
            [*command, staged.repo.url, "--user", user, "-o", "json"],
            env=staged.sandbox.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    ids = []
    for process in runs:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        ids.append(json.loads(out)["id"])
    assert sorted(ids) == [f"{user}-ui-my-branch", f"{user}-ui-my-branch-2"]
    staged.concurrent = ids


def test_the_sandboxes_page_unstages_behind_the_token(
    staged: Staged, page: Page, dashboard: ServeProcess
) -> None:
    ids = staged.concurrent
    assert ids, "the test before staged them"
    result = conveyor(staged.sandbox, "unstage", ids[0], "--repo", staged.repo.url)
    assert result.returncode == 0, result.stderr
    page.goto("/sandboxes")
    row = page.locator(f'tr[data-sandbox="{ids[1]}"]')
    row.get_by_role("button", name="Unstage").click()
    expect(page.locator(".notice")).to_contain_text(f"sandbox {ids[1]} unstaged")
    assert staged.subjects(1)[0] == f"Unstage sandbox {ids[1]} (by alice from the dashboard)"
    expect(page.locator(f'tr[data-sandbox="{ids[1]}"]')).to_have_count(0)
    for sandbox_id in ids:
        wait_for(lambda s=sandbox_id: staged.gone(f"ui-{s}"), timeout=120, what=sandbox_id)
