"""The pipeline view in Debian's Chromium, driven by Playwright, on the sandbox: two
environments of one conveyor.yaml reconciled for real show what waits (a newer version
upstream, git ahead of the cluster) with their actions, a promotion through the page
reaches the cluster and the page follows live; and 12 environments x 60 apps (statuses
written directly, git read for their versions) stay inside a 1280 px window on both
views, with a screenshot kept as an artifact."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import KubeClient
from conveyor.reconcile.status import (
    READY,
    SOURCE_KIND,
    STALLED,
    WAITING_FOR_GATE,
    AppStatus,
    StatusStore,
)
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, kubectl_json, wait_for
from tests.cluster.serve import ServeProcess
from tests.cluster.test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster
NO_SIDEWAYS_SCROLL = "document.documentElement.scrollWidth <= window.innerWidth"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: `make browser` installs Debian's chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


def open_page(browser: Browser, url: str, *, width: int = 1280) -> Page:
    context = browser.new_context(base_url=url, viewport={"width": width, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.on("dialog", lambda dialog: dialog.accept())
    return tab


def cell(environment: str, app: str) -> str:
    return f'[id="pipe-{environment}.{app}"]'


def test_the_pipeline_shows_what_waits_and_promotes_through_the_page(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path, browser: Browser
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
    repo.write(f"{staging}/web/deploy.yaml", deployment("web", namespace, image="web:2.0.0"))
    repo.write(f"{production}/web/deploy.yaml", deployment("web", prod_ns, image="web:1.0.0"))
    settings = "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {}}}\n"
    repo.write(f"{staging}/settings/cm.yaml", settings.format(namespace))
    repo.write(f"{production}/settings/cm.yaml", settings.format(prod_ns))
    first = repo.commit("Update from https://github.com/acme/web/commit/0123abc")
    for env in (staging, production):
        result = conveyor(sandbox, "reconcile", "--repo", repo.url, "--env", env)
        assert result.returncode == 0, result.stdout + result.stderr
    serve = ServeProcess(sandbox, tmp_path, "--repo", repo.url)
    tab = open_page(browser, serve.url)
    try:
        tab.goto(f"/?env={staging},{production}")
        headers = tab.locator("table.pipeline thead th").all_inner_texts()
        assert [h.split("\n")[0] for h in headers] == ["app", staging, production]
        expect(tab.locator(f"{cell(staging, 'web')} .version")).to_have_text("2.0.0")
        expect(tab.locator(f"{cell(production, 'web')} .version")).to_have_text("1.0.0")
        expect(tab.locator(f"{cell(production, 'web')} .badge")).to_have_text("Ready")
        waiting = tab.locator(f"{cell(production, 'web')} .waiting-previous")
        expect(waiting).to_have_text(f"{staging} runs 2.0.0")
        assert tab.locator(f"{cell(staging, 'web')} .line").count() == 0  # nothing waits
        # A ConfigMap names no version: its revision, the only thing there is.
        expect(tab.locator(f"{cell(staging, 'settings')} .version")).to_have_text(first[:7])
        assert tab.evaluate(NO_SIDEWAYS_SCROLL)

        # Promote through the page: log in, press the cell's button; the cell follows live.
        tab.goto(f"/login?next=/%3Fenv%3D{staging},{production}")
        tab.get_by_label("Token").fill(serve.token)
        tab.get_by_role("button", name="Log in").click()
        expect(tab.locator("#user")).to_have_text("alice")
        wait_for(lambda: tab.evaluate("document.documentElement.dataset.stream") == "connected")
        tab.evaluate("window.__sameDocument = true")
        tab.locator(cell(production, "web")).get_by_role("button", name="promote").click()
        expect(tab.locator(".notice")).to_contain_text(f"promotion into {production}/web started")
        tab.goto(f"/?env={staging},{production}")
        wait_for(lambda: tab.evaluate("document.documentElement.dataset.stream") == "connected")
        tab.evaluate("window.__sameDocument = true")
        expect(tab.locator(f"{cell(production, 'web')} .version")).to_have_text(
            "2.0.0", timeout=120_000
        )
        expect(tab.locator(f"{cell(production, 'web')} .waiting-previous")).to_have_count(0)
        assert tab.evaluate("window.__sameDocument") is True  # updated without a reload
        live = kubectl_json(sandbox, "get", "deployment", "web", "-n", prod_ns)
        assert live is not None
        assert live["spec"]["template"]["spec"]["containers"][0]["image"].endswith("web:2.0.0")

        # Git ahead of the cluster: a commit nobody applied yet, seen by the dashboard's
        # own fetch of the branch, with the diff one click away.
        repo.write(f"{staging}/web/deploy.yaml", deployment("web", namespace, image="web:2.1.0"))
        repo.commit("Update from https://github.com/acme/web/commit/4567def")

        def git_ahead() -> bool:
            tab.goto(f"/?env={staging},{production}")
            ahead = tab.locator(f"{cell(staging, 'web')} .waiting-git")
            return ahead.count() == 1 and ahead.inner_text() == "git has 2.1.0"

        wait_for(git_ahead, timeout=60, what="git ahead of the cluster in staging")
        expect(tab.locator(f"{cell(staging, 'web')} .version")).to_have_text("2.0.0")
        tab.locator(cell(staging, "web")).get_by_role("link", name="diff").click()
        expect(tab.locator("#diff")).to_contain_text("web:2.1.0", timeout=60_000)

        # Where each version went: published to staging, promoted to production.
        journey = tab.locator("#journey-table")
        two = journey.locator('tr[data-version="2.0.0"]')
        expect(two.locator(f'td[data-environment="{staging}"]')).to_contain_text("publish")
        expect(two.locator(f'td[data-environment="{production}"]')).to_contain_text("promotion")
        expect(journey.locator('tr[data-version="2.1.0"]')).to_contain_text("publish")
    finally:
        tab.context.close()
        serve.stop()
        sandbox.run("kubectl", "delete", "namespace", prod_ns, "--wait=false", check=False)


ENVIRONMENTS = 12
APPS = 60
# Cellenics' tags: the ref, the commit and the build time, 69 characters.
LONG_TAG = "refs-heads-master-{sha}-1733050000"


def scale_repo(root: Path, prefix: str) -> tuple[ConfigRepo, list[str], str, str]:
    """A config repo of 12 environments x 60 apps with Cellenics-long tags: the first
    commit is what runs; a second gives the last environment newer versions, held there
    by its approval gate."""
    repo = ConfigRepo(root)
    names = [f"{prefix}-{index:02d}" for index in range(ENVIRONMENTS)]
    lines = ["environments:"]
    for name in names:
        gate = "\n    gates: [{type: approval}]" if name == names[-1] else ""
        lines.append(f"  - name: {name}\n    path: {name}{gate}")
    repo.write("conveyor.yaml", "\n".join(lines) + "\n")
    for env_index, name in enumerate(names):
        for index in range(APPS):
            app = f"service-with-a-long-name-{index:02d}"
            sha = f"{(index * 7 + env_index) % 16:x}" * 40
            tag = LONG_TAG.format(sha=sha) if index % 3 else f"1.{index}.{env_index // 4}"
            repo.write(
                f"{name}/{app}/deploy.yaml", deployment(app, "default", image=f"{app}:{tag}")
            )
    running = repo.commit("twelve environments")
    for index in range(0, APPS, 5):
        app = f"service-with-a-long-name-{index:02d}"
        repo.write(
            f"{names[-1]}/{app}/deploy.yaml", deployment(app, "default", image=f"{app}:9.9.9")
        )
    held = repo.commit("Update from https://github.com/acme/services/commit/89ab")
    return repo, names, running, held


def scale_statuses(names: list[str], running: str, held: str) -> list[AppStatus]:
    statuses = []
    for env_index, name in enumerate(names):
        statuses.append(
            AppStatus(
                scope=name,
                app="",
                kind=SOURCE_KIND,
                state=READY,
                reason="Fetched",
                attempted_revision=running,
                last_applied_revision=running,
            )
        )
        for index in range(APPS):
            state, reason, message, attempted = READY, "ReconciliationSucceeded", "", running
            if name == names[-1] and index % 5 == 0:
                state, reason, attempted = WAITING_FOR_GATE, "GateClosed", held
                message = "approval: 0 of 1 approvals of 9.9.9 for this environment"
            elif (index + env_index) % 17 == 0:
                state, reason = STALLED, "HealthCheckFailed"
                message = "Deployment/default/x: 0 of 1 replicas available " * 4
            statuses.append(
                AppStatus(
                    scope=name,
                    app=f"service-with-a-long-name-{index:02d}",
                    state=state,
                    reason=reason,
                    message=message,
                    attempted_revision=attempted,
                    last_applied_revision=running,
                    last_applied_time="2026-12-01T10:00:00Z",
                )
            )
    return statuses


def save_statuses(sandbox: SandboxHandle, statuses: list[AppStatus]) -> None:
    async def run() -> None:
        async with KubeClient(kubeconfig.load(sandbox.kubeconfig), max_connections=32) as kube:
            store = StatusStore(kube)
            await store.install()  # the CRD, on a sandbox nothing reconciled on yet
            await store.list_all()
            limit = asyncio.Semaphore(32)

            async def one(status: AppStatus) -> None:
                async with limit:
                    await store.save(status)

            await asyncio.gather(*(one(s) for s in statuses))

    # Playwright's sync API owns this thread's event loop: write from another thread.
    failures: list[BaseException] = []
    writer = threading.Thread(target=lambda: _collect(failures, lambda: asyncio.run(run())))
    writer.start()
    writer.join(timeout=120)
    assert not writer.is_alive(), "writing the statuses took over 120 s"
    if failures:
        raise failures[0]


def delete_statuses(sandbox: SandboxHandle, scopes: list[str]) -> None:
    """One delete of every status of the scopes (the shared sandbox keeps no leftovers)."""
    selector = f"conveyor.dev/scope in ({','.join(scopes)})"
    sandbox.run(
        "kubectl", "delete", "conveyorapps", "-n", "conveyor-system", "-l", selector, "--wait=false"
    )


def _collect(failures: list[BaseException], work: Callable[[], None]) -> None:
    try:
        work()
    except BaseException as error:  # re-raised in the test's thread
        failures.append(error)


def test_twelve_environments_by_sixty_apps_fit_1280_pixels(
    sandbox: SandboxHandle, tmp_path: Path, browser: Browser
) -> None:
    prefix = f"fit{uuid.uuid4().hex[:4]}"
    repo, names, running, held = scale_repo(tmp_path, prefix)
    statuses = scale_statuses(names, running, held)
    save_statuses(sandbox, statuses)
    serve = ServeProcess(sandbox, tmp_path, "--repo", repo.url)
    tab = open_page(browser, serve.url)
    query = "env=" + ",".join(names)
    try:
        tab.goto(f"/?{query}")
        assert tab.locator("table.pipeline tbody tr").count() == APPS
        assert tab.locator("table.pipeline thead th").count() == ENVIRONMENTS + 1
        # Versions come from git (after the first read); the page never scrolls sideways.
        app = "service-with-a-long-name-01"
        tag = LONG_TAG.format(sha=f"{7 % 16:x}" * 40)

        def versions_read() -> bool:
            tab.goto(f"/?{query}")
            return tab.locator(f"{cell(names[0], app)} .version").get_attribute("title") == tag

        wait_for(versions_read, timeout=60, what="versions read from git")
        version = tab.locator(f"{cell(names[0], app)} .version")
        assert version.inner_text() == f"master-{'7' * 7}-1733050000"  # the whole on hover
        box = version.bounding_box()
        assert box is not None and box["width"] < 1280 / ENVIRONMENTS
        gated = tab.locator(cell(names[-1], "service-with-a-long-name-05"))
        expect(gated.locator(".waiting-gate")).to_contain_text("approval: 0 of 1")
        approve = gated.locator("form", has=tab.get_by_role("button", name="approve"))
        expect(approve.locator('input[name="version"]')).to_have_value("9.9.9")  # held there
        assert tab.evaluate(NO_SIDEWAYS_SCROLL), tab.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-pipeline-12x60-1280.png"
        tab.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")

        tab.goto(f"/matrix?{query}")
        assert tab.locator("table.matrix tbody tr").count() == APPS
        assert tab.evaluate(NO_SIDEWAYS_SCROLL), tab.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        shot = ARTIFACTS / "dashboard-matrix-12x60-1280.png"
        tab.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
    finally:
        tab.context.close()
        serve.stop()
        delete_statuses(sandbox, names)
