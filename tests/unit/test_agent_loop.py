"""The agent's loop outlives any error of a pass and backs off between failures.

Fast checks with a scripted pass; tests/cluster/test_agent_outage.py kills a real
apiserver under a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from conveyor.cluster.client import ApiError
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.reconcile import agent as agent_module
from conveyor.reconcile.agent import Agent, AgentOptions, Backoff
from conveyor.reconcile.status import SOURCE_KIND, AppStatus, Reason
from conveyor.reconcile.target import Target
from conveyor.render.helm import HelmError
from conveyor.source.git import GitError, run_git


def test_backoff_doubles_up_to_its_cap_and_starts_again_after_a_success() -> None:
    backoff = Backoff(first=1.0, cap=30.0)
    assert [backoff.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    backoff.reset()
    assert backoff.next_delay() == 1


class Elector:
    def __init__(self) -> None:
        self.is_leader = True
        self.lost = asyncio.Event()


class Engine:
    def __init__(self) -> None:
        self.drifted: asyncio.Queue[str] = asyncio.Queue()
        self.options = SimpleNamespace(scope="env")


def test_every_kind_of_pass_error_is_logged_counted_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[Exception] = [
        HelmError("history", "Kubernetes cluster unreachable"),
        httpx.ConnectError("All connection attempts failed"),
        ApiError(503, "ServiceUnavailable", "apiserver is shutting down"),
        GitError(["git", "fetch"], 128, "fatal: could not read from remote"),
        OSError(28, "No space left on device"),
        KeyError("a bug"),
    ]
    target = Target(repo=str(tmp_path), path="env", kubeconfig=str(tmp_path / "no-kubeconfig"))
    agent = Agent(target, options=AgentOptions(interval=0.01, backoff_first=0.01, backoff_cap=0.04))
    elector, engine = Elector(), Engine()
    passes = 0

    async def fetch() -> object:
        return object()

    async def scripted_pass(_engine: Any, _resolved: Any, **_request: Any) -> None:
        nonlocal passes
        passes += 1
        if errors:
            raise errors.pop(0)
        elector.is_leader = False  # a good pass; then stop the loop

    recorded: list[tuple[str, str]] = []

    async def record(_target: Target, message: str, **options: Any) -> str:
        recorded.append((options["reason"], message))
        if len(recorded) % 2:  # and when the cluster is what failed, recording fails too
            raise httpx.ConnectError("All connection attempts failed")
        return "env"

    monkeypatch.setattr(agent_module, "record_source_failure", record)
    agent._fetch = fetch  # type: ignore[method-assign]
    agent._pass = scripted_pass  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="conveyor.agent"):
        asyncio.run(agent._loop(engine, elector, None))  # type: ignore[arg-type]

    assert passes == 7
    failures = [r for r in caplog.records if r.getMessage().startswith("pass failed")]
    assert [r.getMessage().split(";")[0] for r in failures] == [
        "pass failed: helm history: Kubernetes cluster unreachable",
        "pass failed: ConnectError: All connection attempts failed",
        "pass failed: HTTP 503 ServiceUnavailable: apiserver is shutting down",
        "pass failed: git fetch failed (128): fatal: could not read from remote",
        "pass failed: OSError: [Errno 28] No space left on device",
        "pass failed: KeyError: 'a bug'",
    ]
    assert all(r.exc_info for r in failures)  # with the traceback
    assert [message for _, message in recorded] == [r.getMessage().split(";")[0] for r in failures]
    assert {reason for reason, _ in recorded} == {Reason.RECONCILE_FAILED}
    assert agent._backoff.failures == 0  # the good pass reset it
    counted = agent.metrics.registry.get_sample_value(
        "conveyor_pass_failures_total", {"error": "KeyError"}
    )
    assert counted == 1


def scripted_agent(tmp_path: Path, *, grace: float) -> Agent:
    target = Target(repo=str(tmp_path), path="env", kubeconfig=str(tmp_path / "no-kubeconfig"))
    agent = Agent(target, options=AgentOptions(interval=60.0, shutdown_grace=grace))

    async def fetch() -> object:
        return object()

    agent._fetch = fetch  # type: ignore[method-assign]
    return agent


def run_loop(agent: Agent) -> float:
    """The leader's loop as `run` runs it (so `stop` can end it); seconds it took."""

    async def scenario() -> None:
        agent._task = asyncio.current_task()
        await agent._loop(Engine(), Elector(), None)  # type: ignore[arg-type]

    started = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    return time.monotonic() - started


