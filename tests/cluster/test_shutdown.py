"""SIGTERM to a leading agent mid-apply, on the sandbox, with a standby beside it.

The apply in flight is a `helm upgrade --install` held up by a pre-install hook: a bare
Pod, which kwok runs but never completes (it completes only Jobs' pods), so helm waits
on it until the test marks it Succeeded, or until the agent stops helm. The standby is
a second agent on the same environment; it must take the released Lease within its
retry interval (2 s), not after the lease duration (30 s here).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.gitops import ConfigRepo, chart_repo, flux_v1_release, kubectl_json, wait_for
from tests.cluster.test_agent import AgentProcess
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster
HOOK = """
apiVersion: v1
kind: Pod
metadata:
  name: {{ .Release.Name }}-migrate
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
spec:
  restartPolicy: Never
  containers:
    - name: migrate
      image: registry.local/migrate:1
"""
SETTINGS = """
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: {namespace}
data:
  mode: test
"""
TAKEOVER = 3.0  # seconds: the standby's 2 s retry interval, and a request's time


@pytest.fixture
def started() -> Iterator[list[AgentProcess]]:
    """Agents to stop after the test: with SIGTERM first, so that a helm still waiting on
    the hook is stopped by its agent rather than left running on its own."""
    agents: list[AgentProcess] = []
    yield agents
    for agent in agents:
        agent.stop(signal.SIGTERM)


def release_status(sandbox: SandboxHandle, namespace: str, name: str) -> str | None:
    listed = json.loads(sandbox.run("helm", "list", "--all", "-n", namespace, "-o", "json").stdout)
    return next((r["status"] for r in listed if r["name"] == name), None)


def history(sandbox: SandboxHandle, namespace: str, name: str) -> dict[int, str]:
    """The release's revisions and their statuses."""
    listed = json.loads(sandbox.run("helm", "history", name, "-n", namespace, "-o", "json").stdout)
    return {int(r["revision"]): r["status"] for r in listed}


def holder(sandbox: SandboxHandle, scope: str) -> str | None:
    lease = kubectl_json(sandbox, "get", "lease", f"conveyor-{scope}", "-n", "conveyor-system")
    found = (lease or {}).get("spec", {}).get("holderIdentity")
    return str(found) if found else None


def is_agent(identity: str | None, agent: AgentProcess) -> bool:
    """Agent identities are `<host>-<pid>-<random>`."""
    return identity is not None and f"-{agent.process.pid}-" in identity


def hook_pod(sandbox: SandboxHandle, namespace: str) -> bool:
    return kubectl_json(sandbox, "get", "pod", "ui-migrate", "-n", namespace) is not None


@dataclass(frozen=True)
class Scene:
    leader: AgentProcess
    standby: AgentProcess
    scope: str
    revision: str


def leader_mid_helm_install(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    started: list[AgentProcess],
    *,
    grace: str,
) -> Scene:
    """A leader whose `helm upgrade --install` waits on the hook, and a standby. The
    release is committed once both run, so that helm is at the hook when the test goes
    on, however slowly the agents started."""
    repo = ConfigRepo(tmp_path)
    charts = chart_repo(tmp_path, extra_templates={"migrate-hook.yaml": HOOK})
    path = f"envs/stop-{namespace}"
    repo.write(f"{path}/settings/settings.yaml", SETTINGS.format(namespace=namespace))
    repo.commit("an app to start with")
    scope = path.replace("/", "-")
    # A lease longer than the default (15 s), so that the leader's helm run, which may
    # last only as long as the lease is sure to be held, is not cut off by it here.
    lease = ("--lease-duration", "30", "--interval", "2s")
    leader = AgentProcess(
        sandbox, repo, path, tmp_path, *lease, "--shutdown-grace", grace, name="leader"
    )
    started.append(leader)
    wait_for(lambda: is_agent(holder(sandbox, scope), leader), timeout=60, what="a leader")
    standby = AgentProcess(
        sandbox, repo, path, tmp_path, *lease, "--shutdown-grace", "1", name="standby"
    )
    started.append(standby)
    wait_for(lambda: "waiting to lead" in standby.log.read_text(), timeout=60, what="a standby")
    repo.write(f"{path}/ui.yaml", flux_v1_release("ui", namespace, charts, timeout=120))
    revision = repo.commit("a release with a pre-install hook")
    wait_for(lambda: hook_pod(sandbox, namespace), timeout=60, what="helm at the hook")
    assert release_status(sandbox, namespace, "ui") == "pending-install"
    return Scene(leader, standby, scope, revision)


