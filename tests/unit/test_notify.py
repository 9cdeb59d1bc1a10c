"""Notifications against a real HTTP receiver on loopback: signatures, retries, sinks,
rules, and a full or dead receiver that never holds anyone up."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.config.project import ConfigError, NotificationRule, parse_project
from conveyor.notify.notifier import Notifier, NotifierOptions
from conveyor.notify.sinks import SIGNATURE_HEADER, Notification
from conveyor.reconcile.report import notification_for
from conveyor.reconcile.status import READY, STALLED, AppStatus
from conveyor.source.git import LogEntry

SECRET = "s3cret-for-hooks"
FAST = NotifierOptions(backoff=0.05, max_backoff=0.2, timeout=2.0)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny HTTP server that answers the queued status codes, then 200."""

    port: int = 0
    answers: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.requests


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.requests.append(Received(self.path, dict(self.headers.items()), body))
            code = state.answers.pop(0) if state.answers else 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONVEYOR_SECRETS_DIR", str(tmp_path))
    (tmp_path / "hook").write_text(SECRET + "\n")
    (tmp_path / "git-token").write_text("ghp_test_token\n")
    return tmp_path


def project(text: str) -> list[NotificationRule]:
    return parse_project(text, source="conveyor.yaml").notifications


def note(event: str = "applied", environment: str = "staging", **extra: str) -> Notification:
    return Notification(
        event=event,
        environment=environment,
        app=extra.get("app", "api"),
        state=extra.get("state", "Ready"),
        reason=extra.get("reason", "ReconciliationSucceeded"),
        message=extra.get("message", "applied revision abc"),
        revision=extra.get("revision", "a" * 40),
        time="2026-01-01T00:00:00Z",
    )


def run_notifier(notifier: Notifier, *notes: Notification, grace: float = 10.0) -> None:
    async def go() -> None:
        await notifier.start()
        for n in notes:
            notifier.publish(n)
        await notifier.close(grace=grace)

    asyncio.run(go())


def test_webhook_delivery_is_signed_over_the_exact_body(
    receiver: Receiver, secrets_dir: Path
) -> None:
    rules = project(
        f"notifications:\n  - webhook: {{url: '{receiver.url}/hook', secret: {{file: hook}}}}\n"
    )
    run_notifier(Notifier(rules, options=FAST), note())
    (got,) = receiver.wait(1)
    assert got.path == "/hook"
    expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers[SIGNATURE_HEADER] == expected
    body = json.loads(got.body)
    assert body["event"] == "applied"
    assert body["environment"] == "staging"
    assert body["app"] == "api"
    assert body["revision"] == "a" * 40
    assert got.headers["X-Conveyor-Event"] == "applied"


def test_retries_after_500s_with_the_same_delivery(receiver: Receiver, secrets_dir: Path) -> None:
    receiver.answers = [500, 503]
    registry = CollectorRegistry()
    rules = project(
        f"notifications:\n  - webhook: {{url: '{receiver.url}', secret: {{file: hook}}}}"
    )
    run_notifier(Notifier(rules, options=FAST, registry=registry), note())
    got = receiver.wait(3)
    assert len(got) == 3
    assert len({r.headers["X-Conveyor-Delivery"] for r in got}) == 1
    assert len({r.headers[SIGNATURE_HEADER] for r in got}) == 1
    delivered = registry.get_sample_value(
        "conveyor_notifications_total", {"sink": "webhook", "result": "delivered"}
    )
    assert delivered == 1


def test_a_4xx_is_final(receiver: Receiver) -> None:
    receiver.answers = [404]
    registry = CollectorRegistry()
    rules = project(f"notifications:\n  - webhook: {{url: '{receiver.url}'}}")
    run_notifier(Notifier(rules, options=FAST, registry=registry), note())
    assert len(receiver.wait(1)) == 1
    time.sleep(0.3)
    assert len(receiver.requests) == 1
    failed = registry.get_sample_value(
        "conveyor_notifications_total", {"sink": "webhook", "result": "failed"}
    )
    assert failed == 1


def test_slack_and_git_status_bodies(receiver: Receiver, secrets_dir: Path) -> None:
    rules = project(
        f"""
notifications:
  - slack: {{url: '{receiver.url}/slack'}}
  - git-status:
      api: '{receiver.url}/api/v3'
      repository: acme/config
      token: {{file: git-token}}
"""
    )
    run_notifier(Notifier(rules, options=FAST), note("failed", state="Stalled", message="boom"))
    got = {r.path: r for r in receiver.wait(2)}
    slack = json.loads(got["/slack"].body)
    assert slack == {"text": f"[staging] api: failed at {'a' * 12}: boom"}
    status = got[f"/api/v3/repos/acme/config/statuses/{'a' * 40}"]
    assert status.headers["Authorization"] == "Bearer ghp_test_token"
    body = json.loads(status.body)
    assert body["state"] == "failure"
    assert body["context"] == "conveyor/staging"


