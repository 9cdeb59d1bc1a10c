"""An agent on a production environment guarded by all four kinds of gate that judge a
version (approval, soak, healthy, http), while staging has moved ahead: a rollback goes
through the agent and stays (Helm's history with it), a change that keeps the release
applies, a held app is kept to what it applied, and statuses say when a newer revision
is held, rolling out or failing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.gitops import (
    ConfigRepo,
    chart_repo,
    conveyor,
    deployment,
    flux_v1_release,
    kubectl_json,
    wait_for,
)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


class _Open(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"running": 0}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def jobs_status() -> Iterator[str]:
    """A status endpoint for the http gate: no job running."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Open)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/status"
    server.shutdown()


class Environments:
    """staging and production of one config repo on the sandbox, each in namespaces of
    its own; a plain app `ui` and a Helm app `api` in both."""

    def __init__(self, sandbox: SandboxHandle, root: Path, gate_url: str) -> None:
        self.sandbox = sandbox
        self.root = root
        self.repo = ConfigRepo(root)
        self.charts = chart_repo(root)
        suffix = uuid.uuid4().hex[:6]
        self.staging, self.production = f"stg-{suffix}", f"prd-{suffix}"
        self.namespace = {self.staging: f"g-{suffix}-stg", self.production: f"g-{suffix}-prd"}
        self.gate_url = gate_url
        self.agent: subprocess.Popen[bytes] | None = None
        self.started = 0  # agents started, each with a log of its own
        self.log = root / "agent-0.log"

    def project(self, **extra: Any) -> None:
        gates = [
            {"type": "approval"},
            {"type": "soak", "duration": "20s", "interval": "1s"},
            {"type": "healthy", "interval": "1s"},
            {"type": "http", "url": self.gate_url, "json": {"running": 0}, "interval": "1s"},
        ]
        self.repo.write(
            "conveyor.yaml",
            yaml.safe_dump(
                {
                    "environments": [
                        {"name": self.staging, "path": "staging"},
                        {"name": self.production, "path": "production", "gates": gates},
                    ],
                    **extra,
                }
            ),
        )

    def folder(self, env: str) -> str:
        return "staging" if env == self.staging else "production"

    def write_ui(self, env: str, tag: str, *, replicas: int = 1, extra: str = "") -> None:
        text = deployment("ui", self.namespace[env], replicas=replicas, image=f"ui:{tag}")
        self.repo.write(f"{self.folder(env)}/ui/deploy.yaml", text + extra)

    def write_api(self, env: str, tag: str) -> None:
        release = flux_v1_release("api", self.namespace[env], self.charts, tag=tag, timeout=60)
        self.repo.write(f"{self.folder(env)}/api.yaml", release)

    def write_both(self, env: str, tag: str) -> None:
        self.write_ui(env, tag, replicas=3 if env == self.production else 1)
        self.write_api(env, tag)

    def reconcile(self, env: str) -> None:
        """A one-shot pass, no agent running (its own Lease)."""
        result = conveyor(self.sandbox, "reconcile", "--repo", self.repo.url, "--env", env)
        assert result.returncode == 0, result.stdout + result.stderr

    def start_agent(self) -> None:
        self.log = self.root / f"agent-{self.started}.log"
        self.started += 1
        self.agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                "agent",
                "--repo",
                self.repo.url,
                "--env",
                self.production,
                "--interval",
                "1s",
                "--timeout",
                "12",
            ],
            env=self.sandbox.env,
            stdout=self.log.open("w"),  # the agent logs on stdout
            stderr=subprocess.STDOUT,
        )

    def wait_first_pass(self) -> None:
        wait_for(
            lambda: "pass done" in self.log.read_text(),
            timeout=90,
            what=f"the agent's first pass; log {self.log}",
        )

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return conveyor(self.sandbox, *args, "--repo", self.repo.url, timeout=300)

    def pull(self) -> None:
        """The working clone up to date with what conveyor committed."""
        subprocess.run(
            ["git", "pull", "--quiet", "--rebase", "origin", "main"],
            cwd=self.repo.work,
            check=True,
            capture_output=True,
        )

    def image(self, name: str, env: str | None = None) -> str | None:
        live = kubectl_json(
            self.sandbox, "get", "deployment", name, "-n", self.namespace[env or self.production]
        )
        return (
            None
            if live is None
            else str(live["spec"]["template"]["spec"]["containers"][0]["image"])
        )

    def live(self, name: str) -> dict[str, Any]:
        found = kubectl_json(
            self.sandbox, "get", "deployment", name, "-n", self.namespace[self.production]
        )
        assert found is not None
        return found

    def status(self, app: str) -> dict[str, Any]:
        found = kubectl_json(
            self.sandbox, "get", "conveyorapp", f"{self.production}.{app}", "-n", "conveyor-system"
        )
        return dict((found or {}).get("status") or {})

    def wait_status(
        self, app: str, field: str, value: str, *, timeout: float = 60
    ) -> dict[str, Any]:
        """The app's status once its `field` has `value`."""

        def found() -> dict[str, Any]:
            status = self.status(app)
            return status if status.get(field) == value else {}

        return wait_for(found, timeout=timeout, what=f"{app} {field} {value}; log {self.log}")

    def wait_state(self, app: str, state: str, *, timeout: float = 60) -> dict[str, Any]:
        return self.wait_status(app, "state", state, timeout=timeout)

    def helm_history(self) -> list[dict[str, Any]]:
        result = self.sandbox.run(
            "helm", "history", "api", "-n", self.namespace[self.production], "-o", "json"
        )
        history: list[dict[str, Any]] = json.loads(result.stdout)
        return history

    def agent_alive(self) -> None:
        assert self.agent is not None and self.agent.poll() is None, self.log.read_text()


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


