"""One writer per environment, on a sandbox of its own (named "writer"): its apiserver is
paused by one test, and its audit log (every write, with the writer's User-Agent) is
what the tests read to tell who wrote. The fixture always resumes and takes it down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.reconcile import once
from conveyor.reconcile.engine import PassResult
from conveyor.reconcile.requests import REQUEST_MANAGER
from conveyor.reconcile.target import ResolvedTarget, Target
from conveyor.render.discover import EnvironmentTree
from conveyor.sandbox.components import audit_log
from tests.cluster.gitops import (
    ConfigRepo,
    chart_repo,
    conveyor,
    deployment,
    flux_v1_release,
    hold_lease,
    kubectl_json,
    wait_for,
)
from tests.cluster.serve import ServeProcess
from tests.cluster.test_agent import AgentProcess, sign, spec_replicas
from tests.conftest import SandboxHandle, start_sandbox

pytestmark = pytest.mark.cluster
# At most this many requests of one KubeClient are in flight (its connection slots).
IN_FLIGHT = 32
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def box() -> Iterator[SandboxHandle]:
    handle = start_sandbox("writer")
    try:
        yield handle
    finally:
        apiserver_pid(handle, resume=True)
        handle.sandbox.down()


def apiserver_pid(box: SandboxHandle, *, resume: bool = False) -> int:
    pid = next(c.pid for c in box.sandbox.status().components if c.name == "kube-apiserver")
    if resume:
        os.kill(pid, signal.SIGCONT)
    return pid


@pytest.fixture
def ns(box: SandboxHandle) -> Iterator[str]:
    name = f"w-{uuid.uuid4().hex[:8]}"
    box.run("kubectl", "create", "namespace", name)
    yield name
    box.run("kubectl", "delete", "namespace", name, "--wait=false", check=False)


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class AuditedWrite:
    user_agent: str
    verb: str
    uri: str
    namespace: str
    resource: str
    name: str
    code: int
    received: dt.datetime
    done: dt.datetime


def audited_writes(box: SandboxHandle, *, since: dt.datetime) -> list[AuditedWrite]:
    """Every write the apiserver answered since `since`, oldest first."""
    writes = []
    for line in audit_log(box.sandbox.layout).read_text().splitlines():
        event = json.loads(line)
        done = parse_time(event["stageTimestamp"])
        if done < since or event.get("stage") != "ResponseComplete":
            continue
        ref = event.get("objectRef") or {}
        writes.append(
            AuditedWrite(
                user_agent=event.get("userAgent", ""),
                verb=event["verb"],
                uri=event["requestURI"],
                namespace=ref.get("namespace", ""),
                resource=ref.get("resource", ""),
                name=ref.get("name", ""),
                code=int((event.get("responseStatus") or {}).get("code") or 0),
                received=parse_time(event["requestReceivedTimestamp"]),
                done=done,
            )
        )
    return sorted(writes, key=lambda w: w.done)


def lease_of(box: SandboxHandle, scope: str) -> Obj | None:
    return kubectl_json(box, "get", "lease", f"conveyor-{scope}", "-n", "conveyor-system")


def holder_of(box: SandboxHandle, scope: str) -> str | None:
    holder = (lease_of(box, scope) or {}).get("spec", {}).get("holderIdentity")
    return str(holder) if holder else None


def config_maps(namespace: str, apps: int, version: str) -> dict[str, str]:
    return {
        f"app{i:02d}/config.yaml": f"""
apiVersion: v1
kind: ConfigMap
metadata:
  name: app{i:02d}
  namespace: {namespace}
data:
  version: "{version}"
