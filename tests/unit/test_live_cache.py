"""The watched cache keeps the newest copy of an object, whichever way it arrived."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conveyor.cluster.flux import needs_takeover
from conveyor.cluster.live import LiveCache, OutsideNamespacesError
from conveyor.cluster.objects import ObjectRef


def deployment(version: str, generation: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "apps",
            "resourceVersion": version,
            "generation": generation,
        },
    }


def test_a_write_seeds_the_cache_and_a_late_older_event_does_not_undo_it() -> None:
    cache = LiveCache(kube=None)  # type: ignore[arg-type]  # no I/O in this test
    cache._watches[("apps/v1", "Deployment", "")] = None  # type: ignore[assignment]
    ref = ObjectRef.of(deployment("10", 1))
    cache._store(ref, deployment("10", 1), notify=False)
    cache.seed([deployment("15", 2)])  # what the apply returned
    assert cache.get(ref)["metadata"]["generation"] == 2  # type: ignore[index]
    cache._store(ref, deployment("12", 1), notify=True)  # a watch event from before the write
    assert cache.get(ref)["metadata"]["generation"] == 2  # type: ignore[index]
    cache._store(ref, deployment("16", 2), notify=True)
    assert cache.get(ref)["metadata"]["resourceVersion"] == "16"  # type: ignore[index]


def test_kinds_not_watched_are_not_seeded() -> None:
    cache = LiveCache(kube=None)  # type: ignore[arg-type]
    cache.seed([deployment("15", 2)])
    assert cache.get(ObjectRef.of(deployment("15", 2))) is None


def test_an_agent_confined_to_namespaces_watches_each_and_refuses_the_rest() -> None:
    """The chart's namespaced mode: watches per namespace (a cluster-wide one would be
    refused by RBAC), and an object elsewhere named with its namespace, never waited on."""
    cache = LiveCache(kube=None, namespaces=frozenset({"apps", "conveyor-system"}))  # type: ignore[arg-type]
    inside = ObjectRef.of(deployment("1", 1))
    cache._watches[("apps/v1", "Deployment", "apps")] = None  # type: ignore[assignment]
    assert cache.watched(inside)
    cache.seed([deployment("2", 1)])
    assert cache.get(inside) is not None
    elsewhere = ObjectRef("apps/v1", "Deployment", "payments", "web")
    assert not cache.watched(elsewhere)
    with pytest.raises(OutsideNamespacesError, match="namespace 'payments', outside"):
        asyncio.run(cache.ensure(elsewhere))
    cluster_scoped = ObjectRef("v1", "Namespace", "", "payments")
    with pytest.raises(OutsideNamespacesError, match="Namespace payments: cluster-scoped"):
        asyncio.run(cache.ensure(cluster_scoped))


def test_the_cache_keeps_who_manages_an_object_but_not_the_fields_each_manages() -> None:
    """The field sets are a third of a Deployment and read by nothing that reads the
    cache; the managers stay, for the Flux takeover's check."""
    cache = LiveCache(kube=None)  # type: ignore[arg-type]
    cache._watches[("apps/v1", "Deployment", "")] = None  # type: ignore[assignment]
    written = deployment("20", 3)
    fields = {"f:spec": {"f:replicas": {}}}
    written["metadata"]["managedFields"] = [
        {"manager": "kustomize-controller", "operation": "Apply", "fieldsV1": fields},
        {"manager": "conveyor", "operation": "Apply", "apiVersion": "apps/v1"},
    ]
    cache.seed([written])
    cached = cache.get(ObjectRef.of(written))
    assert cached is not None
    assert cached["metadata"]["managedFields"] == [
        {"manager": "kustomize-controller", "operation": "Apply"},
        {"manager": "conveyor", "operation": "Apply", "apiVersion": "apps/v1"},
    ]
    assert needs_takeover(cached)
    assert written["metadata"]["managedFields"][0]["fieldsV1"] == fields  # the caller's copy


def test_copies_of_one_key_or_short_value_in_cached_objects_are_one_string() -> None:
    cache = LiveCache(kube=None)  # type: ignore[arg-type]
    cache._watches[("apps/v1", "Deployment", "")] = None  # type: ignore[assignment]
    cached = []
    for name in ("web", "api"):
        # Parsed one event at a time, as a watch does: nothing shared between them.
        obj = json.loads(json.dumps({**deployment("1", 1), "status": {"phase": "Available"}}))
        obj["metadata"]["name"] = name
        cache.seed([obj])
        cached.append(cache.get(ObjectRef.of(obj)))
    first, second = cached
    assert first is not None and second is not None
    assert first == {**deployment("1", 1), "status": {"phase": "Available"}}
    [key_1] = [k for k in first if k == "status"]
    [key_2] = [k for k in second if k == "status"]
    assert key_1 is key_2
    assert first["status"]["phase"] is second["status"]["phase"]
