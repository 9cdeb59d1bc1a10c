"""The `KubeClient` seam: a real client driven through a fake wire (`httpx.MockTransport`),
so that code above the client can be unit-tested without an apiserver. The same calls
against the real apiserver are in the cluster tests (tests/cluster/)."""

from __future__ import annotations

import asyncio
import json

import httpx

from conveyor.cluster.client import KubeClient
from conveyor.cluster.kubeconfig import ClusterCredentials

CONFIG_MAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "settings", "namespace": "team"},
    "data": {"colour": "blue"},
}


def test_both_clients_use_the_given_transport() -> None:
    seen: list[tuple[str, str, str]] = []

    def apiserver(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers["Authorization"]))
        if request.url.path == "/api/v1":
            resources = [
                {"name": "configmaps", "kind": "ConfigMap", "namespaced": True},
                {"name": "configmaps/status", "kind": "ConfigMap", "namespaced": True},
            ]
            return httpx.Response(200, json={"resources": resources})
        if request.url.params.get("watch") == "true":
            event = {"type": "ADDED", "object": CONFIG_MAP}
            return httpx.Response(200, content=json.dumps(event).encode() + b"\n")
        if request.method == "PATCH":
            return httpx.Response(200, json=json.loads(request.content))
        if request.url.path.endswith("/configmaps/settings"):
            return httpx.Response(200, json=CONFIG_MAP)
        status = {"kind": "Status", "reason": "NotFound", "message": "not found", "code": 404}
        return httpx.Response(404, json=status)

    async def scenario() -> None:
        credentials = ClusterCredentials(server="https://kube.test", context="t", token="tok")
        async with KubeClient(credentials, transport=httpx.MockTransport(apiserver)) as kube:
            assert await kube.get("v1", "ConfigMap", "settings", namespace="team") == CONFIG_MAP
            assert await kube.get("v1", "ConfigMap", "missing", namespace="team") is None
            applied = await kube.apply(CONFIG_MAP, field_manager="conveyor")
            assert applied["data"] == {"colour": "blue"}
            assert kube.writes == 1
            events = [e async for e in kube.watch("v1", "ConfigMap", namespace="team")]
            assert events == [{"type": "ADDED", "object": CONFIG_MAP}]

    asyncio.run(scenario())
    assert [(method, path) for method, path, _ in seen] == [
        ("GET", "/api/v1"),
        ("GET", "/api/v1/namespaces/team/configmaps/settings"),
        ("GET", "/api/v1/namespaces/team/configmaps/missing"),
        ("PATCH", "/api/v1/namespaces/team/configmaps/settings"),
        ("GET", "/api/v1/namespaces/team/configmaps"),
    ]
    assert {token for _, _, token in seen} == {"Bearer tok"}


def test_tasks_that_wait_for_one_discovery_send_no_discovery_of_their_own() -> None:
    discoveries: list[str] = []

    async def apiserver(request: httpx.Request) -> httpx.Response:
        discoveries.append(request.url.path)
        await asyncio.sleep(0.05)  # the others queue behind the first one meanwhile
        resources = [{"name": "configmaps", "kind": "ConfigMap", "namespaced": True}]
        return httpx.Response(200, json={"resources": resources})

    async def scenario() -> None:
        credentials = ClusterCredentials(server="https://kube.test", context="t", token="tok")
        async with KubeClient(credentials, transport=httpx.MockTransport(apiserver)) as kube:
            found = await asyncio.gather(*(kube.resource("v1", "ConfigMap") for _ in range(200)))
            assert {r.plural for r in found} == {"configmaps"}

    asyncio.run(scenario())
    assert discoveries == ["/api/v1"]