"""
        for i in range(apps)
    }


def write_all(repo: ConfigRepo, path: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        repo.write(f"{path}/{name}", text)


def answered_in(log: Path) -> bool:
    return any("reconcile of" in line and "4/4 Ready" in line for line in log.open())


def reconcile(box: SandboxHandle, repo: ConfigRepo, path: str, *extra: str) -> Any:
    return conveyor(box, "reconcile", "--repo", repo.url, "--path", path, *extra)


def test_reconcile_without_an_agent_takes_and_releases_the_lease(
    box: SandboxHandle, ns: str, tmp_path: Path
) -> None:
    repo = ConfigRepo(tmp_path)
    path = f"solo-{ns}"
    write_all(repo, path, config_maps(ns, 3, "1"))
    repo.commit()
    since = dt.datetime.now(dt.UTC)
    result = reconcile(box, repo, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "holding lease conveyor-" in result.stderr

    lease = lease_of(box, path)
    assert lease is not None
    assert not lease["spec"].get("holderIdentity"), lease["spec"]  # released
    writes = audited_writes(box, since=since)
    lease_writes = [w for w in writes if w.resource == "leases" and w.name == f"conveyor-{path}"]
    assert lease_writes[0].verb == "create"
    assert lease_writes[-1].verb == "update"  # the release
    cli = {w.user_agent for w in lease_writes}
    assert len(cli) == 1 and next(iter(cli)).startswith("conveyor/cli-"), cli
    # Every object of the pass was written by that same command, while it held the lease.
    own = [w for w in writes if w.namespace == ns]
    assert own and {w.user_agent for w in own} == cli
    assert lease_writes[0].done <= own[0].received
    assert own[-1].done <= lease_writes[-1].received


def test_with_a_stale_lease_the_command_waits_for_it_to_expire_then_runs(
    box: SandboxHandle, ns: str, tmp_path: Path
) -> None:
    repo = ConfigRepo(tmp_path)
    path = f"stale-{ns}"
    write_all(repo, path, config_maps(ns, 2, "1"))
    repo.commit()
    assert reconcile(box, repo, path).returncode == 0  # the environment exists, unheld
    write_all(repo, path, config_maps(ns, 2, "2"))
    repo.commit()
    # An agent that died holding the lease: its last renewal long ago, 8 s of lease.
    hold_lease(box, path, "agent-gone", duration=8, renewed_ago=30)

    started = time.monotonic()
    result = reconcile(box, repo, path, "--timeout", "60")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held by agent-gone" in result.stderr, result.stderr
    # It waited out the lease as it saw it (8 s from its first look), then ran.
    assert took >= 8, took
    config_map = kubectl_json(box, "get", "configmap", "app00", "-n", ns)
    assert config_map is not None and config_map["data"]["version"] == "2"
    assert not (lease_of(box, path) or {}).get("spec", {}).get("holderIdentity")

    # A live holder is never written past: with --timeout shorter than its lease, the
    # command gives up, exits 1, names the holder, and nothing is written.
    hold_lease(box, path, "cli-elsewhere-1", duration=60)
    write_all(repo, path, config_maps(ns, 2, "3"))
    repo.commit()
    result = reconcile(box, repo, path, "--timeout", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "held by cli-elsewhere-1" in result.stderr
    config_map = kubectl_json(box, "get", "configmap", "app00", "-n", ns)
    assert config_map is not None and config_map["data"]["version"] == "2"


def test_an_agent_answers_concurrent_reconciles_and_is_the_only_writer(
    box: SandboxHandle, ns: str, tmp_path: Path
) -> None:
    charts = chart_repo(tmp_path)
    repo = ConfigRepo(tmp_path)
    path = f"busy-{ns}"
    releases = ("api", "web")
    for name in releases:
        repo.write(f"{path}/{name}/release.yaml", flux_v1_release(name, ns, charts, tag="1.0.0"))
    write_all(repo, path, config_maps(ns, 2, "1"))
    repo.commit()
    agent = AgentProcess(box, repo, path, tmp_path, "--interval", "600s")
    dashboards = [ServeProcess(box, tmp_path, "--repo", repo.url) for _ in range(2)]
    try:
        agent.wait_ready(timeout=180)
        identity = holder_of(box, path)
        assert identity and not identity.startswith("cli-")

        for name in releases:
            repo.write(
                f"{path}/{name}/release.yaml", flux_v1_release(name, ns, charts, tag="1.1.0")
            )
        write_all(repo, path, config_maps(ns, 2, "2"))
        repo.commit("roll out 1.1.0")
        since = dt.datetime.now(dt.UTC)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            rollout = pool.submit(agent.hook, b"{}", sign(b"{}"))
            runs = [pool.submit(reconcile, box, repo, path, "-o", "json") for _ in range(5)]
            clicks = [
                pool.submit(
                    httpx.post,
                    f"{dashboard.url}/api/v1/environments/{path}/actions/reconcile",
                    headers=dashboard.auth,
                    timeout=60,
                )
                for dashboard in dashboards
            ]
            assert rollout.result().status_code == 202
            answers = [c.result() for c in clicks]
            assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
            results = [r.result() for r in runs]
        outputs = "\n".join(r.stdout + r.stderr for r in results)
        for result in results:
            assert result.returncode == 0, result.stdout + result.stderr
            report = json.loads(result.stdout)
            assert {i["name"] for i in report["items"]} == {*releases, "app00", "app01"}
            assert all(i["ready"] for i in report["items"]), report
        assert "asked agent" in outputs
        for dashboard in dashboards:
            wait_for(
                partial(answered_in, dashboard.log),
                timeout=180,
                what="the dashboard's reconcile answered",
            )
        logs = outputs + agent.log.read_text() + "".join(d.log.read_text() for d in dashboards)
    finally:
        for dashboard in dashboards:
            dashboard.stop()
        agent.stop()
    assert "another operation" not in logs

    for name in releases:
        history = json.loads(box.run("helm", "history", name, "-n", ns, "-o", "json").stdout)
        revisions = [int(r["revision"]) for r in history]
        assert revisions == list(range(1, len(revisions) + 1)), history
        assert history[-1]["status"] == "deployed", history
        assert history[-1]["app_version"] or history[-1]["chart"]
        values = json.loads(box.run("helm", "get", "values", name, "-n", ns, "-o", "json").stdout)
        assert values["image"]["tag"] == "1.1.0"

    writes = [w for w in audited_writes(box, since=since) if w.user_agent.startswith("conveyor/")]
    in_namespace = {w.user_agent for w in writes if w.namespace == ns}
    assert in_namespace == {f"conveyor/{identity}"}, in_namespace
    others = [w for w in writes if w.user_agent != f"conveyor/{identity}"]
    # The commands and dashboards wrote nothing but their requests on the source status.
    assert others, "the commands asked the agent"
    for write in others:
        assert (write.resource, write.name, write.verb) == ("conveyorapps", path, "patch"), write
        assert f"fieldManager={REQUEST_MANAGER}" in write.uri, write
    assert {w.user_agent.split("-", 1)[0] for w in others} <= {"conveyor/cli", "conveyor/dashboard"}
    assert any(w.user_agent.startswith("conveyor/dashboard-") for w in others)


def test_a_paused_apiserver_past_the_lease_no_write_of_the_old_holder_lands_late(
    box: SandboxHandle, ns: str, tmp_path: Path
) -> None:
    """The apiserver and the leader freeze mid-rollout for longer than the lease; the
    apiserver comes back first and the standby takes over; then the old leader wakes up
    in the middle of its pass. From then on it must not write at all. What it had sent
    before the freeze is out of its hands: the apiserver still processes those requests
    when it resumes (the audit shows them received in that first second, before the
    standby's term), and that is all of the old leader's writes after its lease ended."""
    repo = ConfigRepo(tmp_path)
    path = f"pause-{ns}"
    apps = 60
    write_all(repo, path, config_maps(ns, apps, "1"))
    repo.commit()
    lease_seconds = 6.0
    options = ("--interval", "600s", "--lease-duration", str(lease_seconds))
    agents = [AgentProcess(box, repo, path, tmp_path, *options, name="leader")]
    leader = agents[0]
    try:
        leader.wait_ready(timeout=180)
        old = holder_of(box, path)
        assert old
        agents.append(AgentProcess(box, repo, path, tmp_path, *options, name="standby"))
        time.sleep(3)  # the standby is up and waiting for the lease
        assert holder_of(box, path) == old

        write_all(repo, path, config_maps(ns, apps, "2"))
        repo.commit("version 2 of every app")
        since = dt.datetime.now(dt.UTC)
        assert leader.hook(b"{}", sign(b"{}")).status_code == 202

        def rollout_begun() -> bool:
            live = kubectl_json(box, "get", "configmaps", "-n", ns)
            return any(
                i.get("data", {}).get("version") == "2" for i in (live or {}).get("items", [])
            )

        wait_for(rollout_begun, timeout=60, what="the rollout to begin")
        apiserver = apiserver_pid(box)
        os.kill(apiserver, signal.SIGSTOP)
        os.kill(leader.process.pid, signal.SIGSTOP)
        try:
            time.sleep(lease_seconds + 8)
        finally:
            os.kill(apiserver, signal.SIGCONT)
            resumed = dt.datetime.now(dt.UTC)
        try:
            standby = wait_for(
                lambda: (holder_of(box, path) or old) != old and holder_of(box, path),
                timeout=30,
                what="the standby to take the lease",
            )
        finally:
            os.kill(leader.process.pid, signal.SIGCONT)
        woke = dt.datetime.now(dt.UTC)

        def all_at(version: str) -> bool:
            live = kubectl_json(box, "get", "configmaps", "-n", ns)
            items = [
                i
                for i in (live or {}).get("items", [])
                if i["metadata"]["name"] != "kube-root-ca.crt"
            ]
            return len(items) == apps and all(i["data"]["version"] == version for i in items)

        wait_for(lambda: all_at("2"), timeout=180, what="every app at version 2")
        time.sleep(lease_seconds)  # time for the old leader to write, were it to
        live_maps = kubectl_json(box, "get", "configmaps", "-n", ns)
    finally:
        for agent in agents:
            os.kill(agent.process.pid, signal.SIGCONT)
            agent.stop()

    writes = audited_writes(box, since=since)
    # Terms from the whole log: the term the pass began in started before `since`.
    every_write = audited_writes(box, since=dt.datetime.min.replace(tzinfo=dt.UTC))
    held = terms(every_write, f"conveyor-{path}", seconds=lease_seconds)
    old_agent, new_agent = f"conveyor/{old}", f"conveyor/{standby}"
    assert set(held) == {old_agent, new_agent}, held
    objects = [w for w in writes if w.namespace == ns or w.resource == "conveyorapps"]
    landed = [w for w in objects if w.user_agent in held and w.code < 300]
    old_writes = [w for w in landed if w.user_agent == old_agent]
    new_writes = [w for w in landed if w.user_agent == new_agent]
    assert old_writes and new_writes  # the rollout began before the freeze, ended after
    takeover = min(a for a, _b in held[new_agent])
    old_end = max(b for _a, b in held[old_agent] if b < takeover)
    assert old_end < takeover  # the lease lapsed: nobody held it in between
    # Nothing the old leader started after waking up landed. Frozen from the freeze until
    # it woke, it sent nothing in between: whatever of its writes the apiserver received
    # after its lease ended was on the wire, inside the apiserver, or between the write
    # guard's check and the socket (a frozen process finishes that send when it wakes) at
    # the freeze. Those arrive at once on waking; a write the old leader began after
    # waking would be refused by its guard, or arrive later than that.
    late = [w for w in old_writes if w.received >= woke]
    assert all(w.received <= woke + dt.timedelta(seconds=0.5) for w in late), [
        (w.name, w.received.time(), w.done.time()) for w in late
    ]
    assert len(late) <= IN_FLIGHT, late
    in_flight = [w for w in old_writes if w.done > old_end]
    assert all(w.received <= resumed + dt.timedelta(seconds=1.5) for w in in_flight)
    print(
        f"{len(in_flight)} writes in flight at the freeze landed after the lease ended, "
        f"{sum(w.done >= takeover for w in in_flight)} of them after the takeover; "
        "none was sent after it"
    )
    # The new holder wrote only in its own term.
    assert all(any(a <= w.done <= b for a, b in held[new_agent]) for w in new_writes)
    # managedFields agree: each object was last written in one of the terms, or by a
    # write in flight at the freeze.
    slack = dt.timedelta(seconds=1)  # managedFields times have whole seconds
    spans = [span for spans in held.values() for span in spans]
    spans += [(w.done, w.done) for w in in_flight]
    for item in (live_maps or {}).get("items", []):
        for entry in item["metadata"].get("managedFields", []):
            if entry.get("manager") == "conveyor":
                at = parse_time(entry["time"])
                assert any(a - slack <= at <= b + slack for a, b in spans), item["metadata"]


def first_lapse(held: dict[str, list[tuple[dt.datetime, dt.datetime]]]) -> dt.datetime | None:
    """The first moment no holder's term covers, after the first term began."""
    spans = sorted(span for spans in held.values() for span in spans)
    covered = spans[0][1]
    for start, end in spans[1:]:
        if start > covered:
            return covered
        covered = max(covered, end)
    return None


def terms(
    writes: list[AuditedWrite], lease: str, *, seconds: float
) -> dict[str, list[tuple[dt.datetime, dt.datetime]]]:
    """When each writer held `lease`, by the audit: from each successful acquire or
    renewal until the lease duration after it (its renewTime is set before it is sent,
    so no later than the apiserver received it). A release reads as one more renewal:
    at Metadata level the audit does not show the holder, so that bound is generous."""
    held: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for write in writes:
        if write.resource == "leases" and write.name == lease and write.code < 300:
            if write.verb in ("create", "update"):
                end = write.received + dt.timedelta(seconds=seconds)
                held.setdefault(write.user_agent, []).append((write.done, end))
    return held


def test_a_one_pass_reconcile_keeps_its_lease_through_a_step_longer_than_the_lease(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`conveyor reconcile`'s own pass renews on a loop of its own, as an agent does: a
    step that holds the pass's loop for 2.5 leases (rendering thousands of apps does)
    no longer costs it the Lease, and with it every write after."""
    lease = 4.0
    repo = ConfigRepo(tmp_path)
    path = f"envs/busy-{namespace}"
    for name in ("a", "b", "c"):
        repo.write(f"{path}/{name}/deploy.yaml", deployment(name, namespace))
    repo.commit("three apps")
    discover = once.discover_target

    def held_loop(resolved: ResolvedTarget) -> EnvironmentTree:
        time.sleep(2.5 * lease)  # blocking, as CPU-bound rendering is
        return discover(resolved)

    monkeypatch.setattr(once, "discover_target", held_loop)
    target = Target(repo=repo.url, path=path, kubeconfig=str(sandbox.kubeconfig))
    result = asyncio.run(once.reconcile_once(target, lease_duration=lease, notify_grace=0))
    assert isinstance(result, PassResult) and result.all_ready, result
    assert sorted(spec_replicas(sandbox, namespace, n) for n in ("a", "b", "c")) == [1, 1, 1]