def test_rules_filter_by_event_and_environment(receiver: Receiver) -> None:
    rules = project(
        f"""
notifications:
  - events: [failed]
    environments: [production]
    webhook: {{url: '{receiver.url}/prod-failures'}}
"""
    )
    run_notifier(
        Notifier(rules, options=FAST),
        note("applied", "production"),
        note("failed", "staging"),
        note("failed", "production"),
    )
    assert [r.path for r in receiver.wait(1)] == ["/prod-failures"]
    time.sleep(0.2)
    assert len(receiver.requests) == 1


def test_full_queue_drops_the_oldest_and_counts_it(receiver: Receiver) -> None:
    registry = CollectorRegistry()
    rules = project(f"notifications:\n  - webhook: {{url: '{receiver.url}'}}")
    notifier = Notifier(rules, options=NotifierOptions(capacity=3), registry=registry)
    for index in range(5):  # not started: the queue only fills
        notifier.publish(note(message=f"n{index}"))
    assert registry.get_sample_value("conveyor_notifications_dropped_total") == 2
    run_notifier(notifier)
    messages = sorted(json.loads(r.body)["message"] for r in receiver.wait(3))
    assert messages == ["n2", "n3", "n4"]


def test_a_dead_receiver_never_blocks_the_publisher() -> None:
    # A socket that accepts connections and never answers: the worst kind of down.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1024)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        rules = project(f"notifications:\n  - webhook: {{url: '{url}'}}")

        async def go() -> float:
            notifier = Notifier(rules, options=NotifierOptions(capacity=50, timeout=30))
            await notifier.start()
            started = time.perf_counter()
            for index in range(500):
                notifier.publish(note(message=str(index)))
            spent = time.perf_counter() - started
            # 450 dropped from the full queue, 50 queued or in flight at the end.
            assert await notifier.close(grace=0.2) == 500
            return spent

        assert asyncio.run(go()) < 0.5


def test_secrets_stay_out_of_the_agents_own_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CONVEYOR_"):
        project("notifications:\n  - webhook: {url: 'http://x', secret: {env: AWS_SECRET}}")
    with pytest.raises(ConfigError, match="exactly one of webhook"):
        project("notifications:\n  - {events: [applied]}")
    with pytest.raises(ConfigError, match="events"):
        project("notifications:\n  - {events: [exploded], webhook: {url: 'http://x'}}")
    (rule,) = project(
        "notifications:\n  - webhook: {url: 'http://x', secret: {file: ../../etc/passwd}}"
    )
    assert rule.webhook is not None and rule.webhook.secret is not None
    with pytest.raises(ConfigError, match="outside"):
        rule.webhook.secret.read()


IDENTITY = EnvironmentIdentity.of("/srv/config.git", branch="main", path="prod", name="prod")


def change(subject: str, body: str = "") -> LogEntry:
    return LogEntry("c" * 40, (), "Pat", "pat@example.com", "2026-01-01T00:00:00Z", subject, body)


def event_of(status: AppStatus, *, newly_applied: bool, commit: LogEntry | None = None) -> str:
    note = notification_for(status, identity=IDENTITY, newly_applied=newly_applied, change=commit)
    return note.event if note is not None else "none"


def test_status_changes_map_to_events() -> None:
    status = AppStatus(
        scope="prod-1a2b3c", app="api", state=READY, reason="ReconciliationSucceeded"
    )
    applied = notification_for(status, identity=IDENTITY, newly_applied=True)
    assert applied is not None and applied.event == "applied" and applied.actor is None
    # Named as the environment names itself, not by the scope's suffix; its identity beside.
    assert (applied.environment, applied.source, applied.owner) == (
        "prod",
        IDENTITY.source,
        IDENTITY.id,
    )
    assert event_of(status, newly_applied=False) == "none"
    status.reason = "DriftCorrected"
    assert event_of(status, newly_applied=False) == "drift-corrected"
    status.state, status.reason = STALLED, "RolledBack"
    assert event_of(status, newly_applied=False) == "rolled-back"
    status.reason = "HealthCheckFailed"
    assert event_of(status, newly_applied=False) == "failed"
    status.state, status.reason = "WaitingForGate", "GatePending"
    assert event_of(status, newly_applied=False) == "waiting-for-gate"


@pytest.mark.parametrize(
    ("subject", "body", "event"),
    [
        ("Promote api 1.2 from staging to prod", "Conveyor-Change: promotion", "promoted"),
        ("Deploy api 1.3 to prod", "Conveyor-Change: promotion", "promoted"),
        ("Roll back api in prod to 1.1 (was 1.2)", "Conveyor-Change: rollback", "rolled-back"),
        ('Revert "api 1.2"', "", "rolled-back"),
        ("Update images", "", "applied"),
        ("bump replicas", "", "applied"),
    ],
)
def test_the_commit_that_brought_a_revision_names_its_event(
    subject: str, body: str, event: str
) -> None:
    status = AppStatus(scope="prod", app="api", state=READY, reason="ReconciliationSucceeded")
    note = notification_for(
        status, identity=IDENTITY, newly_applied=True, change=change(subject, body)
    )
    assert note is not None and note.event == event
    assert note.actor == (None if event == "applied" else "Pat")
