"""Probes and `sandbox up` tell the truth: an agent's /readyz fails while its cluster or
its git cannot be reached and recovers with them, and `conveyor sandbox up` on a
sandbox with dead components restarts them in place (same port, PKI and etcd data), so
the agent that kept dialing the old address comes back by itself.

This kills a sandbox's etcd and apiserver, so it runs on a sandbox of its own, which the
fixture starts and always stops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.sandbox import process
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, wait_for
from tests.cluster.test_agent import AgentProcess
from tests.conftest import SandboxHandle, start_sandbox

pytestmark = pytest.mark.cluster


@pytest.fixture
def own_sandbox() -> Iterator[SandboxHandle]:
    handle = start_sandbox("truth-mend")
    try:
        yield handle
    finally:
        handle.sandbox.down()


def probe(agent: AgentProcess, path: str) -> tuple[int, str]:
    try:
        response = httpx.get(f"{agent.url}{path}", timeout=10)
    except httpx.HTTPError as error:
        return 0, str(error)
    return response.status_code, response.text


def not_ready(agent: AgentProcess) -> str | None:
    """/readyz's answer when it refuses, else None."""
    code, text = probe(agent, "/readyz")
    return text if code == 503 else None


def test_readyz_follows_the_cluster_and_git_and_sandbox_up_mends_in_place(
    own_sandbox: SandboxHandle, tmp_path: Path
) -> None:
    box = own_sandbox.sandbox
    own_sandbox.run("kubectl", "create", "namespace", "kept")
    own_sandbox.run("kubectl", "create", "configmap", "marker", "-n", "kept", "--from-literal=a=1")
    repo = ConfigRepo(tmp_path)
    path = "envs/probes"
    repo.write(f"{path}/web/deploy.yaml", deployment("web", "kept"))
    repo.commit("web")
    agent = AgentProcess(own_sandbox, repo, path, tmp_path, "--interval", "2s")
    try:
        agent.wait_ready()
        assert probe(agent, "/readyz") == (200, "ok")
        before = box.state()
        assert before is not None
        kubeconfig = box.kubeconfig.read_text()

        # etcd and the apiserver die: the agent is alive, but not ready.
        for record in before.components:
            if record.name in ("etcd", "kube-apiserver"):
                process.stop(record.process)
        text = wait_for(
            lambda: not_ready(agent),
            timeout=15,
            what="/readyz to fail without a cluster",
        )
        assert text.startswith("not ready: cluster:"), text
        assert probe(agent, "/healthz") == (200, "ok")

        mended = conveyor(own_sandbox, "sandbox", "up", "--name", "truth-mend")
        assert mended.returncode == 0, mended.stdout + mended.stderr
        after = box.state()
        assert after is not None
        assert after.ports == before.ports
        pids_before = {c.name: c.pid for c in before.components}
        pids_after = {c.name: c.pid for c in after.components}
        restarted = {name for name, pid in pids_after.items() if pid != pids_before[name]}
        assert restarted == {"etcd", "kube-apiserver"}  # the others kept running
        assert box.kubeconfig.read_text() == kubeconfig  # same server, same PKI
        assert box.status().ready
        live = json.loads(
            own_sandbox.run(
                "kubectl", "get", "configmap", "marker", "-n", "kept", "-o", "json"
            ).stdout
        )
        assert live["data"] == {"a": "1"}  # etcd kept its data
        wait_for(
            lambda: probe(agent, "/readyz") == (200, "ok"),
            timeout=60,
            what="/readyz back once the sandbox is mended",
        )

        # git away: not ready at the next fetch (every 2 s), ready again once it is back.
        moved = repo.bare.with_name("config-away.git")
        repo.bare.rename(moved)
        text = wait_for(
            lambda: not_ready(agent),
            timeout=30,
            what="/readyz to fail without git",
        )
        assert text.startswith("not ready: git:"), text
        moved.rename(repo.bare)
        wait_for(
            lambda: probe(agent, "/readyz") == (200, "ok"),
            timeout=30,
            what="/readyz back with git",
        )
    finally:
        agent.stop()
