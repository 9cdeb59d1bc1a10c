"""Which watch events count as drift of an app: never the echo of conveyor's own write."""

from __future__ import annotations

from typing import Any

from conveyor.cluster.apply import labelled
from conveyor.cluster.objects import ObjectRef
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.reconcile.actions import DesiredObjects

IDENTITY = EnvironmentIdentity.of("file:///srv/config.git", branch="main", path="prod", name="prod")


def desired_configmap(value: str) -> dict[str, Any]:
    return labelled(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cm-0001", "namespace": "apps"},
            "data": {"value": value},
        },
        app="cm-0001",
        identity=IDENTITY,
        scope="prod",
    )


def as_returned(desired: dict[str, Any], *, version: str) -> dict[str, Any]:
    """The object as the API server returns it after a server-side apply (and as its
    watch event carries it): bookkeeping added, the fields conveyor set kept."""
    metadata = desired["metadata"]
    return {
        **desired,
        "metadata": {
            **metadata,
            "uid": "5f1c0e64-8a55-4b0e-9a57-0d4f6f1d1f3c",
            "resourceVersion": version,
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "managedFields": [
                {
                    "manager": "conveyor",
                    "operation": "Apply",
                    "apiVersion": "v1",
                    "time": "2026-12-01T10:00:05Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:data": {"f:value": {}}},
                }
            ],
        },
    }


def queued(desired: DesiredObjects) -> list[str]:
    found = []
    while not desired.drifted.empty():
        found.append(desired.drifted.get_nowait())
    return found


def test_the_object_as_the_server_returns_it_is_not_drift() -> None:
    desired = DesiredObjects()
    wanted = desired_configmap("1")
    ref = ObjectRef.of(wanted)
    desired.remember("cm-0001", [(ref, wanted)])
    desired.on_change(ref, as_returned(wanted, version="100"))
    assert queued(desired) == []


def test_the_echo_of_an_update_that_arrives_before_it_is_remembered_is_not_drift() -> None:
    desired = DesiredObjects()
    old, new = desired_configmap("1"), desired_configmap("2")
    ref = ObjectRef.of(old)
    desired.remember("cm-0001", [(ref, old)])
    with desired.writing("cm-0001"):
        # The watch delivers the applied object while the apply is still returning.
        desired.on_change(ref, as_returned(new, version="101"))
        desired.remember("cm-0001", [(ref, new)])
    desired.on_change(ref, as_returned(new, version="101"))
    assert queued(desired) == []


def test_an_edit_after_the_write_is_drift_and_so_is_a_delete() -> None:
    desired = DesiredObjects()
    new = desired_configmap("2")
    ref = ObjectRef.of(new)
    with desired.writing("cm-0001"):
        desired.remember("cm-0001", [(ref, new)])
    edited = as_returned(new, version="102")
    edited["data"] = {"value": "edited by hand"}
    desired.on_change(ref, edited)
    desired.on_change(ref, None)
    assert queued(desired) == ["cm-0001", "cm-0001"]


def test_writes_of_one_app_do_not_hide_drift_of_another() -> None:
    desired = DesiredObjects()
    mine = desired_configmap("1")
    other = {**mine, "metadata": {**mine["metadata"], "name": "cm-0002"}}
    desired.remember("cm-0001", [(ObjectRef.of(mine), mine)])
    desired.remember("cm-0002", [(ObjectRef.of(other), other)])
    with desired.writing("cm-0001"):
        changed = as_returned(other, version="103")
        changed["data"] = {"value": "edited by hand"}
        desired.on_change(ObjectRef.of(other), changed)
    assert queued(desired) == ["cm-0002"]
