"""Gates on real services: SQS on moto's server, HTTP on a loopback server, approvals in git."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from conveyor.cluster.client import KubeClient
from conveyor.config.project import ConfigError, Environment, Project, parse_project
from conveyor.promote.approvals import approve, approvers
from conveyor.promote.gates import GateContext, GateResult, check_gates, wait_for_gates
from conveyor.source.git import Author, Checkout, run_git
from tests.queues import Sqs, sqs_fixture  # noqa: F401 -- the fixture

QUEUE = "sqs_studioml_gorunner_cpu_production_0"


def project_with(gates: list[dict[str, Any]]) -> Project:
    text = yaml.safe_dump(
        {
            "environments": [
                {"name": "staging", "path": "staging"},
                {"name": "production", "path": "production", "gates": gates},
            ]
        }
    )
    return parse_project(text, source="conveyor.yaml")


def no_cluster(env: Environment) -> KubeClient:
    raise AssertionError(f"these gates need no cluster, asked for {env.name}")


def context(project: Project, root: Path, versions: dict[str, str] | None = None) -> GateContext:
    return GateContext(
        project=project,
        environment=project.environment("production"),
        versions=versions or {"ui": "1.2.0"},
        approvals_root=root,
        kube=no_cluster,
        version_at=lambda _env, _app, _rev: None,
        repository=str(root),
    )


def queue_gate(sqs: Sqs, **extra: Any) -> dict[str, Any]:
    return {
        "type": "queue-empty",
        "queues": [QUEUE],
        "regions": ["us-west-2", "us-east-2"],
        "endpoint-url": sqs.endpoint,
        **extra,
    }


def check(ctx: GateContext) -> list[GateResult]:
    return asyncio.run(check_gates(ctx))


def test_queue_gate_counts_waiting_in_flight_and_delayed_in_every_region(
    sqs: Sqs, tmp_path: Path
) -> None:
    sqs.create(QUEUE, "us-west-2", "us-east-2")
    ctx = context(project_with([queue_gate(sqs)]), tmp_path)
    [result] = check(ctx)
    assert result.open and result.message == "2 queue(s) empty in us-west-2, us-east-2"
    sqs.send("us-east-2", QUEUE, 3)
    assert len(sqs.take("us-east-2", QUEUE)) == 3  # a job picked them up: in flight
    sqs.send("us-east-2", QUEUE, 1)
    sqs.send("us-east-2", QUEUE, 1, delay=60)
    [result] = check(ctx)
    assert not result.open and not result.final
    assert result.message == (
        f"queue {QUEUE} in us-east-2 has 5 messages (1 waiting, 3 in flight, 1 delayed)"
    )


def test_queue_gate_endpoint_from_the_environment_and_queue_urls(
    sqs: Sqs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = sqs.create(QUEUE, "us-west-2")
    monkeypatch.setenv("CONVEYOR_SQS_ENDPOINT", sqs.endpoint)
    gate = {"type": "queue-empty", "queues": [urls["us-west-2"]], "regions": ["us-west-2"]}
    ctx = context(project_with([gate]), tmp_path)
    assert check(ctx)[0].open
    monkeypatch.delenv("CONVEYOR_SQS_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs.endpoint)
    sqs.send("us-west-2", QUEUE, 2)
    [result] = check(ctx)
    assert (
        not result.open and "has 2 messages (2 waiting, 0 in flight, 0 delayed)" in result.message
    )


def test_a_missing_queue_fails_at_once_without_waiting(sqs: Sqs, tmp_path: Path) -> None:
    sqs.create(QUEUE, "us-west-2")  # not in us-east-2
    ctx = context(project_with([queue_gate(sqs, timeout="1h")]), tmp_path)
    started = time.monotonic()
    [result] = asyncio.run(wait_for_gates(ctx))
    assert time.monotonic() - started < 5
    assert not result.open and result.final
    assert result.message == f"queue {QUEUE} in us-east-2 does not exist"


def test_waiting_ends_when_a_consumer_drains_the_queue(sqs: Sqs, tmp_path: Path) -> None:
    sqs.create(QUEUE, "us-west-2", "us-east-2")
    sqs.send("us-west-2", QUEUE, 2)
    running = sqs.take("us-west-2", QUEUE)
    sqs.send("us-west-2", QUEUE, 3)
    ctx = context(project_with([queue_gate(sqs, timeout="60s", interval="0.5s")]), tmp_path)
    heard: list[str] = []
    started = time.monotonic()
    consumer = sqs.drain_later("us-west-2", QUEUE, after=2.0, running=tuple(running))
    results = asyncio.run(wait_for_gates(ctx, progress=heard.append))
    waited = time.monotonic() - started
    consumer.join()
    assert all(r.open for r in results)
    assert 2.0 <= waited < 10, waited
    assert "3 waiting, 2 in flight" in heard[0]


def test_waiting_times_out_naming_the_queue(sqs: Sqs, tmp_path: Path) -> None:
    sqs.create(QUEUE, "us-west-2", "us-east-2")
    sqs.send("us-west-2", QUEUE, 1)
    ctx = context(project_with([queue_gate(sqs, timeout="1h", interval="0.2s")]), tmp_path)
    started = time.monotonic()
    [result] = asyncio.run(wait_for_gates(ctx, timeout=1.0))
    assert 1.0 <= time.monotonic() - started < 5
    assert not result.open and f"queue {QUEUE} in us-west-2 has 1 messages" in result.message


class _Status(BaseHTTPRequestHandler):
    body: ClassVar[dict[str, Any]] = {}
    code = 200

    def do_GET(self) -> None:
        payload = json.dumps(type(self).body).encode()
        self.send_response(type(self).code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def status_server() -> Iterator[tuple[str, type[_Status]]]:
    handler = type("Handler", (_Status,), {"body": {}, "code": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jobs", handler
    server.shutdown()


def test_http_gate_checks_status_and_json_fields(
    status_server: tuple[str, type[_Status]], tmp_path: Path
) -> None:
    url, handler = status_server
    gate = {"type": "http", "url": url, "json": {"jobs.running": 0, "state": "idle"}}
    ctx = context(project_with([gate]), tmp_path)
    handler.body = {"state": "busy", "jobs": {"running": 2}}
    [result] = check(ctx)
    assert not result.open and result.message == f"{url}: jobs.running is 2, expected 0"
    handler.body = {"state": "idle", "jobs": {"running": 0}}
    assert check(ctx)[0].open
    handler.code = 503
    [result] = check(ctx)
    assert not result.open and result.message == f"GET {url} answered 503, expected 200"
    closed = context(project_with([{"type": "http", "url": "http://127.0.0.1:9/x"}]), tmp_path)
    [result] = check(closed)
    assert not result.open and result.message.startswith("cannot check:")


def test_approval_gate_reads_approvals_committed_to_git(tmp_path: Path) -> None:
    bare = tmp_path / "config.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])
    checkout = Checkout.open(str(bare), tmp_path / "work", branch="main")
    gate = {"type": "approval", "count": 2, "approvers": ["alice", "bob", "carol"]}
    ctx = context(project_with([gate]), checkout.path, {"ui": "1.2.0", "api": "1.2.0"})
    [result] = check(ctx)
    assert not result.open and result.final
    assert result.message.startswith("1.2.0 needs 2 approval(s) for production;")
    first = approve(checkout, env="production", version="1.2.0", by="alice", author=Author())
    assert first is not None
    assert approve(checkout, env="production", version="1.2.0", by="alice", author=Author()) is None
    approve(checkout, env="production", version="1.2.0", by="mallory", author=Author())
    [result] = check(ctx)
    assert not result.open and "(has alice)" in result.message  # mallory may not approve
    approve(checkout, env="production", version="1.2.0", by="bob", author=Author())
    [result] = check(ctx)
    assert result.open and result.message == "1.2.0 approved by alice, bob"
    assert approvers(checkout.path, "production", "1.2.0") == ["alice", "mallory", "bob"]
    log = run_git(["--git-dir", str(bare), "log", "--format=%s", "main"]).splitlines()
    assert log[0] == "Approve 1.2.0 for production (by bob)" and len(log) == 3


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"type": "queue-empty"}, ":5: environments[1].gates[0].queues is required"),
        ({"type": "queue-empty", "queues": []}, ":5: environments[1].gates[0].queues: List"),
        ({"type": "soak"}, ":5: environments[1].gates[0].duration is required"),
        ({"type": "soak", "duration": "5 minutes"}, "duration like 24h: invalid duration '5 min"),
        (
            {"type": "soak", "duration": [1]},
            ":6: environments[1].gates[0].duration: expected a dur",
        ),
        ({"type": "coffee"}, "does not match any of the expected tags"),
        ({"type": "approval", "count": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_gates_are_named_in_conveyor_yaml(gate: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ConfigError, match=r"conveyor\.yaml:\d+: environments\[1\]\.gates\[0\]"
    ) as error:
        project_with([gate])
    assert message in str(error.value)


def test_a_gate_naming_an_unknown_environment_is_refused() -> None:
    with pytest.raises(ConfigError) as error:
        project_with([{"type": "soak", "duration": "1h", "environment": "qa"}])
    assert str(error.value) == (
        "conveyor.yaml:2: environments: production: gate soak names unknown environment 'qa'"
    )
