"""Notifications from real reconcile passes on the sandbox: a loopback receiver gets
signed `applied` and `failed` events, `promoted` and `rolled-back` for the commits of
`conveyor promote` and `conveyor rollback`, the environment's identity in each; a
receiver that never answers does not slow a pass down, and the CLI says what it lost."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conveyor.reconcile.engine import PassResult
from conveyor.reconcile.once import reconcile_once
from conveyor.reconcile.target import Target
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, reconcile_json, wait_for
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster
SECRET = "notify-e2e-secret"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks", received
    server.shutdown()
    server.server_close()


def test_reconcile_sends_signed_notifications(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, received = receiver
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hook").write_text(SECRET)
    sandbox.env["CONVEYOR_SECRETS_DIR"] = str(secrets)
    repo = ConfigRepo(tmp_path)
    path = f"envs/n-{uuid.uuid4().hex[:6]}"
    repo.write(
        "conveyor.yaml",
        f"""
        notifications:
          - events: [applied, failed]
            webhook: {{url: "{url}", secret: {{file: hook}}}}
        """,
    )
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace, image="web:1"))
    repo.write(f"{path}/broken/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x\n")
    repo.commit("apps")
    try:
        reconcile_json(sandbox, repo, path)
    finally:
        del sandbox.env["CONVEYOR_SECRETS_DIR"]
    wait_for(lambda: len(received) >= 2, timeout=15, what="two notifications")
    events = {}
    for headers, body in received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Conveyor-Signature-256"] == expected
        note = json.loads(body)
        events[note["app"]] = note
    assert events["web"]["event"] == "applied"
    assert events["broken"]["event"] == "failed"
    assert events["broken"]["reason"] == "RenderFailed"


def test_a_dead_receiver_does_not_slow_a_pass(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1024)
        dead = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"

        def run(tag: str, rules: str) -> float:
            repo = ConfigRepo(tmp_path / tag)
            path = f"envs/{tag}-{uuid.uuid4().hex[:6]}"
            repo.write("conveyor.yaml", rules)
            for index in range(5):
                name = f"{tag}-{index}"
                repo.write(f"{path}/{name}/deploy.yaml", deployment(name, namespace))
            repo.commit("apps")
            target = Target(repo=repo.url, path=path, kubeconfig=str(sandbox.kubeconfig))
            started = time.perf_counter()
            result = asyncio.run(reconcile_once(target, notify_grace=0))
            spent = time.perf_counter() - started
            assert isinstance(result, PassResult) and result.all_ready, result
            return spent

        baseline = run("quiet", "notifications: []\n")
        with_dead = run(
            "dead",
            f"notifications:\n  - webhook: {{url: '{dead}'}}\n  - slack: {{url: '{dead}'}}\n",
        )
    # 10 notifications to a receiver that would hold each for its 10 s timeout.
    assert with_dead < baseline + 1.5, (baseline, with_dead)


def _signed_events(received: list[tuple[dict[str, str], bytes]]) -> list[dict[str, str]]:
    notes = []
    for headers, body in received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Conveyor-Signature-256"] == expected
        notes.append(json.loads(body))
    return notes


def test_promotion_and_rollback_are_announced_as_such(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, received = receiver
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hook").write_text(SECRET + "\n")  # as `echo` writes it: the newline is not key
    production_ns = f"{namespace}-p"
    sandbox.run("kubectl", "create", "namespace", production_ns)
    env = {**sandbox.env, "CONVEYOR_SECRETS_DIR": str(secrets)}
    handle = SandboxHandle(sandbox.sandbox, env, sandbox.registry)
    repo = ConfigRepo(tmp_path)
    base = f"envs/p-{uuid.uuid4().hex[:6]}"
    repo.write(
        "conveyor.yaml",
        f"""
        environments:
          - {{name: staging, path: {base}/staging}}
          - {{name: production, path: {base}/production}}
        notifications:
          - events: [applied, promoted, rolled-back]
            environments: [production]
            webhook: {{url: "{url}", secret: {{file: hook}}}}
        """,
    )
    repo.write(f"{base}/staging/web/deploy.yaml", deployment("web", namespace, image="web:1.0.0"))
    repo.write(
        f"{base}/production/web/deploy.yaml", deployment("web", production_ns, image="web:1.0.0")
    )
    repo.commit("apps")
    try:
        first = conveyor(handle, "reconcile", "--repo", repo.url, "--env", "production")
        assert first.returncode == 0, first.stdout + first.stderr
        wait_for(lambda: len(received) >= 1, timeout=15, what="the first applied")
        (applied,) = _signed_events(received)
        assert applied["event"] == "applied" and applied["actor"] is None
        # Named as conveyor.yaml names it, even where an earlier test's `production` in
        # this cluster made the status's scope `production-<suffix>`.
        assert applied["environment"] == "production"
        assert applied["source"].endswith(f"@main:{base}/production#production")
        assert len(applied["owner"]) == 16
        received.clear()

        repo.write(
            f"{base}/staging/web/deploy.yaml", deployment("web", namespace, image="web:1.1.0")
        )
        repo.commit("web 1.1.0 in staging")
        promoted = conveyor(
            handle,
            *("promote", "--repo", repo.url, "--from", "staging", "--to", "production"),
            *("--apply", "--author-name", "Pat Promoter"),
        )
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        wait_for(lambda: len(received) >= 1, timeout=15, what="the promotion's event")
        (note,) = _signed_events(received)
        assert (note["event"], note["app"], note["actor"]) == ("promoted", "web", "Pat Promoter")
        received.clear()

        rolled = conveyor(
            handle,
            *("rollback", "--repo", repo.url, "--env", "production", "--app", "web"),
            *("--author-name", "Rae Rollback"),
        )
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        wait_for(lambda: len(received) >= 1, timeout=15, what="the rollback's event")
        (note,) = _signed_events(received)
        assert (note["event"], note["app"], note["actor"]) == ("rolled-back", "web", "Rae Rollback")
    finally:
        sandbox.run("kubectl", "delete", "namespace", production_ns, "--wait=false", check=False)


def test_the_cli_waits_briefly_for_a_dead_receiver_and_says_what_it_lost(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1024)
        dead = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        repo = ConfigRepo(tmp_path)
        path = f"envs/d-{uuid.uuid4().hex[:6]}"
        repo.write("conveyor.yaml", f"notifications:\n  - webhook: {{url: '{dead}'}}\n")
        for name in ("one", "two"):
            repo.write(f"{path}/{name}/deploy.yaml", deployment(name, namespace))
        repo.commit("apps")
        started = time.perf_counter()
        code, report = reconcile_json(sandbox, repo, path)
        default_wait = time.perf_counter() - started
        assert code == 0, report
        assert report["undeliveredNotifications"] == 2
        repo.write(f"{path}/one/deploy.yaml", deployment("one", namespace, image="web:2"))
        repo.commit("one to web:2")
        result = conveyor(
            sandbox, "reconcile", "--repo", repo.url, "--path", path, "--notify-wait", "0"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 notification(s) not delivered" in result.stderr, result.stderr
    # The old fixed wait was the receiver's 10 s timeout; the default is 2 s.
    assert default_wait < 8.0, default_wait