def test_sigterm_mid_pass_lets_the_pass_finish_then_leaves_the_loop(tmp_path: Path) -> None:
    agent = scripted_agent(tmp_path, grace=10.0)
    finished: list[str] = []

    async def scripted_pass(_engine: Any, _resolved: Any, **_request: Any) -> None:
        agent.stop()  # SIGTERM arrives mid-pass
        await asyncio.sleep(0.3)  # the rest of the pass: applies, statuses
        finished.append("pass")

    agent._pass = scripted_pass  # type: ignore[method-assign]
    seconds = run_loop(agent)
    assert finished == ["pass"]
    assert seconds < 5  # not the 60 s interval, nor the 10 s grace


def test_sigterm_mid_pass_abandons_a_pass_that_outlasts_the_grace(tmp_path: Path) -> None:
    agent = scripted_agent(tmp_path, grace=0.5)
    cancelled: list[str] = []

    async def endless_pass(_engine: Any, _resolved: Any, **_request: Any) -> None:
        agent.stop()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append("pass")
            raise

    agent._pass = endless_pass  # type: ignore[method-assign]
    seconds = run_loop(agent)
    assert cancelled == ["pass"]
    assert 0.5 <= seconds < 5


def test_sigterm_between_passes_stops_at_once(tmp_path: Path) -> None:
    agent = scripted_agent(tmp_path, grace=10.0)
    passes: list[str] = []

    async def quick_pass(_engine: Any, _resolved: Any, **_request: Any) -> None:
        passes.append("pass")
        asyncio.get_running_loop().call_later(0.2, agent.stop)  # while waiting for a trigger

    agent._pass = quick_pass  # type: ignore[method-assign]
    seconds = run_loop(agent)
    assert passes == ["pass"]
    assert seconds < 5


class SourceStore:
    """The engine's status store, as far as a source's status goes: what was saved."""

    def __init__(self) -> None:
        self.saved: list[AppStatus] = []

    async def load_all(self, *, scope: str) -> list[AppStatus]:
        return []

    async def save(self, status: AppStatus) -> bool:
        self.saved.append(status)
        return True


def test_a_source_failure_is_recorded_by_the_leading_agent_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = EnvironmentIdentity.of(str(tmp_path), branch="main", path="env", name="env")
    agent = Agent(Target(repo=str(tmp_path), path="env"), options=AgentOptions())
    store = SourceStore()
    elector = SimpleNamespace(may_write=False)
    agent._engine = SimpleNamespace(  # type: ignore[assignment]
        options=SimpleNamespace(scope="env", identity=identity), store=store
    )
    agent._elector = elector  # type: ignore[assignment]

    async def unguarded(*_args: Any, **_options: Any) -> str:
        raise AssertionError("an agent with a cluster records through its engine only")

    monkeypatch.setattr(agent_module, "record_source_failure", unguarded)
    record = partial(agent._record_source_failure, resolved=None, reason=Reason.FETCH_FAILED)
    asyncio.run(record("git fetch failed"))
    assert store.saved == []  # standing by: the leader records its own
    elector.may_write = True
    asyncio.run(record("git fetch failed"))
    assert [(s.scope, s.kind, s.reason, s.message, s.owner) for s in store.saved] == [
        ("env", SOURCE_KIND, Reason.FETCH_FAILED, "git fetch failed", identity.id)
    ]


def agent_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--interval", "abc"], "error: --interval: invalid duration 'abc'"),
        (["--lease-duration", "0"], "error: --lease-duration must be positive, not 0.0"),
        (["--shutdown-grace", "-1"], "error: --shutdown-grace must not be negative, not -1.0"),
        (["--listen", "127.0.0.1:http"], "error: --listen wants HOST:PORT, not '127.0.0.1:http'"),
    ],
)
def test_a_startup_misconfiguration_stops_the_agent_with_one_line(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    result = agent_cli("--repo", str(tmp_path), "--path", "env", *flags)
    assert (result.returncode, result.stderr.strip()) == (2, message)


def test_a_kubeconfig_that_cannot_be_loaded_stops_the_agent_after_the_first_fetch(
    tmp_path: Path,
) -> None:
    work = tmp_path / "config"
    (work / "env").mkdir(parents=True)
    (work / "env" / "config.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")
    run_git(["init", "--quiet", "--initial-branch", "main", str(work)])
    run_git(["add", "--all"], cwd=work)
    run_git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "env"], cwd=work)
    missing = tmp_path / "no-such-kubeconfig"
    result = agent_cli("--repo", str(work), "--path", "env", "--kubeconfig", str(missing))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert str(missing) in result.stderr.splitlines()[-1]
