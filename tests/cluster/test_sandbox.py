"""The sandbox is a real cluster: workloads roll out, Helm installs, the registry serves
OCI charts, and server-side apply enforces field ownership."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from conveyor.cluster.client import ApiError
from conveyor.sandbox import VERSIONS, Sandbox
from conveyor.sandbox import process as proc
from tests.conftest import ROOT, SandboxHandle

pytestmark = pytest.mark.cluster
CHART = ROOT / "examples" / "charts" / "service"


def wait_until(check, *, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def test_server_reports_pinned_version_and_node_is_ready(sandbox: SandboxHandle) -> None:
    version = json.loads(sandbox.run("kubectl", "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == VERSIONS.kubernetes
    assert version["clientVersion"]["gitVersion"] == VERSIONS.kubernetes
    nodes = json.loads(sandbox.run("kubectl", "get", "nodes", "-o", "json").stdout)["items"]
    assert len(nodes) == 1
    ready = {c["type"]: c["status"] for c in nodes[0]["status"]["conditions"]}
    assert ready["Ready"] == "True"
    taints = nodes[0]["spec"].get("taints", [])
    assert not [t for t in taints if t["effect"] == "NoSchedule"]


def test_deployment_with_two_replicas_becomes_available(
    sandbox: SandboxHandle, namespace: str
) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.local/web:1.0.0"}]},
            },
        },
    }

    async def apply_and_read() -> dict:  # type: ignore[type-arg]
        async with sandbox.client() as kube:
            await kube.apply(deployment, field_manager="test")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                live = await kube.get("apps/v1", "Deployment", "web", namespace=namespace)
                assert live is not None
                status = live.get("status", {})
                available = {c["type"]: c["status"] for c in status.get("conditions", [])}
                if status.get("availableReplicas") == 2 and available.get("Available") == "True":
                    return live
                await asyncio.sleep(0.5)
            raise AssertionError(f"Deployment never became Available: {live.get('status')}")

    live = asyncio.run(apply_and_read())
    assert live["status"]["readyReplicas"] == 2
    pods = json.loads(sandbox.run("kubectl", "get", "pods", "-n", namespace, "-o", "json").stdout)[
        "items"
    ]
    assert len(pods) == 2
    assert all(p["status"]["phase"] == "Running" for p in pods)


def test_helm_install_of_example_chart_is_deployed_and_ready(
    sandbox: SandboxHandle, namespace: str
) -> None:
    sandbox.run(
        "helm",
        "upgrade",
        "--install",
        "ui",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        "replicaCount=2",
        "--wait",
        "--timeout",
        "90s",
    )
    status = json.loads(sandbox.run("helm", "status", "ui", "-n", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    deployment = json.loads(
        sandbox.run("kubectl", "get", "deployment", "ui", "-n", namespace, "-o", "json").stdout
    )
    assert deployment["status"]["readyReplicas"] == 2
    releases = json.loads(sandbox.run("helm", "list", "-n", namespace, "-o", "json").stdout)
    assert [r["name"] for r in releases] == ["ui"]


def test_helm_chart_pushed_as_oci_is_listed_by_the_registry(
    sandbox: SandboxHandle, tmp_path: Path
) -> None:
    sandbox.run("helm", "package", str(CHART), "--destination", str(tmp_path))
    package = tmp_path / "service-0.1.0.tgz"
    assert package.exists()
    sandbox.run("helm", "push", str(package), f"oci://{sandbox.registry}/charts", "--plain-http")
    tags = httpx.get(f"http://{sandbox.registry}/v2/charts/service/tags/list").json()
    assert tags == {"name": "charts/service", "tags": ["0.1.0"]}


def test_two_field_managers_on_one_field_conflict(sandbox: SandboxHandle, namespace: str) -> None:
    def config_map(value: str) -> dict:  # type: ignore[type-arg]
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "shared", "namespace": namespace},
            "data": {"owner": value},
        }

    async def scenario() -> ApiError:
        async with sandbox.client() as kube:
            await kube.apply(config_map("first"), field_manager="manager-a")
            try:
                await kube.apply(config_map("second"), field_manager="manager-b")
            except ApiError as error:
                live = await kube.get("v1", "ConfigMap", "shared", namespace=namespace)
                assert live is not None and live["data"]["owner"] == "first"
                return error
            raise AssertionError("the second field manager's apply was not refused")

    error = asyncio.run(scenario())
    assert error.status == 409
    assert error.reason == "Conflict"
    assert "manager-a" in error.message


def test_status_reports_every_component_healthy(sandbox: SandboxHandle) -> None:
    status = sandbox.sandbox.status()
    assert status.ready
    # Sorted: restarting one component (an outage drill) changes the start order.
    names = sorted(c.name for c in status.components)
    assert names == [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "registry",
    ]
    assert all(c.healthy and c.pid > 0 for c in status.components)
    assert status.rss_bytes > 0


def test_second_named_sandbox_runs_beside_and_down_leaves_nothing(
    sandbox: SandboxHandle,
) -> None:
    """Side-by-side sandboxes; a dead component is reported; down stops exactly its pids."""
    second = Sandbox("side")
    second.down()
    try:
        state = second.up()
        assert state.ports["apiserver"] != sandbox.sandbox.state().ports["apiserver"]  # type: ignore[union-attr]
        refs = [c.process for c in state.components]
        assert all(proc.is_running(r) for r in refs)

        registry = next(c for c in state.components if c.name == "registry")
        proc.stop(registry.process)
        status = second.status()
        dead = [c for c in status.components if not c.running]
        assert [c.name for c in dead] == ["registry"]
        assert dead[0].log_tail is not None
        assert not status.ready
    finally:
        second.down()
    # Not running, and not even left as a zombie in the process table.
    assert not any(proc.start_time_of(r.pid) == r.start_time for r in refs)
    assert not second.layout.root.exists()
    assert sandbox.sandbox.status().ready  # the first sandbox was not touched


def test_node_lease_is_renewed_so_the_node_stays_ready(sandbox: SandboxHandle) -> None:
    """Without renewals the node lifecycle controller marks the node and its Pods NotReady."""

    def renew_time() -> str:
        lease = json.loads(
            sandbox.run(
                "kubectl", "get", "lease", "-n", "kube-node-lease", "sandbox-node", "-o", "json"
            ).stdout
        )
        return str(lease["spec"]["renewTime"])

    first = renew_time()
    wait_until(lambda: renew_time() != first, timeout=30, what="a node lease renewal")


def test_up_after_a_reboot_restarts_every_component_in_start_order(
    sandbox: SandboxHandle,
) -> None:
    """A machine restart kills every component. `up` brings them back in place (same
    ports, same data) in start order, also after an outage drill reordered the records."""
    box = Sandbox("reboot")
    box.down()
    try:
        box.up()
        box.restart_component("kube-apiserver")  # its record now comes last
        before = box.state()
        assert before is not None
        assert before.components[-1].name == "kube-apiserver"
        for record in before.components:
            proc.stop(record.process)
        assert not box.status().ready

        after = box.up()
        assert after.ports == before.ports
        assert all(proc.is_running(c.process) for c in after.components)
        assert box.status().ready
    finally:
        box.down()
    assert sandbox.sandbox.status().ready  # the shared sandbox was not touched
