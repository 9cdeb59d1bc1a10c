"""The dashboard in Debian's Chromium, driven by Playwright, on the sandbox: the matrix
(`/matrix`; the pipeline, the front page, is tests/cluster/test_dashboard_pipeline.py),
live updates without reload, actions through the page, refusals without the token, and
environments waiting for a gate."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import KubeClient
from conveyor.cluster.shards import owner_of
from conveyor.reconcile.status import WAITING_FOR_GATE, AppStatus, StatusStore
from conveyor.render.discover import app_name
from tests.cluster.gitops import (
    ConfigRepo,
    by_name,
    delete_shard_leases,
    deployment,
    kubectl_json,
    reconcile_json,
    shard_lease,
    wait_for,
)
from tests.cluster.serve import ServeProcess
from tests.conftest import ROOT, SandboxHandle

pytestmark = pytest.mark.cluster
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Site:
    sandbox: SandboxHandle
    repo: ConfigRepo
    path: str
    scope: str
    namespace: str
    serve: ServeProcess

    def cell(self, app: str) -> str:
        return f'[id="cell-{self.scope}.{app}"]'

    def capp(self, app: str) -> dict[str, Any]:
        live = kubectl_json(
            self.sandbox, "get", "conveyorapp", "-n", "conveyor-system", f"{self.scope}.{app}"
        )
        assert live is not None
        return live


@pytest.fixture(scope="module")
def site(sandbox: SandboxHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: `make browser` installs Debian's chromium")
    tmp = tmp_path_factory.mktemp("dashboard")
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    sandbox.run("kubectl", "create", "namespace", namespace)
    repo = ConfigRepo(tmp)
    path = f"envs/ui-{uuid.uuid4().hex[:6]}"
    for name, image in (("frontend", "frontend:3.4.1"), ("api", "api:1.0.0")):
        repo.write(f"{path}/{name}/deploy.yaml", deployment(name, namespace, image=image))
    repo.commit("two apps")
    code, report = reconcile_json(sandbox, repo, path)
    assert code == 0, report
    serve = ServeProcess(sandbox, tmp, "--repo", repo.url)
    yield Site(sandbox, repo, path, app_name(path.replace("/", "-")), namespace, serve)
    serve.stop()
    sandbox.run("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
def page(site: Site) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(
            base_url=site.serve.url, viewport={"width": 1400, "height": 900}
        )
        tab = context.new_page()
        tab.set_default_timeout(30_000)
        tab.on("dialog", lambda dialog: dialog.accept())
        yield tab
        context.close()
        browser.close()
    # Shown by pytest only when the test failed: what the server did meanwhile.
    print(site.serve.log.read_text()[-6000:])


def test_matrix_shows_the_deployed_versions(site: Site, page: Page) -> None:
    tab = page
    tab.goto(f"/matrix?env={site.scope}")  # the shared sandbox holds other tests' environments
    expect(tab.locator(f"{site.cell('frontend')} .version")).to_have_text("3.4.1")
    expect(tab.locator(f"{site.cell('api')} .version")).to_have_text("1.0.0")
    expect(tab.locator(f"{site.cell('api')} .badge").first).to_have_text("Ready")
    expect(tab.locator(f'[id="env-{site.scope}"]')).to_contain_text(site.scope)
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "dashboard-matrix.png"), full_page=True)


def test_the_environment_page_shows_each_shards_load_readably_at_1280px(
    site: Site, page: Page
) -> None:
    tab = page
    tab.set_viewport_size({"width": 1280, "height": 800})
    # Identities as a Deployment's Pods have them: host (the Pod's name), pid, random;
    # listed in the order of their names.
    shards = [
        "conveyor-agent-6d5f7c9b8-m7wzp-1-b04e2d",
        "conveyor-agent-6d5f7c9b8-x2k4q-1-3fa9c1",
    ]
    for shard, seconds in zip(shards, (12.5, 8.0), strict=True):
        shard_lease(site.sandbox, site.scope, shard, apps=1, pass_seconds=seconds)
    try:
        tab.goto(f"/environments/{site.scope}")
        rows = tab.locator("#shards tbody tr")
        expect(rows).to_have_count(2)
        owned = {app: owner_of(app, shards) for app in ("frontend", "api")}
        for row, shard, seconds in zip(rows.all(), shards, ("12.5 s", "8.0 s"), strict=True):
            cells = row.locator("td")
            expect(cells.nth(0)).to_have_text(shard)
            expect(cells.nth(1)).to_have_text(str(list(owned.values()).count(shard)))
            expect(cells.nth(3)).to_have_text(seconds)
            expect(cells.nth(0)).to_be_in_viewport()
        assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "dashboard-shards-1280.png"), full_page=True)
    finally:
        delete_shard_leases(site.sandbox, site.scope)


def test_a_commit_shows_without_reload(site: Site, page: Page) -> None:
    tab = page
    tab.goto("/matrix")
    expect(tab.locator(f"{site.cell('api')} .version")).to_have_text("1.0.0")
    wait_for(lambda: tab.evaluate("document.documentElement.dataset.stream") == "connected")
    tab.evaluate("window.__sameDocument = true")
    site.repo.write(
        f"{site.path}/api/deploy.yaml", deployment("api", site.namespace, image="api:1.1.0")
    )
    revision = site.repo.commit("Update from https://github.com/acme/api/commit/feed")
    code, report = reconcile_json(site.sandbox, site.repo, site.path)
    assert code == 0, report
    expect(tab.locator(f"{site.cell('api')} .version")).to_have_text("1.1.0", timeout=15_000)
    expect(tab.locator(f"{site.cell('api')} .rev")).to_have_text(revision[:12])
    assert tab.evaluate("window.__sameDocument") is True  # no reload happened


def test_api_docs_render_from_the_server_alone(site: Site, page: Page) -> None:
    tab = page
    requested: list[str] = []
    refused: list[str] = []
    tab.on("request", lambda request: requested.append(request.url))
    tab.on(
        "console",
        lambda message: (
            refused.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    tab.goto("/api/docs")
    expect(tab.locator(".swagger-ui .title").first).to_contain_text("conveyor")
    expect(tab.locator(".opblock").first).to_be_visible()
    assert requested and all(url.startswith(site.serve.url) for url in requested), requested
    assert refused == []


def test_an_action_without_the_token_is_refused(site: Site, page: Page) -> None:
    tab = page
    tab.goto(f"/environments/{site.scope}/apps/frontend")
    expect(tab.locator("#version")).to_have_text("3.4.1")
    tab.get_by_role("button", name="Suspend").click()
    expect(tab.locator("h1")).to_have_text("Log in first")
    assert not site.capp("frontend")["spec"].get("suspend")


def test_suspend_and_reconcile_now_through_the_page(site: Site, page: Page) -> None:
    tab = page
    tab.goto(f"/login?next=/environments/{site.scope}/apps/frontend")
    tab.get_by_label("Token").fill("wrong-token-for-sure")
    tab.get_by_role("button", name="Log in").click()
    expect(tab.locator(".error")).to_have_text("Invalid token.")
    tab.get_by_label("Token").fill(site.serve.token)
    tab.get_by_role("button", name="Log in").click()
    expect(tab.locator("#user")).to_have_text("alice")
    expect(tab.locator("h1")).to_contain_text("frontend")

    tab.get_by_role("button", name="Suspend").click()
    expect(tab.locator(".notice")).to_contain_text("suspended")
    wait_for(lambda: site.capp("frontend")["spec"].get("suspend") is True, what="spec.suspend")

    # Reconcile now: the pass sees the suspension and reports it; the page follows live.
    tab.get_by_role("button", name="Reconcile now").click()
    expect(tab.locator(".notice")).to_contain_text("reconcile of")
    expect(tab.locator("#state")).to_have_text("Suspended", timeout=60_000)
    assert site.capp("frontend")["status"]["state"] == "Suspended"
    expect(tab.locator("#events")).to_contain_text("by alice via dashboard", timeout=15_000)

    tab.get_by_role("button", name="Resume").click()
    expect(tab.locator(".notice")).to_contain_text("resumed")
    site.repo.write(
        f"{site.path}/frontend/deploy.yaml",
        deployment("frontend", site.namespace, image="frontend:3.5.0"),
    )
    site.repo.commit("Update images\n\nregistry.local/frontend: 3.4.1 -> 3.5.0")
    tab.get_by_role("button", name="Reconcile now").click()
    expect(tab.locator("#version")).to_have_text("3.5.0", timeout=90_000)
    deployed = kubectl_json(site.sandbox, "get", "deployment", "frontend", "-n", site.namespace)
    assert deployed is not None
    assert deployed["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":3.5.0")


def test_gates_page_shows_what_an_environment_waits_for_live(site: Site, page: Page) -> None:
    tab = page
    scope = f"gate-{uuid.uuid4().hex[:6]}"
    tab.goto("/gates")
    wait_for(lambda: tab.evaluate("document.documentElement.dataset.stream") == "connected")

    async def save() -> None:
        async with KubeClient(kubeconfig.load(site.sandbox.kubeconfig)) as kube:
            store = StatusStore(kube)
            await store.list_all()
            await store.save(
                AppStatus(
                    scope=scope,
                    app="api",
                    state=WAITING_FOR_GATE,
                    reason="GatePending",
                    message="waiting for approval (release-managers); soak time 10m left",
                    attempted_revision="d" * 40,
                )
            )

    # Playwright's sync API owns this thread's event loop: write from another thread.
    writer = threading.Thread(target=asyncio.run, args=(save(),))
    writer.start()
    writer.join(timeout=30)
    row = tab.locator("tr", has_text=scope)
    expect(row).to_contain_text("waiting for approval (release-managers)", timeout=15_000)
    tab.goto(f"/matrix?env={scope}")
    expect(tab.locator(f'[id="cell-{scope}.api"] .badge').first).to_have_text(WAITING_FOR_GATE)
    expect(tab.locator(f'[id="cell-{scope}.api"] .gate')).to_contain_text("soak time")


def test_a_failed_apply_shows_its_cause_and_the_full_text_behind_details(
    site: Site, page: Page
) -> None:
    tab = page
    refused = deployment("broken", site.namespace).replace("- name: main", "- name: Bad_Name")
    site.repo.write(f"{site.path}/broken/deploy.yaml", refused)
    site.repo.commit("a container name the API server refuses")
    code, report = reconcile_json(site.sandbox, site.repo, site.path, "--timeout", "10")
    assert code == 1, report
    message = by_name(report)["broken"]["message"]
    assert message.startswith(
        f"Deployment {site.namespace}/broken: spec.template.spec.containers[0].name: "
        'Invalid value: "Bad_Name": a lowercase RFC 1123 label'
    ), message
    tab.goto(f"/environments/{site.scope}/apps/broken")
    shown = tab.locator("#message")
    expect(shown).to_contain_text(message)
    assert shown.evaluate("e => e.firstChild.textContent.trim()") == message
    details = tab.locator("#details")
    expect(details.locator("pre")).to_be_hidden()
    details.locator("summary").click()
    expect(details.locator("pre")).to_be_visible()
    expect(details.locator("pre")).to_contain_text(
        'HTTP 422 Invalid: Deployment.apps "broken" is invalid'
    )
