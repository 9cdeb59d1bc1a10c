"""The one-writer rules that need no cluster: request tokens and their order, which
request is pending, the lease's write budget, and helm cut off when the budget ends.
The same behaviour on the real sandbox: tests/cluster/test_one_writer.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.kubeconfig import ClusterCredentials
from conveyor.cluster.lease import LeaderElector, NotLeaderError
from conveyor.reconcile.requests import (
    REQUESTED_APP,
    REQUESTED_AT,
    SHARD_ANSWERS,
    AnswerCollector,
    ReconcileRequest,
    ShardAnswer,
    answers_requests,
    handled_request,
    is_handled,
    next_token,
    one_pass_identity,
    pending_request,
    shard_answers,
)
from conveyor.render import helm as helm_module
from conveyor.render.helm import HelmCLI

Obj = dict[str, Any]
NOON = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)


def source(annotations: dict[str, str], handled: str | None = None) -> Obj:
    return {
        "metadata": {"name": "staging", "annotations": annotations},
        "status": {"lastHandledReconcileAt": handled} if handled else {},
    }


def test_tokens_grow_in_the_order_written_even_with_a_clock_behind() -> None:
    first = next_token(None, None, now=NOON)
    assert first == "2026-12-01T12:00:00.000000Z"
    # A requester whose clock is a minute behind still writes a later token.
    behind = next_token(first, None, now=NOON - dt.timedelta(minutes=1))
    assert behind == "2026-12-01T12:00:00.000001Z"
    assert behind > first
    # Later than the last handled one too, and than anything unreadable is ignored.
    assert next_token("garbage", first, now=NOON - dt.timedelta(hours=1)) > first
    assert next_token(None, None, now=NOON + dt.timedelta(seconds=1)) > first


def test_a_request_is_handled_by_its_own_token_or_any_later_one() -> None:
    token = next_token(now=NOON)
    assert is_handled(token, token)
    assert is_handled(token, next_token(token, now=NOON))
    assert not is_handled(token, None)
    assert not is_handled(token, next_token(now=NOON - dt.timedelta(seconds=1)))


def test_pending_request_is_the_unhandled_one_with_its_app() -> None:
    token = next_token(now=NOON)
    assert pending_request(None) is None
    assert pending_request(source({})) is None
    assert pending_request(source({REQUESTED_AT: token}, handled=token)) is None
    assert pending_request(source({REQUESTED_AT: token, REQUESTED_APP: "web"})) == (
        ReconcileRequest(token=token, app="web")
    )
    older = next_token(now=NOON - dt.timedelta(seconds=5))
    assert pending_request(source({REQUESTED_AT: token}, handled=older)) == ReconcileRequest(
        token=token, app=None
    )


def test_one_pass_commands_are_told_from_agents_by_identity() -> None:
    assert not answers_requests(one_pass_identity("cli"))
    assert not answers_requests(one_pass_identity("dashboard"))
    assert answers_requests("agent-host-1234-abcdef")


class LeaseApi:
    """Just enough of KubeClient for one Lease: get, create, replace by resourceVersion."""

    def __init__(self) -> None:
        self.lease: Obj | None = None
        self.version = 0

    async def resource(self, api_version: str, kind: str) -> Any:
        class Leases:
            def path(self, *, namespace: str, name: str) -> str:
                return f"/apis/{api_version}/namespaces/{namespace}/leases/{name}"

        return Leases()

    async def request(self, method: str, path: str, *, json_body: Obj | None = None) -> Obj:
        if method == "GET":
            if self.lease is None:
                raise ApiError(404, "NotFound", "no lease")
            return dict(self.lease)
        assert json_body is not None
        self.version += 1
        self.lease = {**json_body, "metadata": {**json_body["metadata"], "rv": self.version}}
        return dict(self.lease)


def test_write_budget_ends_a_margin_before_the_lease_and_refuses_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    elector = LeaderElector(
        LeaseApi(),  # type: ignore[arg-type]
        namespace="conveyor-system",
        name="conveyor-staging",
        identity="agent-a",
        lease_duration=6.0,
        renew_interval=2.0,
    )
    assert elector.write_margin == 1.0
    with pytest.raises(NotLeaderError, match="agent-a no longer holds lease"):
        elector.write_budget()
    assert asyncio.run(elector.acquire(timeout=0))
    assert elector.write_budget() == pytest.approx(5.0)
    clock[0] += 4.5
    assert elector.write_budget() == pytest.approx(0.5)  # a write now must end by then
    clock[0] += 0.6
    # Still leader for 0.9 s, but no write is sent this close to the end.
    assert elector.is_leader and not elector.may_write
    with pytest.raises(NotLeaderError):
        elector.write_budget()


def test_a_helm_write_is_refused_without_the_lease_and_killed_when_its_time_runs_out(
    tmp_path: Path,
) -> None:
    fake_helm = tmp_path / "helm"
    marker = tmp_path / "finished"
    fake_helm.write_text(f"#!/bin/sh\nsleep 5\ntouch {marker}\n")
    fake_helm.chmod(0o755)
    budgets = iter([0.3])

    def guard() -> float:
        budget = next(budgets, None)
        if budget is None:
            raise NotLeaderError("conveyor-system", "conveyor-staging", "agent-a")
        return budget

    helm = HelmCLI(binary=str(fake_helm), write_guard=guard)
    started = time.monotonic()
    with pytest.raises(NotLeaderError):
        asyncio.run(helm.rollback("web", "apps", 3, timeout=60))
    assert time.monotonic() - started < 2.0  # cut off at its deadline, not after 5 s
    time.sleep(0.2)
    assert not marker.exists()  # killed: it did not go on by itself
    with pytest.raises(NotLeaderError):  # no budget left: refused before it starts
        asyncio.run(helm.uninstall("web", "apps"))
    # Reads are not writes: no guard asked.
    assert asyncio.run(HelmCLI(binary="true", write_guard=guard).run("version")) == ""


def test_a_helm_write_outlives_one_budget_while_the_lease_is_renewed(tmp_path: Path) -> None:
    """An upgrade waiting on hooks may run longer than one lease: each renewal gives it a
    new budget, and it is cut off only when the lease is gone."""
    fake_helm = tmp_path / "helm"
    fake_helm.write_text("#!/bin/sh\nsleep 1\necho upgraded\n")
    fake_helm.chmod(0o755)
    asked = []

    def guard() -> float:
        asked.append(time.monotonic())
        return 0.3  # a short lease, renewed each time it is asked

    helm = HelmCLI(binary=str(fake_helm), write_guard=guard)
    assert asyncio.run(helm.run("rollback", writes=True)).strip() == "upgraded"
    assert len(asked) >= 3  # asked again as each budget ran out


def test_kube_writes_are_refused_or_cut_off_by_the_guard_and_name_their_writer() -> None:
    """Against a real HTTP server on loopback that answers reads and never answers
    writes: the apiserver paused mid-write."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        if head.startswith(b"GET"):
            body = b"{}"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        else:
            await asyncio.sleep(30)  # a write that would land long after the lease
        writer.close()

    budgets = iter([0.3, 0.3])

    def guard() -> float:
        budget = next(budgets, None)
        if budget is None:
            raise NotLeaderError("conveyor-system", "conveyor-staging", "agent-a")
        return budget

    async def scenario() -> float:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        kube = KubeClient(ClusterCredentials(server=f"http://127.0.0.1:{port}", context="t"))
        kube.identify("agent-a")
        kube.write_guard = guard
        try:
            assert await kube.request("GET", "/api/v1/namespaces/a") == {}
            started = time.monotonic()
            with pytest.raises(NotLeaderError):
                await kube.request("PATCH", "/api/v1/namespaces/a", json_body={})
            took = time.monotonic() - started
            with pytest.raises(NotLeaderError):  # no budget: not even sent
                await kube.request("DELETE", "/api/v1/namespaces/a")
            assert kube.writes == 1
            return took
        finally:
            await kube.aclose()
            server.close()

    took = asyncio.run(scenario())
    assert took < 1.5  # cut off at the guard's deadline, not the server's 30 s
    assert [h.split(b" ", 1)[0] for h in seen] == [b"GET", b"PATCH"]
    assert all(b"User-Agent: conveyor/agent-a" in h for h in seen)