@pytest.fixture
def envs(sandbox: SandboxHandle, tmp_path: Path, jobs_status: str) -> Iterator[Environments]:
    made = Environments(sandbox, tmp_path, jobs_status)
    for namespace in made.namespace.values():
        sandbox.run("kubectl", "create", "namespace", namespace)
    yield made
    made.stop_agent()
    for namespace in made.namespace.values():
        sandbox.run("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


def _production_ran_two_releases(envs: Environments) -> tuple[str, str]:
    """1.4.2 and then 1.4.3 ran in staging and production (applied by one-shot passes,
    as before the gates existed); staging then moves ahead to 1.4.4; the agent starts."""
    envs.project()
    for env in (envs.staging, envs.production):
        envs.write_both(env, "1.4.2")
    first = envs.repo.commit("1.4.2 everywhere")
    for env in (envs.staging, envs.production):
        envs.reconcile(env)
    for env in (envs.staging, envs.production):
        envs.write_both(env, "1.4.3")
    second = envs.repo.commit("1.4.3 everywhere")
    for env in (envs.staging, envs.production):
        envs.reconcile(env)
    envs.write_both(envs.staging, "1.4.4")
    envs.repo.commit("staging moves ahead: 1.4.4")
    envs.reconcile(envs.staging)
    envs.start_agent()
    envs.wait_first_pass()
    return first, second


def test_a_rollback_through_the_agent_applies_and_stays_and_a_replica_change_passes(
    envs: Environments,
) -> None:
    _production_ran_two_releases(envs)
    assert envs.image("ui") == "registry.local/ui:1.4.3"
    before = len(envs.helm_history())

    # The plain app: the rollback is committed, and the agent (asked) applies it.
    started = time.monotonic()
    ui = envs.run("rollback", "--env", envs.production, "--app", "ui")
    print(f"rollback of ui through the agent: {time.monotonic() - started:.1f}s")
    assert ui.returncode == 0, ui.stdout + ui.stderr + envs.log.read_text()
    assert "1.4.3 → 1.4.2" in ui.stdout
    assert envs.image("ui") == "registry.local/ui:1.4.2"
    status = envs.status("ui")
    assert status["reason"] == "ReconciliationSucceeded", status
    assert status["lastAppliedRevision"] == status["lastAttemptedRevision"]

    # The Helm app: a new Helm revision deploys 1.4.2, and Helm's record says so.
    api = envs.run("rollback", "--env", envs.production, "--app", "api")
    assert api.returncode == 0, api.stdout + api.stderr + envs.log.read_text()
    assert envs.image("api") == "registry.local/api:1.4.2"
    history = envs.helm_history()
    assert len(history) == before + 1
    assert history[-1]["status"] == "deployed"
    assert [h["status"] for h in history[:-1]] == ["superseded"] * before
    values = envs.sandbox.run(
        "helm", "get", "values", "api", "-n", envs.namespace[envs.production], "-o", "json"
    )
    assert json.loads(values.stdout)["image"]["tag"] == "1.4.2"

    # Both stay: passes of the agent (every second) neither correct them back nor hold
    # them at a gate that judges the previous environment.
    time.sleep(6)
    envs.agent_alive()
    assert (envs.image("ui"), envs.image("api")) == (
        "registry.local/ui:1.4.2",
        "registry.local/api:1.4.2",
    )
    assert envs.helm_history()[-1]["revision"] == history[-1]["revision"]
    assert {app: envs.status(app)["reason"] for app in ("ui", "api")} == {
        "ui": "ReconciliationSucceeded",
        "api": "ReconciliationSucceeded",
    }
    assert "corrected drift" not in envs.log.read_text()

    # A change that keeps the release (replicas) applies while staging is ahead: soak
    # would say "ui 1.4.2 is not applied in staging", approval has none for it.
    envs.pull()
    envs.write_ui(envs.production, "1.4.2", replicas=4)
    replicas = envs.repo.commit("production: 4 replicas of ui")
    wait_for(
        lambda: envs.live("ui")["spec"]["replicas"] == 4,
        timeout=60,
        what=f"4 replicas applied; log {envs.log}",
    )
    wait_for(lambda: envs.status("ui").get("lastAppliedRevision") == replicas, timeout=30)
    assert envs.status("ui")["state"] == "Ready"

    # A new release is still judged by every gate.
    envs.write_ui(envs.production, "1.4.4", replicas=4)
    envs.write_api(envs.production, "1.4.4")
    new = envs.repo.commit("production: ui and api 1.4.4")
    held = envs.wait_state("ui", "WaitingForGate")
    assert held["lastAttemptedRevision"] == new and held["lastAppliedRevision"] == replicas
    assert "waits for gate approval" in held["message"]
    assert "1.4.4 needs 1 approval(s)" in held["message"]
    assert envs.image("ui") == "registry.local/ui:1.4.2"
    # The held Helm app is kept to its release as Helm deployed it: a hand edit goes,
    # and no Helm revision comes.
    envs.wait_state("api", "WaitingForGate")
    envs.sandbox.run(
        "kubectl",
        "set",
        "image",
        "deployment/api",
        "api=registry.local/api:hand-edited",
        "-n",
        envs.namespace[envs.production],
    )
    wait_for(
        lambda: envs.image("api") == "registry.local/api:1.4.2",
        timeout=30,
        what=f"the hand edit of the held Helm app reverted; log {envs.log}",
    )
    assert envs.helm_history()[-1]["revision"] == history[-1]["revision"]


def test_an_approval_judges_rollbacks_only_when_conveyor_yaml_says_so(
    envs: Environments,
) -> None:
    _production_ran_two_releases(envs)
    envs.project(rollback={"gates": ["approval"]})
    envs.repo.commit("rollbacks need an approval")
    ui = envs.run("rollback", "--env", envs.production, "--app", "ui")
    assert ui.returncode == 1, ui.stdout + ui.stderr
    status = envs.status("ui")
    assert status["state"] == "WaitingForGate", status
    assert "waits for gate approval: rollback of ui: 1.4.2 needs 1 approval(s)" in status["message"]
    assert envs.image("ui") == "registry.local/ui:1.4.3"
    approved = envs.run(
        "approve", "--env", envs.production, "--version", "1.4.2", "--by", "on-call"
    )
    assert approved.returncode == 0, approved.stderr
    wait_for(
        lambda: envs.image("ui") == "registry.local/ui:1.4.2",
        timeout=60,
        what=f"the approved rollback applied; log {envs.log}",
    )
    wait_for(lambda: envs.status("ui").get("state") == "Ready", timeout=30)


def test_a_held_app_is_kept_to_what_it_applied_and_says_a_newer_revision_waits(
    envs: Environments,
) -> None:
    envs.project()
    for env in (envs.staging, envs.production):
        envs.write_ui(env, "1.4.2")
        envs.repo.write(
            f"{envs.folder(env)}/worker/deploy.yaml",
            deployment("worker", envs.namespace[env], image="worker:2.0.0"),
        )
    applied = envs.repo.commit("1.4.2")
    for env in (envs.staging, envs.production):
        envs.reconcile(env)
    envs.start_agent()
    envs.wait_first_pass()

    envs.write_ui(envs.production, "1.4.3")
    waiting = envs.repo.commit("production: ui 1.4.3, not yet in staging")
    held = envs.wait_state("ui", "WaitingForGate")
    assert held["lastAttemptedRevision"] == waiting and held["lastAppliedRevision"] == applied
    assert conditions(held) == {
        "Ready": ("False", "GateClosed"),
        "Reconciling": ("True", "GateClosed"),
    }
    assert "ui 1.4.3 is not applied in" in held["message"]

    # A hand edit of the held app is put back to what it applied (1.4.2), not to 1.4.3.
    namespace = envs.namespace[envs.production]
    envs.sandbox.run(
        "kubectl",
        "set",
        "image",
        "deployment/ui",
        "main=registry.local/ui:hand-edited",
        "-n",
        namespace,
    )
    started = time.monotonic()
    wait_for(
        lambda: envs.image("ui") == "registry.local/ui:1.4.2",
        timeout=30,
        what=f"the hand edit reverted; log {envs.log}",
    )
    print(f"hand-set image of a held app reverted in {time.monotonic() - started:.1f}s")
    time.sleep(3)
    assert envs.image("ui") == "registry.local/ui:1.4.2"
    assert envs.status("ui")["state"] == "WaitingForGate"

    # A change that keeps worker's release is not held, and while it rolls out (it
    # cannot schedule) the status says a newer revision is attempted, then that it failed.
    broken = deployment("worker", namespace, image="worker:2.0.0").replace(
        "    spec:\n      containers:",
        "    spec:\n      nodeSelector: {disk: none}\n      containers:",
    )
    envs.repo.write("production/worker/deploy.yaml", broken)
    failing = envs.repo.commit("production: worker on a disk that no node has")
    rolling = envs.wait_status("worker", "lastAttemptedRevision", failing, timeout=30)
    assert rolling["lastAppliedRevision"] == applied
    assert conditions(rolling) == {
        "Ready": ("Unknown", "Progressing"),
        "Reconciling": ("True", "Progressing"),
    }
    # The agent crashes in the rollout: what it said stays true while none runs ...
    envs.stop_agent()
    time.sleep(2)
    assert conditions(envs.status("worker"))["Reconciling"] == ("True", "Progressing")
    assert envs.status("worker")["lastAttemptedRevision"] == failing
    # ... and the next agent (once the Lease is free) holds ui to what it applied, the
    # applied revision rendered again, and gives the failing worker up.
    envs.start_agent()
    envs.wait_first_pass()
    envs.sandbox.run(
        "kubectl",
        "set",
        "image",
        "deployment/ui",
        "main=registry.local/ui:hand-edited-again",
        "-n",
        namespace,
    )
    wait_for(
        lambda: envs.image("ui") == "registry.local/ui:1.4.2",
        timeout=60,
        what=f"the hand edit reverted after a restart; log {envs.log}",
    )
    given_up = envs.wait_state("worker", "Stalled", timeout=90)
    assert given_up["reason"] == "RolledBack"
    assert given_up["lastAttemptedRevision"] == failing
    assert given_up["lastAppliedRevision"] == applied
    assert conditions(given_up)["Ready"] == ("False", "RolledBack")
    envs.agent_alive()
