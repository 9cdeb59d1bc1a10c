"""The watched cache keeps the newest copy of an object, whichever way it arrived."""

from __future__ import annotations

from typing import Any

from conveyor.cluster.live import LiveCache
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
    cache._watches[("apps/v1", "Deployment")] = None  # type: ignore[assignment]
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
