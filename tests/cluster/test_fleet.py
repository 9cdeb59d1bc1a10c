"""One cluster per environment: `conveyor serve` and `conveyor get apps --all-environments`
read staging from one sandbox and production from another (conveyor.yaml's
`cluster.context`), act on each in its own cluster, and when one apiserver is stopped
show it unreachable while the other keeps updating live (Chromium, Playwright)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Page, expect, sync_playwright

from conveyor.sandbox import process
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, kubectl_json, wait_for
from tests.cluster.serve import ServeProcess
from tests.cluster.test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


@dataclass
class Fleet:
    first: SandboxHandle  # staging's cluster
    second: SandboxHandle  # production's
    both: SandboxHandle  # $KUBECONFIG naming both contexts, as a person's would
    repo: ConfigRepo
    staging: str
    production: str
    namespace: str
    serve: ServeProcess

    def context(self, handle: SandboxHandle) -> str:
        return f"sandbox-{handle.sandbox.name}"

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.serve.url}{path}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def matrix(self) -> dict[str, Any]:
        found: dict[str, Any] = self.get(f"/api/v1/matrix?env={self.staging}&env={self.production}")
        return found

    def all_environments(self) -> tuple[int, dict[str, Any]]:
        result = conveyor(
            self.both, "get", "apps", "--all-environments", "--repo", self.repo.url, "-o", "json"
        )
        assert result.stdout, result.stderr
        parsed: dict[str, Any] = json.loads(result.stdout)
        return result.returncode, parsed

    def reconcile(self, *environments: str) -> None:
        """One pass of each environment, all at once (each in its own cluster)."""
        passes = [
            subprocess.Popen(
                [sys.executable, "-m", "conveyor", "reconcile", "--repo", self.repo.url,
                 "--env", environment, "-o", "json"],
                env=self.both.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for environment in environments
        ]  # fmt: skip
        for one in passes:
            output, _ = one.communicate(timeout=600)
            assert one.returncode == 0, output


def _image(handle: SandboxHandle, namespace: str, name: str) -> str:
    live = kubectl_json(handle, "get", "deployment", name, "-n", namespace)
    return str(live["spec"]["template"]["spec"]["containers"][0]["image"]) if live else ""


@pytest.fixture(scope="module")
def fleet(
    sandbox: SandboxHandle, second_sandbox: SandboxHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    suffix = uuid.uuid4().hex[:6]
    staging, production, namespace = f"stg-{suffix}", f"prd-{suffix}", f"t-{suffix}"
    both = SandboxHandle(
        sandbox.sandbox,
        {
            **sandbox.env,
            "KUBECONFIG": os.pathsep.join(
                [str(sandbox.kubeconfig), str(second_sandbox.kubeconfig)]
            ),
        },
        sandbox.registry,
    )
    for handle in (sandbox, second_sandbox):
        handle.run("kubectl", "create", "namespace", namespace)
    repo = ConfigRepo(tmp)
    project = {
        "environments": [
            {
                "name": name,
                "path": name,
                "branch": "main",
                "cluster": {"context": f"sandbox-{handle.sandbox.name}"},
            }
            for name, handle in ((staging, sandbox), (production, second_sandbox))
        ]
    }
    repo.write("conveyor.yaml", yaml.safe_dump(project, sort_keys=False))
    for name, tag in ((staging, "1.1.0"), (production, "1.0.0")):
        for app in ("web", "api"):
            repo.write(
                f"{name}/{app}/deploy.yaml", deployment(app, namespace, image=f"{app}:{tag}")
            )
    repo.commit("two environments, two clusters")
    serve = ServeProcess(both, tmp, "--repo", repo.url)
    found = Fleet(sandbox, second_sandbox, both, repo, staging, production, namespace, serve)
    found.reconcile(staging, production)
    yield found
    serve.stop()
    for handle in (sandbox, second_sandbox):
        handle.run("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


def test_each_environment_is_read_from_its_own_cluster(fleet: Fleet) -> None:
    assert _image(fleet.first, fleet.namespace, "web").endswith("web:1.1.0")
    assert _image(fleet.second, fleet.namespace, "web").endswith("web:1.0.0")
    # production's apps are not in staging's cluster at all, nor the other way round
    capp = f"{fleet.production}.web"
    assert kubectl_json(fleet.first, "get", "conveyorapp", "-n", "conveyor-system", capp) is None

    def both_shown() -> dict[str, Any] | None:
        matrix = fleet.matrix()
        return matrix if len(matrix["cells"]) == 4 else None

    matrix = wait_for(both_shown, timeout=30, what="four cells")
    environments = {e["name"]: e for e in matrix["environments"]}
    assert [e["name"] for e in matrix["environments"]] == [fleet.staging, fleet.production]
    assert environments[fleet.staging]["cluster"] == fleet.context(fleet.first)
    assert environments[fleet.production]["cluster"] == fleet.context(fleet.second)
    assert all(e["reachable"] for e in environments.values())
    versions = {(c["environment"], c["app"]): c["version"] for c in matrix["cells"]}
    assert versions[(fleet.production, "web")] == "1.0.0"
    assert versions[(fleet.staging, "api")] == "1.1.0"
    assert not any(c["stale"] for c in matrix["cells"])
    clusters = {c["name"]: c for c in fleet.get("/api/v1/clusters")}
    for handle, environment in ((fleet.first, fleet.staging), (fleet.second, fleet.production)):
        cluster = clusters[fleet.context(handle)]
        assert cluster["reachable"] and cluster["lastRead"], cluster
        assert cluster["environments"] == [environment]

    # The dashboard's numbers are those of `conveyor get apps -o json` on each cluster.
    for handle, environment in ((fleet.first, fleet.staging), (fleet.second, fleet.production)):
        listed = conveyor(
            fleet.both, "get", "apps", "--env", environment, "--context", fleet.context(handle),
            "-o", "json",
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        items = json.loads(listed.stdout)["items"]
        cells = [c for c in matrix["cells"] if c["environment"] == environment]
        assert environments[environment]["apps"] == len(items) == len(cells) == 2
        assert environments[environment]["ready"] == sum(i["ready"] for i in items) == 2
        assert {(i["name"], i["state"], i["revision"]) for i in items} == {
            (c["app"], c["state"], c["revision"]) for c in cells
        }

    code, every = fleet.all_environments()
    assert code == 0, every
    assert [
        (e["name"], e["cluster"], e["reachable"], e["apps"]) for e in every["environments"]
    ] == [
        (fleet.staging, fleet.context(fleet.first), True, 2),
        (fleet.production, fleet.context(fleet.second), True, 2),
    ]
    assert {(i["scope"], i["name"], i["cluster"]) for i in every["items"]} == {
        (c["environment"], c["app"], environments[c["environment"]]["cluster"])
        for c in matrix["cells"]
    }


def test_actions_go_to_the_cluster_of_the_environment(fleet: Fleet) -> None:
    url = f"{fleet.serve.url}/api/v1/environments/{fleet.production}/apps/web/actions"
    response = httpx.post(f"{url}/suspend", headers=fleet.serve.auth, timeout=30)
    assert response.status_code == 200, response.text
    name = f"{fleet.production}.web"
    live = kubectl_json(fleet.second, "get", "conveyorapp", "-n", "conveyor-system", name)
    assert live is not None and live["spec"]["suspend"] is True
    response = httpx.post(f"{url}/resume", headers=fleet.serve.auth, timeout=30)
    assert response.status_code == 200, response.text
    live = kubectl_json(fleet.second, "get", "conveyorapp", "-n", "conveyor-system", name)
    assert live is not None and not live["spec"].get("suspend")

    # Reconcile now: a pass of production, in production's cluster (no agent: it takes
    # the Lease there).
    fleet.repo.write(
        f"{fleet.production}/web/deploy.yaml", deployment("web", fleet.namespace, image="web:1.0.1")
    )
    fleet.repo.commit("production: web 1.0.1")
    response = httpx.post(
        f"{fleet.serve.url}/api/v1/environments/{fleet.production}/actions/reconcile",
        headers=fleet.serve.auth,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    wait_for(
        lambda: _image(fleet.second, fleet.namespace, "web").endswith("web:1.0.1"),
        timeout=60,
        what="web 1.0.1 in production's cluster",
    )
    assert kubectl_json(
        fleet.second, "get", "lease", "-n", "conveyor-system", f"conveyor-{fleet.production}"
    )
    assert not kubectl_json(
        fleet.first, "get", "lease", "-n", "conveyor-system", f"conveyor-{fleet.production}"
    )


@pytest.fixture
def page(fleet: Fleet) -> Iterator[Page]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: `make browser` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(
            base_url=fleet.serve.url, viewport={"width": 1280, "height": 900}
        )
        tab = context.new_page()
        tab.set_default_timeout(30_000)
        yield tab
        context.close()
        browser.close()
    print(fleet.serve.log.read_text()[-6000:])


def test_a_stopped_cluster_shows_unreachable_while_the_other_updates_live(
    fleet: Fleet, page: Page
) -> None:
    # The matrix and the pipeline (the front page), side by side: both read the fleet.
    tab = page
    tab.goto(f"/matrix?env={fleet.staging}&env={fleet.production}")
    cell = f'[id="cell-{fleet.staging}.api"]'
    expect(tab.locator(f"{cell} .version")).to_have_text("1.1.0")
    expect(tab.locator(f'[id="cell-{fleet.production}.api"] .version')).to_have_text("1.0.0")
    pipe = tab.context.new_page()
    pipe.set_default_timeout(30_000)
    pipe.goto(f"/?env={fleet.staging}&env={fleet.production}")
    pipe_cell = f'[id="pipe-{fleet.staging}.api"]'
    expect(pipe.locator(f"{pipe_cell} .version")).to_have_text("1.1.0")
    expect(pipe.locator(f'[id="pipe-{fleet.production}.api"] .version')).to_have_text("1.0.0")
    for shown in (tab, pipe):
        wait_for(
            lambda shown=shown: (
                shown.evaluate("document.documentElement.dataset.stream") == "connected"
            )
        )
        shown.evaluate("window.__sameDocument = true")

    box = fleet.second.sandbox
    state = box.state()
    assert state is not None
    apiserver = next(c for c in state.components if c.name == "kube-apiserver")
    process.stop(apiserver.process)
    try:
        header = tab.locator(f'[id="env-{fleet.production}"]')
        expect(header.locator(".cluster-down")).to_contain_text("unreachable", timeout=20_000)
        expect(tab.locator(f'[id="cell-{fleet.production}.api"]')).to_have_class(
            "cell state-ready stale"
        )
        pipe_header = pipe.locator(f'[id="env-{fleet.production}"]')
        expect(pipe_header.locator(".cluster-down")).to_contain_text("unreachable")
        expect(pipe.locator(f'[id="pipe-{fleet.production}.api"]')).to_have_class(
            re.compile(r"\bstale\b")
        )
        code, every = fleet.all_environments()
        assert code == 1, every
        reads = {e["name"]: e for e in every["environments"]}
        assert reads[fleet.production]["reachable"] is False and reads[fleet.production]["error"]
        assert reads[fleet.staging]["reachable"] is True and reads[fleet.staging]["apps"] == 2
        refused = httpx.post(
            f"{fleet.serve.url}/api/v1/environments/{fleet.production}/apps/api/actions/suspend",
            headers=fleet.serve.auth,
            timeout=30,
        )
        assert refused.status_code == 503 and "unreachable" in refused.text, refused.text

        # staging's cluster keeps streaming
        fleet.repo.write(
            f"{fleet.staging}/api/deploy.yaml",
            deployment("api", fleet.namespace, image="api:1.2.0"),
        )
        fleet.repo.commit("staging: api 1.2.0")
        fleet.reconcile(fleet.staging)
        expect(tab.locator(f"{cell} .version")).to_have_text("1.2.0", timeout=15_000)
        expect(pipe.locator(f"{pipe_cell} .version")).to_have_text("1.2.0", timeout=15_000)
        assert tab.evaluate("window.__sameDocument") is True
        assert pipe.evaluate("window.__sameDocument") is True
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "dashboard-cluster-unreachable.png"), full_page=True)
        pipe.screenshot(path=str(ARTIFACTS / "pipeline-cluster-unreachable.png"), full_page=True)
    finally:
        box.restart_component("kube-apiserver")
    expect(tab.locator(f'[id="env-{fleet.production}"] .cluster-down')).to_have_count(
        0, timeout=30_000
    )
    assert tab.evaluate("window.__sameDocument") is True