def stopped_in(agent: AgentProcess, timeout: float) -> float:
    """Seconds until `agent` exits after SIGTERM (sent now)."""
    sent = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    try:
        agent.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {timeout}s after SIGTERM:\n{agent.log.read_text()[-3000:]}")
    return time.monotonic() - sent


def taken_over_in(sandbox: SandboxHandle, scope: str, standby: AgentProcess) -> float:
    """Seconds until the standby holds the Lease (from now)."""
    since = time.monotonic()
    wait_for(lambda: is_agent(holder(sandbox, scope), standby), timeout=30, what="takeover")
    return time.monotonic() - since


def test_sigterm_mid_helm_install_finishes_it_releases_the_lease_and_the_standby_leads(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path, started: list[AgentProcess]
) -> None:
    scene = leader_mid_helm_install(sandbox, namespace, tmp_path, started, grace="20")
    leader, standby, scope = scene.leader, scene.standby, scene.scope
    leader.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    time.sleep(2)
    assert leader.process.poll() is None, leader.log.read_text()[-3000:]  # finishing
    assert is_agent(holder(sandbox, scope), leader)  # and still the one writer
    # The hook completes: helm's install goes on, and the agent's pass with it.
    sandbox.run(
        "kubectl", "patch", "pod", "ui-migrate", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", '{"status": {"phase": "Succeeded"}}',
    )  # fmt: skip
    assert leader.process.wait(timeout=30) == 0, leader.log.read_text()[-3000:]
    print(f"leader exited {time.monotonic() - sent:.1f}s after SIGTERM (hook done at 2 s)")
    assert time.monotonic() - sent < 20  # within the grace
    assert release_status(sandbox, namespace, "ui") == "deployed"
    status = kubectl_json(sandbox, "get", "conveyorapp", f"{scope}.ui", "-n", "conveyor-system")
    assert status is not None, "no status"
    saved = status.get("status", {})  # saved before exiting
    assert (saved.get("state"), saved.get("lastAppliedRevision")) == ("Ready", scene.revision)
    assert "pass done: 2/2 Ready" in leader.log.read_text()
    takeover = taken_over_in(sandbox, scope, standby)
    print(f"standby leads {takeover:.1f}s after the leader exited")
    assert takeover < TAKEOVER

    idle_stop = stopped_in(standby, timeout=15)
    print(f"idle standby-turned-leader exited {idle_stop:.1f}s after SIGTERM")
    assert idle_stop < 5  # idle: at once
    assert standby.process.returncode == 0
    assert holder(sandbox, scope) is None  # released


def test_sigterm_mid_helm_install_past_the_grace_stops_helm_without_a_pending_release(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path, started: list[AgentProcess]
) -> None:
    scene = leader_mid_helm_install(sandbox, namespace, tmp_path, started, grace="3")
    leader, standby, scope = scene.leader, scene.standby, scene.scope
    # 3 s of grace, then helm gets SIGTERM and marks the release failed: well under
    # Kubernetes' 30 s.
    stopped = stopped_in(leader, timeout=30)
    print(f"leader exited {stopped:.1f}s after SIGTERM (grace 3 s)")
    assert stopped < 3 + 7, leader.log.read_text()[-3000:]
    assert leader.process.returncode == 0, leader.log.read_text()[-3000:]
    assert "abandoning it" in leader.log.read_text()
    assert history(sandbox, namespace, "ui")[1] == "failed"  # not pending-install
    takeover = taken_over_in(sandbox, scope, standby)
    print(f"standby leads {takeover:.1f}s after the leader exited")
    assert takeover < TAKEOVER
    # The standby tries the release again and waits on the hook in turn; stopped the
    # same way, it leaves no pending release either.
    wait_for(
        lambda: history(sandbox, namespace, "ui").get(2) == "pending-upgrade",
        timeout=60,
        what="the standby's helm at the hook",
    )
    assert stopped_in(standby, timeout=30) < 1 + 7
    assert standby.process.returncode == 0
    assert history(sandbox, namespace, "ui") == {1: "failed", 2: "failed"}
    assert holder(sandbox, scope) is None
