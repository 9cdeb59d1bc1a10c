"""Health and leader election against the real sandbox: kwok makes Pods ready and Job Pods
complete, the deployment controller gives up on unschedulable rollouts, and the apiserver
arbitrates Lease writes between candidates."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import pytest

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import KubeClient
from conveyor.cluster.health import Health, HealthStatus, aggregate, assess
from conveyor.cluster.lease import LeaderElector
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]
LEASE_DURATION = 2.0
RENEW_INTERVAL = 0.5


def deployment(namespace: str, name: str, **pod_spec: Any) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": "web:1.0.0"}], **pod_spec},
            },
        },
    }


async def watch_health(
    kube: KubeClient, applied: Obj, *, until: HealthStatus, timeout: float = 60.0
) -> list[Health]:
    """Assess the applied object, then poll it until `until`; every assessment made."""
    seen = [assess(applied)]
    meta = applied["metadata"]
    deadline = time.monotonic() + timeout
    while seen[-1].status is not until:
        if time.monotonic() > deadline:
            raise AssertionError(f"not {until} after {timeout}s: {seen[-1].message}")
        await asyncio.sleep(0.25)
        live = await kube.get(
            applied["apiVersion"], applied["kind"], meta["name"], namespace=meta["namespace"]
        )
        assert live is not None
        seen.append(assess(live))
    return seen


def test_deployment_goes_from_in_progress_to_current(
    sandbox: SandboxHandle, namespace: str
) -> None:
    async def scenario() -> list[Health]:
        async with sandbox.client() as kube:
            applied = await kube.apply(deployment(namespace, "web"), field_manager="test")
            return await watch_health(kube, applied, until=HealthStatus.CURRENT)

    seen = asyncio.run(scenario())
    assert seen[0].status is HealthStatus.IN_PROGRESS
    assert seen[-1] == Health(HealthStatus.CURRENT, "Deployment web: 2/2 replicas available")


def test_job_whose_pod_completes_becomes_current(sandbox: SandboxHandle, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "migrate", "namespace": namespace},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "migrate", "image": "migrate:1.0.0"}],
                }
            }
        },
    }

    async def scenario() -> list[Health]:
        async with sandbox.client() as kube:
            applied = await kube.apply(job, field_manager="test")
            return await watch_health(kube, applied, until=HealthStatus.CURRENT)

    seen = asyncio.run(scenario())
    assert seen[0].status is HealthStatus.IN_PROGRESS
    assert seen[-1] == Health(HealthStatus.CURRENT, "Job migrate: complete (1 succeeded)")


def test_unschedulable_deployment_past_its_deadline_fails(
    sandbox: SandboxHandle, namespace: str
) -> None:
    stuck = deployment(namespace, "stuck", nodeSelector={"conveyor.test/pool": "nowhere"})
    stuck["spec"]["progressDeadlineSeconds"] = 1
    settings = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": namespace},
        "data": {"LOG_LEVEL": "info"},
    }

    async def scenario() -> tuple[list[Health], Health]:
        async with sandbox.client() as kube:
            config_map = await kube.apply(settings, field_manager="test")
            applied = await kube.apply(stuck, field_manager="test")
            seen = await watch_health(kube, applied, until=HealthStatus.FAILED)
            return seen, assess(config_map)

    seen, config_map_health = asyncio.run(scenario())
    assert seen[0].status is HealthStatus.IN_PROGRESS
    assert seen[-1].message.startswith("Deployment stuck: progress deadline exceeded")
    assert config_map_health == Health(HealthStatus.CURRENT, "ConfigMap settings: present")
    combined = aggregate(
        [("Deployment/stuck", seen[-1]), ("ConfigMap/settings", config_map_health)]
    )
    assert combined.status is HealthStatus.FAILED
    assert combined.message.startswith("1/2 failed: Deployment/stuck (")


def test_config_map_is_current(sandbox: SandboxHandle, namespace: str) -> None:
    async def scenario() -> Obj | None:
        async with sandbox.client() as kube:
            await kube.apply(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "env", "namespace": namespace},
                    "data": {"REGION": "eu-west-1"},
                },
                field_manager="test",
            )
            return await kube.get("v1", "ConfigMap", "env", namespace=namespace)

    live = asyncio.run(scenario())
    assert live is not None
    assert assess(live).status is HealthStatus.CURRENT


# -- leader election ---------------------------------------------------------------------


def elector(kube: KubeClient, namespace: str, identity: str) -> LeaderElector:
    return LeaderElector(
        kube,
        namespace=namespace,
        name="agent",
        identity=identity,
        lease_duration=LEASE_DURATION,
        renew_interval=RENEW_INTERVAL,
    )


async def read_lease(kube: KubeClient, namespace: str) -> Obj:
    lease = await kube.get("coordination.k8s.io/v1", "Lease", "agent", namespace=namespace)
    assert lease is not None
    spec: Obj = lease["spec"]
    return spec


def test_racing_candidates_never_both_lead(sandbox: SandboxHandle, namespace: str) -> None:
    rounds = 20

    async def scenario() -> tuple[list[str], Obj, int]:
        async with sandbox.client() as kube_a, sandbox.client() as kube_b:
            a, b = elector(kube_a, namespace, "agent-a"), elector(kube_b, namespace, "agent-b")
            winners = []
            for _ in range(rounds):
                won = await asyncio.gather(a.acquire(timeout=0), b.acquire(timeout=0))
                assert won.count(True) == 1, won
                assert [a.is_leader, b.is_leader] == won
                winner = a if won[0] else b
                assert (await read_lease(kube_a, namespace))["holderIdentity"] == winner.identity
                winners.append(winner.identity)
                await winner.release()
            return winners, await read_lease(kube_a, namespace), kube_a.writes + kube_b.writes

    winners, lease, writes = asyncio.run(scenario())
    assert len(winners) == rounds
    # one release per round plus one write per acquire attempt that got past its read: more
    # than two per round means both candidates wrote and the apiserver refused one with 409
    assert writes > 2 * rounds
    assert "holderIdentity" not in lease
    assert lease["leaseTransitions"] == rounds - 1


def test_successor_acquires_at_once_after_release(sandbox: SandboxHandle, namespace: str) -> None:
    async def scenario() -> tuple[float, Obj]:
        async with sandbox.client() as kube_a, sandbox.client() as kube_b:
            a, b = elector(kube_a, namespace, "agent-a"), elector(kube_b, namespace, "agent-b")
            async with a.hold(timeout=5) as lost:
                assert a.is_leader
                assert not await b.acquire(timeout=LEASE_DURATION + 1)  # renewals keep it
                assert b.holder == "agent-a"
                assert not lost.is_set()
            assert lost.is_set()
            assert not a.is_leader
            started = time.monotonic()
            assert await b.acquire(timeout=0)
            return time.monotonic() - started, await read_lease(kube_b, namespace)

    took, lease = asyncio.run(scenario())
    assert took < RENEW_INTERVAL
    assert lease["holderIdentity"] == "agent-b"
    assert lease["leaseDurationSeconds"] == 2
    assert lease["leaseTransitions"] == 1


def test_silent_leader_is_taken_over_after_the_lease_duration(
    sandbox: SandboxHandle, namespace: str
) -> None:
    async def scenario() -> tuple[float, Obj, Obj]:
        async with sandbox.client() as kube_a, sandbox.client() as kube_b:
            a, b = elector(kube_a, namespace, "agent-a"), elector(kube_b, namespace, "agent-b")
            assert await a.acquire(timeout=0)
            held = await read_lease(kube_a, namespace)
            started = time.monotonic()  # a never renews from here on
            assert await b.acquire(timeout=LEASE_DURATION * 3)
            took = time.monotonic() - started
            assert not a.is_leader
            assert not await a.renew()
            return took, held, await read_lease(kube_b, namespace)

    took, held, taken = asyncio.run(scenario())
    assert LEASE_DURATION <= took < LEASE_DURATION + RENEW_INTERVAL + 1
    assert held["holderIdentity"] == "agent-a"
    assert held["leaseTransitions"] == 0
    assert held["renewTime"].endswith("Z") and len(held["renewTime"]) == 27
    assert taken["holderIdentity"] == "agent-b"
    assert taken["leaseTransitions"] == 1
    assert taken["acquireTime"] != held["acquireTime"]


class TcpRelay:
    """A loopback TCP relay to the apiserver; `cut()` is a network partition."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        self._writers += [client_w, server_w]
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


