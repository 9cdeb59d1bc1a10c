"""The pipeline view in Debian's Chromium, driven by Playwright, on the sandbox: two
environments of one conveyor.yaml reconciled for real show what waits (a newer version
upstream, git ahead of the cluster) with their actions, a promotion through the page
reaches the cluster and the page follows live, the release notes between two
environments' versions are one click away; and 12 environments x 60 apps (statuses
written directly, git read for their versions) stay inside a 1280 px window on both
views, with a screenshot kept as an artifact."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, kubectl_json, wait_for
from tests.cluster.scale import APPS, ENVIRONMENTS, HELD, Fleet, app_name, tag
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


def web_repo(root: Path) -> tuple[str, dict[str, str]]:
    """The app's own repository: the commit 1.0.0 was built from, then a pull request
    (squash-merged) that 2.0.0 was built from."""
    bare, work = root / "web.git", root / "web"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])
    run_git(["init", "--quiet", "--initial-branch", "main", str(work)])
    built = {}
    for version, subject in (
        ("1.0.0", "Start the web app"),
        ("2.0.0", "Show the build time (#12)"),
    ):
        (work / "app.py").write_text(f"VERSION = {version!r}\n")
        run_git(["add", "--all"], cwd=work)
        run_git(["-c", "user.name=dev", "-c", "user.email=d@d", "commit", "-qm", subject], cwd=work)
        built[version] = run_git(["rev-parse", "HEAD"], cwd=work).strip()
    run_git(["push", "--quiet", str(bare), "HEAD:main"], cwd=work)
    return str(bare), built


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
    app_repo, built = web_repo(tmp_path)
    repo.write(f"{staging}/web/deploy.yaml", deployment("web", namespace, image="web:1.0.0"))
    repo.write(f"{production}/web/deploy.yaml", deployment("web", prod_ns, image="web:1.0.0"))
    settings = "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {}}}\n"
    repo.write(f"{staging}/settings/cm.yaml", settings.format(namespace))
    repo.write(f"{production}/settings/cm.yaml", settings.format(prod_ns))
    repo.commit(f"Update from {app_repo}/commit/{built['1.0.0']}")
    repo.write(f"{staging}/web/deploy.yaml", deployment("web", namespace, image="web:2.0.0"))
    first = repo.commit(f"Update from {app_repo}/commit/{built['2.0.0']}")
    for env in (staging, production):
        result = conveyor(sandbox, "reconcile", "--repo", repo.url, "--env", env)
        assert result.returncode == 0, result.stdout + result.stderr
    serve = ServeProcess(sandbox, tmp_path, "--repo", repo.url)
    tab = open_page(browser, serve.url)
    try:
        tab.goto(f"/?env={staging},{production}")
        # A web-first assertion, which retries: read once, under load in CI the headers
        # were once not laid out yet and innerText fell back to their raw text.
        expect(tab.locator("table.pipeline thead th.app")).to_have_text("app")
        expect(tab.locator("table.pipeline thead th .name")).to_have_text([staging, production])
        expect(tab.locator(f"{cell(staging, 'web')} .version")).to_have_text("2.0.0")
        expect(tab.locator(f"{cell(production, 'web')} .version")).to_have_text("1.0.0")
        expect(tab.locator(f"{cell(production, 'web')} .badge")).to_have_text("Ready")
        waiting = tab.locator(f"{cell(production, 'web')} .waiting-previous")
        expect(waiting).to_have_text(f"{staging} runs 2.0.0")
        assert tab.locator(f"{cell(staging, 'web')} .line").count() == 0  # nothing waits
        # A ConfigMap names no version: its revision, the only thing there is.
        expect(tab.locator(f"{cell(staging, 'settings')} .version")).to_have_text(first[:7])
        assert tab.evaluate(NO_SIDEWAYS_SCROLL)

        # The API says the same, in the same model.
        shaped = httpx.get(f"{serve.url}/api/v1/pipeline", params={"env": [staging, production]})
        cells = {(c["environment"], c["app"]): c for c in shaped.json()["cells"]}
        prod_web = cells[(production, "web")]
        assert prod_web["version"] == "1.0.0" and prod_web["promoteFrom"] == staging
        assert [w["kind"] for w in prod_web["waiting"]] == ["previous"]

        # The release notes between the two environments' versions, one click away.
        tab.locator(f"{cell(production, 'web')} a.version").click()
        tab.get_by_role("link", name=f"Release notes: what {staging} runs (2.0.0)").click()
        expect(tab.locator("#notes")).to_contain_text("#12 Show the build time")
        assert "Start the web app" not in tab.locator("#notes").inner_text()  # 1.0.0 had it

        # Promote through the page: log in, press the cell's button; the cell follows live.
        tab.goto(f"/login?next=/%3Fenv%3D{staging},{production}")
        tab.get_by_label("Token").fill(serve.token)
        tab.get_by_role("button", name="Log in").click()
        expect(tab.locator("#user")).to_have_text("alice")
        wait_for(lambda: tab.evaluate("document.documentElement.dataset.stream") == "connected")
        tab.evaluate("window.__sameDocument = true")
        tab.locator(cell(production, "web")).get_by_role("button", name="promote").click()
        expect(tab.locator(".notice")).to_contain_text(
            f"promotion into {production}/web started", timeout=60_000
        )
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
        run_git(["pull", "--quiet", "origin", "main"], cwd=repo.work)  # the promotion
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


def test_twelve_environments_by_sixty_apps_fit_1280_pixels(
    sandbox: SandboxHandle, tmp_path: Path, browser: Browser
) -> None:
    fleet = Fleet(tmp_path, f"fit{uuid.uuid4().hex[:4]}")
    names = fleet.names
    try:
        fleet.save(sandbox.kubeconfig)
        serve = ServeProcess(sandbox, tmp_path, "--repo", fleet.repo.url)
    except BaseException:
        fleet.delete(sandbox.kubeconfig)
        raise
    tab = open_page(browser, serve.url)
    query = "env=" + ",".join(names)
    try:
        tab.goto(f"/?{query}")
        assert tab.locator("table.pipeline tbody tr").count() == APPS
        assert tab.locator("table.pipeline thead th").count() == ENVIRONMENTS + 1
        # Versions are read from git in the background (once per folder), and the page
        # redrawn as they come; the held version last, of the last environment's commit.
        gated = tab.locator(cell(names[-1], app_name(5)))
        approve = gated.get_by_role("button", name="approve")
        expect(approve).to_have_attribute("value", HELD, timeout=120_000)
        long_one = tab.locator(f"{cell(names[0], app_name(1))} .version")
        expect(long_one).to_have_attribute("title", tag(0, 1), timeout=60_000)
        expect(long_one).to_have_text(f"master-{'7' * 7}-1733050000")  # whole on hover
        # Awaited like any locator action (a live redraw may swap the element meanwhile).
        width = long_one.evaluate("element => element.getBoundingClientRect().width")
        assert width < 1280 / ENVIRONMENTS
        expect(gated.locator(".waiting-gate")).to_contain_text("approval: 0 of 1")
        upstream = tab.locator(f"{cell(names[1], app_name(1))} .waiting-previous")
        expect(upstream).to_have_text(f"{names[0]} runs master-{'7' * 7}-1733050000")
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
        fleet.delete(sandbox.kubeconfig)
