"""The JSON API of a real `conveyor serve` on the sandbox: every endpoint, bad input,
tokens, cross-site refusals, and actions that reach the cluster and the audit trail."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster
API = "/api/v1"


@dataclass
class Setup:
    sandbox: SandboxHandle
    repo: ConfigRepo
    path: str
    scope: str
    namespace: str
    serve: ServeProcess

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.serve.url}{path}", timeout=120, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.serve.url}{path}", timeout=120, **kwargs)  # type: ignore[arg-type]

    def app_path(self, app: str, suffix: str = "") -> str:
        return f"{API}/environments/{self.scope}/apps/{app}{suffix}"


def save_statuses(sandbox: SandboxHandle, *statuses: AppStatus) -> None:
    async def run() -> None:
        async with KubeClient(kubeconfig.load(sandbox.kubeconfig)) as kube:
            store = StatusStore(kube)
            await store.install()
            await store.list_all()
            for status in statuses:
                await store.save(status)

    asyncio.run(run())


@pytest.fixture(scope="module")
def setup(sandbox: SandboxHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("web-api")
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    sandbox.run("kubectl", "create", "namespace", namespace)
    repo = ConfigRepo(tmp)
    path = f"envs/web-{uuid.uuid4().hex[:6]}"
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace, image="web:1.0.0"))
    repo.write(f"{path}/worker/deploy.yaml", deployment("worker", namespace, image="worker:2.1"))
    repo.commit("initial apps")
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace, image="web:1.1.0"))
    repo.commit("Update from https://github.com/acme/web/commit/0123abc")
    code, report = reconcile_json(sandbox, repo, path)
    assert code == 0, report
    serve = ServeProcess(sandbox, tmp, "--repo", repo.url)
    yield Setup(sandbox, repo, path, app_name(path.replace("/", "-")), namespace, serve)
    serve.stop()
    sandbox.run("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


def test_matrix_shows_versions_states_and_revisions(setup: Setup) -> None:
    matrix = setup.get(f"{API}/matrix").json()
    cells = {c["app"]: c for c in matrix["cells"] if c["environment"] == setup.scope}
    assert cells["web"]["version"] == "1.1.0"
    assert cells["worker"]["version"] == "2.1"
    assert cells["web"]["state"] == "Ready"
    assert cells["web"]["lastAppliedTime"]
    assert cells["web"]["drift"] is None
    environment = next(e for e in matrix["environments"] if e["name"] == setup.scope)
    assert environment["apps"] == 2
    assert environment["revision"] == cells["web"]["revision"]
    assert {"web", "worker"} <= set(matrix["apps"])
    listed = setup.get(f"{API}/environments").json()
    assert setup.scope in {e["name"] for e in listed}
    apps = setup.get(f"{API}/environments/{setup.scope}/apps").json()
    assert [a["app"] for a in apps] == ["web", "worker"]


def test_app_detail_history_objects_and_events(setup: Setup) -> None:
    detail = setup.get(setup.app_path("web")).json()
    assert detail["state"] == "Ready"
    assert detail["inventory"] == [
        {"apiVersion": "apps/v1", "kind": "Deployment", "namespace": setup.namespace, "name": "web"}
    ]
    assert set(detail["actions"]) == {"reconcile", "suspend", "promote", "approve", "rollback"}

    history = setup.get(setup.app_path("web", "/history")).json()
    assert [(c["change"], c["version"]) for c in history["git"]] == [
        ("publish", "1.1.0"),
        ("manual", "1.0.0"),
    ]
    assert history["git"][0]["author"] == "test <t@t>"

    (obj,) = setup.get(setup.app_path("web", "/objects")).json()
    assert (obj["kind"], obj["name"], obj["health"]) == ("Deployment", "web", "Current")

    events = setup.get(setup.app_path("web", "/events")).json()
    assert any(e["reason"] == "ReconciliationSucceeded" for e in events)


def test_diff_against_the_live_cluster(setup: Setup) -> None:
    diff = setup.get(setup.app_path("worker", "/diff")).json()
    assert diff["changes"] == [] and diff["error"] is None
    setup.repo.write(
        f"{setup.path}/worker/deploy.yaml",
        deployment("worker", setup.namespace, image="worker:2.2"),
    )
    setup.repo.commit("bump worker, not reconciled yet")
    time.sleep(5.5)  # the dashboard's clone is refreshed at most every 5 s
    diff = setup.get(setup.app_path("worker", "/diff")).json()
    (change,) = diff["changes"]
    assert change["action"] == "update"
    lines = change["diff"].splitlines()
    assert any(line.startswith("+") and "registry.local/worker:2.2" in line for line in lines)
    assert any(line.startswith("-") and "registry.local/worker:2.1" in line for line in lines)


def test_gates_show_what_an_environment_waits_for(setup: Setup) -> None:
    scope = f"gated-{uuid.uuid4().hex[:6]}"
    save_statuses(
        setup.sandbox,
        AppStatus(
            scope=scope,
            app="api",
            state=WAITING_FOR_GATE,
            reason="GatePending",
            message="waiting for approval by release-managers; queue jobs not empty (3)",
            attempted_revision="c" * 40,
        ),
    )
    gates = wait_for(
        lambda: [g for g in setup.get(f"{API}/gates").json() if g["environment"] == scope],
        what="the gate to show",
    )
    assert gates[0]["app"] == "api"
    assert "approval by release-managers" in gates[0]["message"]
    cell = setup.get(f"{API}/environments/{scope}/apps/api").json()
    assert cell["state"] == WAITING_FOR_GATE


def test_shards_show_their_load_and_the_apps_each_owns(setup: Setup) -> None:
    shards = f"{API}/environments/{setup.scope}/shards"
    assert setup.get(shards).json() == []  # unsharded
    shard_lease(setup.sandbox, setup.scope, "agent-a", apps=1, pass_seconds=2.25)
    shard_lease(setup.sandbox, setup.scope, "agent-b", apps=1, pass_seconds=0.5)
    # A Lease not renewed within its duration is no live shard.
    shard_lease(setup.sandbox, setup.scope, "agent-c", apps=2, pass_seconds=9, renewed_ago=900)
    try:
        shown = setup.get(shards).json()
        assert [s["shard"] for s in shown] == ["agent-a", "agent-b"]
        owners = {app: owner_of(app, ["agent-a", "agent-b"]) for app in ("web", "worker")}
        assert [s["apps"] for s in shown] == [
            sum(o == shard for o in owners.values()) for shard in ("agent-a", "agent-b")
        ]
        assert [(s["lastPassApps"], s["passSeconds"]) for s in shown] == [(1, 2.25), (1, 0.5)]
        assert setup.get(f"{API}/environments/nowhere/shards").status_code == 404
        page = setup.get(f"/environments/{setup.scope}").text
        assert 'id="shards"' in page and "agent-a" in page and "2.2 s" in page
        assert "agent-c" not in page
    finally:
        delete_shard_leases(setup.sandbox, setup.scope)
    assert 'id="shards"' not in setup.get(f"/environments/{setup.scope}").text


def test_unknown_environment_app_and_action_are_404_with_a_clear_message(setup: Setup) -> None:
    response = setup.get(f"{API}/environments/nowhere/apps")
    assert response.status_code == 404
    assert "unknown environment 'nowhere'" in response.json()["detail"]
    response = setup.get(setup.app_path("ghost"))
    assert response.status_code == 404
    assert response.json()["detail"].startswith(
        f"unknown app 'ghost' in environment '{setup.scope}'"
    )
    assert "web" in response.json()["detail"]
    for suffix in ("/history", "/diff", "/objects", "/events"):
        assert setup.get(setup.app_path("ghost", suffix)).status_code == 404
    response = setup.post(
        setup.app_path("web", "/actions/explode"), headers=setup.serve.auth, json={}
    )
    assert response.status_code == 404
    assert "unknown action 'explode'" in response.json()["detail"]
    response = setup.post(
        f"{API}/environments/nowhere/apps/web/actions/suspend", headers=setup.serve.auth
    )
    assert response.status_code == 404
    page = setup.get("/environments/nowhere/apps/web")
    assert page.status_code == 404 and "unknown environment" in page.text


def test_malformed_bodies_are_422(setup: Setup) -> None:
    url = setup.app_path("web", "/actions/suspend")
    headers = {**setup.serve.auth, "Content-Type": "application/json"}
    for body in ("{not json", '{"reason": 5}', '{"colour": "red"}', '{"params": ["a"]}', "[]"):
        response = setup.post(url, headers=headers, content=body)
        assert response.status_code == 422, (body, response.text)
    assert kubectl_json(
        setup.sandbox, "get", "conveyorapp", "-n", "conveyor-system", f"{setup.scope}.web"
    )["spec"].get("suspend") in (None, False)


def test_actions_need_a_valid_token_and_a_same_site_origin(setup: Setup) -> None:
    url = setup.app_path("web", "/actions/suspend")
    response = setup.post(url)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"]
    assert (
        setup.post(url, headers={"Authorization": "Bearer wrong-token-123456"}).status_code == 403
    )
    assert setup.post(url, headers={"Authorization": "Basic abc"}).status_code == 401
    evil = {**setup.serve.auth, "Origin": "https://evil.example"}
    response = setup.post(url, headers=evil)
    assert response.status_code == 403 and "cross-site" in response.json()["detail"]
    sneaky = {**setup.serve.auth, "Sec-Fetch-Site": "cross-site"}
    assert setup.post(url, headers=sneaky).status_code == 403
    live = kubectl_json(
        setup.sandbox, "get", "conveyorapp", "-n", "conveyor-system", f"{setup.scope}.web"
    )
    assert live is not None and not live["spec"].get("suspend")
    assert "action refused" in setup.serve.log.read_text()


def test_suspend_and_resume_reach_the_cluster_with_who_did_it(setup: Setup) -> None:
    name = f"{setup.scope}.worker"
    response = setup.post(
        setup.app_path("worker", "/actions/suspend"),
        headers={**setup.serve.auth, "Origin": setup.serve.url},
        json={"reason": "investigating an incident"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["actor"] == "alice"
    live = kubectl_json(setup.sandbox, "get", "conveyorapp", "-n", "conveyor-system", name)
    assert live is not None and live["spec"]["suspend"] is True
    cell = wait_for(
        lambda: setup.get(setup.app_path("worker")).json()["suspended"], what="suspended status"
    )
    assert cell
    assert setup.get(setup.app_path("worker")).json()["actions"] == [
        "reconcile",
        "resume",
        "promote",
        "approve",
        "rollback",
    ]
    # Suspending twice is not an action that applies.
    again = setup.post(setup.app_path("worker", "/actions/suspend"), headers=setup.serve.auth)
    assert again.status_code == 409

    events = setup.get(setup.app_path("worker", "/events")).json()
    requested = [e for e in events if e["reason"] == "SuspendRequested"]
    assert requested and "by alice via api" in requested[0]["message"]
    assert "investigating an incident" in requested[0]["message"]
    audit = [
        json.loads(line)
        for line in setup.serve.log.read_text().splitlines()
        if '"conveyor.audit"' in line
    ]
    assert any(a.get("action") == "suspend" and a.get("actor") == "alice" for a in audit)

    response = setup.post(setup.app_path("worker", "/actions/resume"), headers=setup.serve.auth)
    assert response.status_code == 200
    live = kubectl_json(setup.sandbox, "get", "conveyorapp", "-n", "conveyor-system", name)
    assert live is not None and live["spec"]["suspend"] is False


def test_reconcile_now_runs_a_pass_in_the_background(setup: Setup) -> None:
    setup.repo.write(
        f"{setup.path}/web/deploy.yaml", deployment("web", setup.namespace, image="web:1.2.0")
    )
    setup.repo.commit("Update images\n\nregistry.local/web: 1.1.0 -> 1.2.0")
    response = setup.post(setup.app_path("web", "/actions/reconcile"), headers=setup.serve.auth)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] is True

    def image() -> str | None:
        live = kubectl_json(setup.sandbox, "get", "deployment", "web", "-n", setup.namespace)
        return live["spec"]["template"]["spec"]["containers"][0]["image"] if live else None

    wait_for(lambda: image() == "registry.local/web:1.2.0", timeout=120, what="the new image")
    wait_for(
        lambda: setup.get(setup.app_path("web")).json()["version"] == "1.2.0",
        what="the new version in the API",
    )
    history = setup.get(setup.app_path("web", "/history")).json()
    assert history["git"][0]["change"] == "image-automation"
    # The whole environment, too.
    response = setup.post(
        f"{API}/environments/{setup.scope}/actions/reconcile", headers=setup.serve.auth
    )
    assert response.status_code in (202, 409), response.text
    # Suspend acts on apps only.
    response = setup.post(
        f"{API}/environments/{setup.scope}/actions/suspend", headers=setup.serve.auth
    )
    assert response.status_code == 400


def test_stream_pushes_status_changes(setup: Setup) -> None:
    scope = f"stream-{uuid.uuid4().hex[:6]}"
    received: list[dict[str, object]] = []

    def listen() -> None:
        with httpx.stream("GET", f"{setup.serve.url}{API}/stream", timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "status":
                    data = json.loads(line[6:])
                    cell = data.get("cell") or {}
                    if str(data["name"]).startswith(scope) and cell.get("state") == "Ready":
                        received.append(data)  # (the object is created before its status)
                        return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    time.sleep(1.0)
    save_statuses(setup.sandbox, AppStatus(scope=scope, app="api", state="Ready", reason="Ok"))
    thread.join(timeout=20)
    assert received, "no status event on the stream"
    cell = received[0]["cell"]
    assert isinstance(cell, dict) and cell["app"] == "api" and cell["state"] == "Ready"


def test_openapi_describes_the_api(setup: Setup) -> None:
    spec = setup.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        f"{API}/matrix",
        f"{API}/environments",
        f"{API}/environments/{{environment}}/apps/{{app}}",
        f"{API}/environments/{{environment}}/apps/{{app}}/history",
        f"{API}/environments/{{environment}}/apps/{{app}}/diff",
        f"{API}/environments/{{environment}}/apps/{{app}}/objects",
        f"{API}/environments/{{environment}}/apps/{{app}}/events",
        f"{API}/environments/{{environment}}/apps/{{app}}/actions/{{action}}",
        f"{API}/environments/{{environment}}/actions/{{action}}",
        f"{API}/gates",
        f"{API}/actions",
    ):
        assert path in paths, path
    assert (
        "422"
        in paths[f"{API}/environments/{{environment}}/apps/{{app}}/actions/{{action}}"]["post"][
            "responses"
        ]
    )
    assert "/" not in paths  # pages stay out of the API description
    actions = setup.get(f"{API}/actions").json()
    assert {a["name"] for a in actions} >= {"reconcile", "suspend", "resume"}


def test_pages_log_in_with_the_token_and_forms_need_csrf(setup: Setup) -> None:
    action = f"{setup.serve.url}/environments/{setup.scope}/apps/worker/actions/suspend"
    with httpx.Client(base_url=setup.serve.url, timeout=60) as browser:
        assert browser.post(action, data={"csrf": "x"}).status_code == 401
        bad = browser.post("/login", data={"token": "not-the-token-at-all"})
        assert bad.status_code == 403 and "Invalid token" in bad.text
        login = browser.post("/login", data={"token": setup.serve.token, "next": "//evil"})
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        page = browser.get(f"/environments/{setup.scope}/apps/worker")
        assert page.status_code == 200 and "alice" in page.text
        csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert browser.post(action, data={}).status_code == 403
        assert browser.post(action, data={"csrf": "forged"}).status_code == 403
        cross = browser.post(action, data={"csrf": csrf}, headers={"Origin": "http://evil"})
        assert cross.status_code == 403
        done = browser.post(action, data={"csrf": csrf}, headers={"Origin": setup.serve.url})
        assert done.status_code == 303, done.text
        assert "suspended" in done.headers["location"]
    live = kubectl_json(
        setup.sandbox, "get", "conveyorapp", "-n", "conveyor-system", f"{setup.scope}.worker"
    )
    assert live is not None and live["spec"]["suspend"] is True
    events = setup.get(setup.app_path("worker", "/events")).json()
    assert any("by alice via dashboard" in e["message"] for e in events)
    setup.post(setup.app_path("worker", "/actions/resume"), headers=setup.serve.auth)


def test_without_a_token_file_the_dashboard_is_read_only(setup: Setup, tmp_path: Path) -> None:
    readonly = ServeProcess(setup.sandbox, tmp_path, tokens=False)
    try:
        response = httpx.post(
            f"{readonly.url}{setup.app_path('web', '/actions/suspend')}",
            headers={"Authorization": "Bearer anything-at-all-123"},
        )
        assert response.status_code == 403 and "disabled" in response.json()["detail"]
        assert httpx.get(f"{readonly.url}{API}/matrix").status_code == 200
    finally:
        readonly.stop()


def test_every_response_carries_the_security_headers(setup: Setup) -> None:
    for path in ("/", "/login", f"{API}/matrix", "/static/app.js", "/no-such-page"):
        headers = setup.get(path).headers
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, path
        assert "unsafe-inline" not in policy, path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path


def test_api_docs_are_served_without_a_cdn(setup: Setup) -> None:
    docs = setup.get("/api/docs")
    assert docs.status_code == 200
    assert "http" not in docs.text.replace('charset="utf-8"', "")  # no absolute URL at all
    assert "script-src 'self'" in docs.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="([^"]+)"', docs.text):
        assert asset.startswith("/"), asset
        assert setup.get(asset).status_code == 200, asset


def test_wrong_tokens_are_limited_per_client(setup: Setup, tmp_path: Path) -> None:
    # A server of its own: the module's server must keep accepting this client.
    server = ServeProcess(setup.sandbox, tmp_path)
    url = f"{server.url}{setup.app_path('web', '/actions/reconcile')}"
    try:
        wrong = {"Authorization": "Bearer " + "g" * 40}
        statuses = [httpx.post(url, headers=wrong).status_code for _ in range(5)]
        assert statuses == [403] * 5
        throttled = httpx.post(url, headers=server.auth)  # even the right token, for now
        assert throttled.status_code == 429
        assert int(throttled.headers["Retry-After"]) >= 1
        assert "too many wrong tokens" in throttled.json()["detail"]
        login = httpx.post(f"{server.url}/login", data={"token": server.token})
        assert login.status_code == 429 and "try again in" in login.text
        assert "too many wrong tokens" in server.log.read_text()
    finally:
        server.stop()


def test_cells_by_name_helper_matches_cli(setup: Setup) -> None:
    """The API reads the same status as `conveyor get apps`."""
    from tests.cluster.gitops import conveyor

    result = conveyor(setup.sandbox, "get", "apps", "--scope", setup.scope, "-o", "json")
    cli = by_name(json.loads(result.stdout))
    api = {c["app"]: c for c in setup.get(f"{API}/environments/{setup.scope}/apps").json()}
    assert set(cli) == set(api)
    for app, item in cli.items():
        assert (item["state"], item["revision"]) == (api[app]["state"], api[app]["revision"])
