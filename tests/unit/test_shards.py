"""The shard rules that need no cluster: rendezvous hashing moves only what it must, and
the write guard never lets two shards write one app, step by step on a fake clock
through a join, a death and a release. The same on the real sandbox, with real agent
processes and kill -9: tests/cluster/test_shards.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from conveyor.cluster.client import ApiError
from conveyor.cluster.lease import NotLeaderError
from conveyor.cluster.shards import (
    APPS_ANNOTATION,
    ENVIRONMENT_KEY,
    SHARDS_LABEL,
    NotShardOwnerError,
    ShardSet,
    owner_of,
    writing_for,
    writing_own,
)

Obj = dict[str, Any]
APPS = [f"app-{i:03d}" for i in range(300)]


class LeasesApi:
    """Just enough of KubeClient for a namespace of Leases: get, create, replace, delete,
    list by label."""

    def __init__(self) -> None:
        self.leases: dict[str, Obj] = {}

    async def resource(self, api_version: str, kind: str) -> Any:
        class Leases:
            def path(self, *, namespace: str, name: str) -> str:
                return f"/apis/{api_version}/namespaces/{namespace}/leases/{name}"

        return Leases()

    async def request(self, method: str, path: str, *, json_body: Obj | None = None) -> Obj:
        name = path.rsplit("/", 1)[-1]
        if method == "GET":
            if name not in self.leases:
                raise ApiError(404, "NotFound", "no lease")
            return dict(self.leases[name])
        assert json_body is not None
        self.leases[json_body["metadata"]["name"]] = json_body
        return dict(json_body)

    async def list(self, api_version: str, kind: str, **query: str) -> list[Obj]:
        label, _, value = query["label_selector"].partition("=")
        return [
            dict(lease)
            for lease in self.leases.values()
            if (lease["metadata"].get("labels") or {}).get(label) == value
        ]

    async def get(self, api_version: str, kind: str, name: str, **_: str) -> Obj | None:
        return dict(self.leases[name]) if name in self.leases else None

    async def delete(self, api_version: str, kind: str, name: str, **_: str) -> None:
        self.leases.pop(name, None)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def shard(api: LeasesApi, identity: str) -> ShardSet:
    return ShardSet(
        api,  # type: ignore[arg-type]
        namespace="conveyor-system",
        scope="staging",
        environment="0123456789abcdef",
        identity=identity,
        lease_duration=15.0,
    )


def may_write(s: ShardSet, app: str) -> bool:
    with writing_for(app):
        try:
            s.write_budget()
        except NotLeaderError:
            return False
    return True


def test_hashing_moves_only_the_apps_of_the_shard_added_or_lost() -> None:
    two = {app: owner_of(app, ["a", "b"]) for app in APPS}
    three = {app: owner_of(app, ["a", "b", "c"]) for app in APPS}
    moved = [app for app in APPS if two[app] != three[app]]
    assert all(three[app] == "c" for app in moved)  # only to the new shard
    assert 0.2 < len(moved) / len(APPS) < 0.45  # about a third
    without_b = {app: owner_of(app, ["a", "c"]) for app in APPS}
    assert all(without_b[app] == three[app] for app in APPS if three[app] != "b")
    assert owner_of("x", []) is None
    assert owner_of("x", ["b", "a"]) == owner_of("x", ["a", "b"])  # order does not matter


def test_a_new_shard_writes_nothing_until_older_views_have_lapsed(clock: list[float]) -> None:
    api = LeasesApi()
    a = shard(api, "agent-a")
    asyncio.run(a.join())
    asyncio.run(a.refresh())
    assert not may_write(a, APPS[0])  # settling: another replica's older view may be live
    with pytest.raises(NotShardOwnerError, match="waiting out older views"):
        with writing_for(APPS[0]):
            a.write_budget()
    for _ in range(3):  # renewing as the agent does, every third of the lease
        clock[0] += a.view_ttl / 3
        asyncio.run(a.elector.renew())
    asyncio.run(a.refresh())
    assert all(may_write(a, app) for app in APPS)  # alone: all apps, and the source's status
    assert may_write(a, ENVIRONMENT_KEY)
    lease = api.leases[a.elector.name]
    assert lease["metadata"]["labels"] == {SHARDS_LABEL: "0123456789abcdef"}
    for _ in range(3):  # no refresh meanwhile: the view is too old to write on
        clock[0] += a.view_ttl / 3
        asyncio.run(a.elector.renew())
    assert a.elector.may_write
    assert not may_write(a, APPS[0])


def test_no_app_is_ever_writable_by_two_shards_through_join_death_and_release(
    clock: list[float],
) -> None:
    api = LeasesApi()
    a, b, c = shard(api, "agent-a"), shard(api, "agent-b"), shard(api, "agent-c")
    alive = {"agent-a": a}
    asyncio.run(a.join())
    overlap_checks = 0

    def step(seconds: float) -> None:
        """Advance the clock in half seconds; each live shard renews every 5 s and lists
        the Leases every 2 s, as the agent does; check every app at every step."""
        nonlocal overlap_checks
        for _ in range(int(seconds * 2)):
            clock[0] += 0.5
            for s in alive.values():
                if round(clock[0] * 2) % 10 == 0:
                    asyncio.run(s.elector.renew())
                if round(clock[0] * 2) % 4 == 0:
                    asyncio.run(s.refresh())
            for app in [*APPS, ENVIRONMENT_KEY]:
                writers = [s.identity for s in (a, b, c) if may_write(s, app)]
                assert len(writers) <= 1, (app, writers, clock[0])
                overlap_checks += 1

    step(20)
    assert all(may_write(a, app) for app in APPS)
    alive["agent-b"] = b
    asyncio.run(b.join())
    step(20)  # b has settled; a has seen it: the apps are split
    assert {owner_of(app, ["agent-a", "agent-b"]) for app in APPS} == {"agent-a", "agent-b"}
    assert all(may_write(a, app) != may_write(b, app) for app in APPS)
    alive["agent-c"] = c
    asyncio.run(c.join())
    step(20)
    owned_by_c = [app for app in APPS if may_write(c, app)]
    assert 0.2 < len(owned_by_c) / len(APPS) < 0.45
    # b dies (kill -9): it renews no more; its apps pass to a and c only after it stops
    # writing by its own judgement, which the step checks at every half second.
    del alive["agent-b"]
    b_apps = [app for app in APPS if owner_of(app, ["agent-a", "agent-b", "agent-c"]) == "agent-b"]
    step(25)
    assert not any(may_write(b, app) for app in APPS)
    assert all(may_write(a, app) or may_write(c, app) for app in b_apps)
    # c leaves cleanly: its Lease is deleted, a takes its apps at its next list.
    asyncio.run(c.leave())
    del alive["agent-c"]
    assert c.elector.name not in api.leases
    step(3)
    assert all(may_write(a, app) for app in APPS)
    assert overlap_checks > 100 * len(APPS)


def test_a_shard_publishes_its_load_on_its_lease_at_the_next_renewal(clock: list[float]) -> None:
    api = LeasesApi()
    a = shard(api, "agent-a")
    asyncio.run(a.join())
    a.publish_load(apps=120, pass_seconds=3.25)
    clock[0] += 1
    asyncio.run(a.elector.renew())
    annotations = api.leases[a.elector.name]["metadata"]["annotations"]
    assert annotations[APPS_ANNOTATION] == "120"


def test_no_shard_writes_while_an_unsharded_writer_holds_the_environments_lease(
    clock: list[float],
) -> None:
    api = LeasesApi()
    a = shard(api, "agent-a")
    asyncio.run(a.join())
    for _ in range(3):
        clock[0] += a.view_ttl / 3
        asyncio.run(a.elector.renew())
    asyncio.run(a.refresh())
    assert may_write(a, APPS[0])
    lease = {
        "metadata": {"name": "conveyor-staging", "namespace": "conveyor-system"},
        "spec": {"holderIdentity": "cli-host-1-abcd", "leaseDurationSeconds": 15},
    }
    api.leases["conveyor-staging"] = lease  # a command's one pass (or an old agent) leads
    asyncio.run(a.refresh())
    assert not any(may_write(a, app) for app in [*APPS, ENVIRONMENT_KEY])
    api.leases["conveyor-staging"] = {**lease, "spec": {"leaseDurationSeconds": 1}}  # released
    asyncio.run(a.refresh())
    assert all(may_write(a, app) for app in APPS)


def test_every_settled_shard_may_write_its_own_answer_and_no_one_elses_apps(
    clock: list[float],
) -> None:
    api = LeasesApi()
    a, b = shard(api, "agent-a"), shard(api, "agent-b")
    for s in (a, b):
        asyncio.run(s.join())
    with writing_own(), pytest.raises(NotShardOwnerError, match="may not write its own answer"):
        a.write_budget()  # settling: not even its own record
    for _ in range(3):
        clock[0] += a.view_ttl / 3
        for s in (a, b):
            asyncio.run(s.elector.renew())
    for s in (a, b):
        asyncio.run(s.refresh())
    for s in (a, b):
        with writing_own():
            assert s.write_budget() > 0
    # The environment's key stays one shard's.
    assert [may_write(s, ENVIRONMENT_KEY) for s in (a, b)].count(True) == 1