def test_leader_that_cannot_renew_steps_down_within_the_lease(
    sandbox: SandboxHandle, namespace: str
) -> None:
    credentials = kubeconfig.load(sandbox.kubeconfig)
    host, _, port = credentials.server.removeprefix("https://").rpartition(":")

    async def scenario() -> tuple[float, float]:
        relay = TcpRelay(host, int(port))
        await relay.start()
        through_relay = dataclasses.replace(credentials, server=f"https://{host}:{relay.port}")
        async with KubeClient(through_relay) as kube_a, sandbox.client() as kube_b:
            a, b = elector(kube_a, namespace, "agent-a"), elector(kube_b, namespace, "agent-b")
            assert await a.acquire(timeout=0)
            renewals = asyncio.create_task(a.run_renewals())
            await asyncio.sleep(LEASE_DURATION * 1.5)  # renewals keep it past one duration
            assert a.is_leader and not a.lost.is_set()
            assert not await b.acquire(timeout=0)

            await relay.cut()
            cut_at = time.monotonic()
            await asyncio.wait_for(a.lost.wait(), timeout=LEASE_DURATION + 1)
            stepped_down = time.monotonic() - cut_at
            assert not a.is_leader
            await renewals

            assert await b.acquire(timeout=LEASE_DURATION * 3)
            taken_over = time.monotonic() - cut_at
            assert (await read_lease(kube_b, namespace))["holderIdentity"] == "agent-b"
            return stepped_down, taken_over

    stepped_down, taken_over = asyncio.run(scenario())
    assert stepped_down <= LEASE_DURATION
    assert stepped_down < taken_over