def cancelled_after(seconds: float, run: Any) -> float:
    """Run the coroutine `run`, cancel it after `seconds`; how long it took to end."""

    async def scenario() -> None:
        task = asyncio.create_task(run)
        await asyncio.sleep(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(scenario())
    return time.monotonic() - started


def test_a_cancelled_helm_write_is_asked_to_stop_before_it_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helm upgrade marks its release failed on SIGTERM; a cancelled run (the agent
    stopping) gives it that chance, and kills a helm that does not stop in time."""
    fake_helm = tmp_path / "helm"
    marker = tmp_path / "marked-failed"
    fake_helm.write_text(f"#!/bin/sh\ntrap 'touch {marker}; exit 1' TERM\nsleep 30 &\nwait\n")
    fake_helm.chmod(0o755)
    helm = HelmCLI(binary=str(fake_helm), write_guard=lambda: 60.0)
    seconds = cancelled_after(0.5, helm.rollback("web", "apps", 3, timeout=60))
    assert marker.exists()  # it got SIGTERM, and the time to act on it
    assert seconds < 3

    stubborn = tmp_path / "stubborn-helm"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nsleep 30\n")
    stubborn.chmod(0o755)
    monkeypatch.setattr(helm_module, "HELM_STOP_GRACE", 0.5)
    helm = HelmCLI(binary=str(stubborn), write_guard=lambda: 60.0)
    seconds = cancelled_after(0.3, helm.rollback("web", "apps", 3, timeout=60))
    assert 0.8 <= seconds < 3  # its grace, then SIGKILL (to the whole group: sleep too)


def answered(token: str, shards: dict[str, str], **extra: Obj) -> Obj:
    """A source status with the request `token` and each shard's answer (shard: token)."""
    answers = {
        shard: {"token": at, "revision": "abc", "apps": 3, "writes": 2, **extra.get(shard, {})}
        for shard, at in shards.items()
    }
    return {
        "metadata": {"name": "staging", "annotations": {REQUESTED_AT: token}},
        "status": {SHARD_ANSWERS: answers},
    }


def test_a_request_for_all_apps_is_answered_once_every_live_shard_has_answered() -> None:
    token = next_token(now=NOON)
    older = next_token(now=NOON - dt.timedelta(seconds=5))
    request = ReconcileRequest(token=token, app=None)
    collector = AnswerCollector()
    live = frozenset({"agent-a", "agent-b"})
    assert collector.collect(answered(token, {}), request, live=live) is None
    # b's answer is to an older request: it has not run this one yet.
    source = answered(token, {"agent-a": token, "agent-b": older})
    assert collector.collect(source, request, live=live) is None
    source = answered(token, {"agent-a": token, "agent-b": token})
    collected = collector.collect(source, request, live=live)
    assert collected is not None
    assert [a.shard for a in collected.answers] == ["agent-a", "agent-b"]
    assert (collected.gone, collected.stale, collected.revision) == ([], [], "abc")
    assert collected.source_failure is None


def test_a_shard_that_dies_before_answering_is_named_not_waited_for() -> None:
    token = next_token(now=NOON)
    request = ReconcileRequest(token=token, app=None)
    collector = AnswerCollector()
    both, survivor = frozenset({"agent-a", "agent-b"}), frozenset({"agent-a"})
    source = answered(token, {"agent-a": token})
    assert collector.collect(source, request, live=both) is None  # b still live: waited for
    collected = collector.collect(source, request, live=survivor)  # b's Lease lapsed
    assert collected is not None
    assert ([a.shard for a in collected.answers], collected.gone) == (["agent-a"], ["agent-b"])
    # A later request starts afresh: b was not asked this time, and the old answer of a
    # shard no longer live is dropped once answered.
    later = ReconcileRequest(token=next_token(token, now=NOON), app=None)
    source = answered(later.token, {"agent-a": later.token, "agent-c": token})
    collected = collector.collect(source, later, live=survivor)
    assert collected is not None
    assert (collected.gone, collected.stale) == ([], ["agent-c"])


def test_the_answer_for_all_apps_reads_back_with_each_shards_part() -> None:
    token = next_token(now=NOON)
    failure = {"sourceFailure": "fetch failed: no such branch"}
    source = answered(token, {"agent-a": token, "agent-b": token}, **{"agent-b": failure})
    collected = AnswerCollector().collect(
        source, ReconcileRequest(token, None), live=frozenset({"agent-a", "agent-b"})
    )
    assert collected is not None
    assert collected.source_failure == "fetch failed: no such branch"
    outcome = {
        "by": "agent-a",
        "shards": [a.to_json() for a in collected.answers],
        "goneShards": ["agent-c"],
    }
    status = {"lastHandledReconcileAt": token, "lastHandledReconcile": outcome}
    handled = handled_request({"status": status})
    assert handled is not None
    assert handled.shards == collected.answers
    assert handled.gone_shards == ["agent-c"]
    assert shard_answers(source)["agent-b"] == ShardAnswer(
        shard="agent-b",
        token=token,
        revision="abc",
        apps=3,
        writes=2,
        source_failure="fetch failed: no such branch",
    )
