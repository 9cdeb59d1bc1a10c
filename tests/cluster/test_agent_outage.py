"""The apiserver goes away while `helm upgrade` is in flight: helm fails, `helm history`
fails too, and the agent lives on, reports it, backs off, and brings the app to Ready
once the apiserver is back.

This stops an apiserver, so it runs on a sandbox of its own (named "robust"), never on
the shared one other tests use; the fixture always takes it down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, conveyor_apps, kubectl_json, wait_for
from tests.cluster.test_agent import AgentProcess
from tests.conftest import SandboxHandle, start_sandbox

pytestmark = pytest.mark.cluster
CONFIG_MAPS = 60  # enough objects that an upgrade takes seconds, not milliseconds


@pytest.fixture
def own_sandbox() -> Iterator[SandboxHandle]:
    handle = start_sandbox("robust")
    try:
        yield handle
    finally:
        handle.sandbox.down()


def many_config_maps_chart(root: Path) -> str:
    """A git repository holding a chart of CONFIG_MAPS ConfigMaps that carry `version`."""
    bare, work = root / "charts.git", root / "charts"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "master", str(bare)])
    run_git(["init", "--quiet", "--initial-branch", "master", str(work)])
    chart = work / "many"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: many\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text(f"version: '1'\ncount: {CONFIG_MAPS}\n")
    (chart / "templates" / "config.yaml").write_text(
        "{{- range $i := until (int .Values.count) }}\n"
        "---\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: {{ $.Release.Name }}-{{ $i }}\n"
        "data:\n"
        "  version: {{ $.Values.version | quote }}\n"
        "{{- end }}\n"
    )
    run_git(["add", "--all"], cwd=work)
    run_git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "chart"], cwd=work)
    run_git(["push", "--quiet", str(bare), "HEAD:master"], cwd=work)
    return f"file://{bare}"


def release(namespace: str, chart_git: str, version: str) -> str:
    return f"""
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: many
  namespace: {namespace}
spec:
  releaseName: many
  timeout: 120
  chart:
    git: {chart_git}
    path: many
    ref: master
  values:
    version: "{version}"
"""


def wait_for_pending_upgrade(box: SandboxHandle, namespace: str, timeout: float) -> None:
    """Return as soon as helm has recorded revision 2 as pending-upgrade: the upgrade has
    begun and is applying its objects."""

    async def watch() -> None:
        async with box.client() as kube:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pending = await kube.list(
                    "v1",
                    "Secret",
                    namespace=namespace,
                    label_selector="owner=helm,name=many,status=pending-upgrade",
                )
                if pending:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no pending upgrade of release many within {timeout}s")

    asyncio.run(watch())


def app_state(box: SandboxHandle, scope: str) -> tuple[str, str] | None:
    for item in conveyor_apps(box, scope):
        if item["spec"].get("app") == "many":
            status = item.get("status") or {}
            return status.get("state", ""), status.get("lastAppliedRevision", "")
    return None


def test_apiserver_killed_during_a_helm_upgrade_the_agent_survives_and_converges(
    own_sandbox: SandboxHandle, tmp_path: Path
) -> None:
    box = own_sandbox
    namespace = "outage"
    box.run("kubectl", "create", "namespace", namespace)
    charts = many_config_maps_chart(tmp_path)
    repo = ConfigRepo(tmp_path)
    path = "envs/outage"
    scope = path.replace("/", "-")
    repo.write(f"{path}/many.yaml", release(namespace, charts, "1"))
    first = repo.commit("version 1")
    agent = AgentProcess(box, repo, path, tmp_path, "--interval", "2s")
    try:
        agent.wait_ready()
        wait_for(lambda: app_state(box, scope) == ("Ready", first), timeout=120, what="v1")

        repo.write(f"{path}/many.yaml", release(namespace, charts, "2"))
        second = repo.commit("version 2")
        wait_for_pending_upgrade(box, namespace, timeout=60)
        started = time.monotonic()
        box.sandbox.restart_component("kube-apiserver", down_for=8)
        print(f"apiserver away and back in {time.monotonic() - started:.1f}s")
        assert agent.process.poll() is None, agent.log.read_text()[-3000:]

        wait_for(
            lambda: app_state(box, scope) == ("Ready", second),
            timeout=180,
            what="Ready at version 2 after the outage",
        )
        assert agent.process.poll() is None, agent.log.read_text()[-3000:]
        assert agent.metric("conveyor_pass_failures_total") >= 1
    finally:
        agent.stop()

    history = json.loads(box.run("helm", "history", "many", "-n", namespace, "-o", "json").stdout)
    assert history[-1]["status"] == "deployed"
    assert not [r for r in history if r["status"].startswith("pending")]
    config_map = kubectl_json(box, "get", "configmap", f"many-{CONFIG_MAPS - 1}", "-n", namespace)
    assert config_map is not None and config_map["data"]["version"] == "2"

    lines = agent.log.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [e["message"] for e in entries]
    assert any(m.startswith("many: cannot read the release history") for m in messages), messages
    failed = [e for e in entries if e["message"].startswith("pass failed")]
    assert failed and all("Traceback" in e.get("error", "") for e in failed), messages
    delays = [float(e["message"].rsplit("retrying in ", 1)[1].rstrip("s")) for e in failed]
    assert delays[:3] == sorted(delays[:3]) and delays[0] <= 1, delays  # backing off
