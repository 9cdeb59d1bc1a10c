"""Drift comparison, Secret masking, webhook signatures, status bodies: pure functions."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from conveyor.cluster.diff import mask_secrets, normalize
from conveyor.cluster.objects import ObjectRef, apply_order, drift_paths
from conveyor.reconcile.plan import namespaced
from conveyor.reconcile.status import (
    READY,
    RECONCILING,
    STALLED,
    SUSPENDED,
    WAITING_FOR_GATE,
    AppStatus,
    Reason,
    crd_manifest,
    resource_name,
)
from conveyor.source.webhook import verify_signature

DESIRED = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "ns", "labels": {"app": "web"}},
    "spec": {
        "replicas": 2,
        "template": {"spec": {"containers": [{"name": "web", "image": "web:1", "resources": {}}]}},
    },
}


def live(**changes: object) -> dict[str, object]:
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "labels": {"app": "web"},
            "resourceVersion": "9",
            "uid": "u",
        },
        "spec": {
            "replicas": 2,
            "progressDeadlineSeconds": 600,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "web", "image": "web:1", "imagePullPolicy": "IfNotPresent"}
                    ],
                    "restartPolicy": "Always",
                }
            },
        },
        "status": {"replicas": 2},
    }
    obj["spec"].update(changes)  # type: ignore[attr-defined]
    return obj


def test_server_defaults_are_not_drift() -> None:
    assert drift_paths(DESIRED, live()) == []


def test_changed_and_removed_fields_are_drift() -> None:
    assert drift_paths(DESIRED, live(replicas=5)) == [".spec.replicas"]
    edited = live()
    edited["metadata"]["labels"] = {}  # type: ignore[index]
    assert drift_paths(DESIRED, edited) == [".metadata.labels.app"]
    extra_container = live(template={"spec": {"containers": [{}, {}]}})
    assert drift_paths(DESIRED, extra_container) == [".spec.template.spec.containers"]


def test_scalars_the_server_normalises_are_equal() -> None:
    desired = {"kind": "Service", "spec": {"ports": [{"port": "80"}], "enabled": "true"}}
    assert (
        drift_paths(
            desired, {"kind": "Service", "spec": {"ports": [{"port": 80}], "enabled": True}}
        )
        == []
    )


def test_secret_string_data_is_compared_as_stored() -> None:
    desired = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"p": "hunter2"}}
    stored = {"kind": "Secret", "metadata": {"name": "s"}, "data": {"p": "aHVudGVyMg=="}}
    assert drift_paths(desired, stored) == []
    assert drift_paths(desired, {**stored, "data": {"p": "b3RoZXI="}}) == [".data.p"]


def test_secret_values_are_masked_and_changes_flagged() -> None:
    before = {"kind": "Secret", "data": {"a": "MQ==", "b": "Mg=="}}
    after = {"kind": "Secret", "data": {"a": "MQ==", "b": "Mw==", "c": "NA=="}}
    masked_before, masked_after = mask_secrets(before, after)
    assert masked_before == {"kind": "Secret", "data": {"a": "***", "b": "***"}}
    assert masked_after == {
        "kind": "Secret",
        "data": {"a": "***", "b": "*** (secret value changed)", "c": "***"},
    }
    assert before["data"]["b"] == "Mg=="  # inputs untouched


def test_normalize_drops_server_bookkeeping() -> None:
    normalized = normalize(live())
    assert normalized is not None
    assert "status" not in normalized and "resourceVersion" not in normalized["metadata"]


def test_apply_order_puts_crds_and_namespaces_first() -> None:
    kinds = ["Deployment", "Namespace", "CustomResourceDefinition", "ConfigMap"]
    ordered = sorted(kinds, key=lambda k: apply_order({"kind": k}))
    assert ordered == ["CustomResourceDefinition", "Namespace", "ConfigMap", "Deployment"]


def test_chart_objects_without_a_namespace_get_the_release_namespace_as_helm_does() -> None:
    rendered = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "none"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "e", "namespace": ""}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "n", "namespace": None}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "own", "namespace": "x"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "r"},
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns", "namespace": "ns"}},
    ]
    placed = [ObjectRef.of(o) for o in namespaced(rendered, "team")]
    assert [r.namespace for r in placed] == ["team", "team", "team", "x", "", ""]
    assert "namespace" not in rendered[4]["metadata"]


def test_object_identity_ignores_api_version_within_a_group() -> None:
    a = ObjectRef("apps/v1", "Deployment", "ns", "web")
    b = ObjectRef("apps/v1beta2", "Deployment", "ns", "web")
    assert a.key() == b.key()
    assert str(a) == "Deployment ns/web"
    assert ObjectRef.from_dict(a.to_dict()) == a


def test_webhook_signature_is_checked_in_constant_time_form() -> None:
    body = b'{"ref":"refs/heads/main"}'
    good = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert verify_signature(b"k", body, good)
    assert not verify_signature(b"k", body + b"x", good)
    assert not verify_signature(b"other", body, good)
    assert not verify_signature(b"k", body, None)
    assert not verify_signature(b"k", body, good.replace("sha256=", "sha1="))


def test_status_body_round_trip_and_names() -> None:
    status = AppStatus(
        scope="staging",
        app="ui",
        kind="helm",
        state="Ready",
        reason="ReconciliationSucceeded",
        message="ok",
        attempted_revision="abc",
        helm_revision=3,
        inventory=[ObjectRef("v1", "ConfigMap", "ns", "c")],
    )
    obj = {"spec": {"scope": "staging", "app": "ui"}, "status": status.status_body()}
    again = AppStatus.from_object(obj)
    assert again.status_body() == status.status_body()
    assert obj["status"]["conditions"][0]["status"] == "True"
    assert resource_name("staging", "ui") == "staging.ui"
    assert resource_name("staging", "") == "staging"


@pytest.mark.parametrize(
    ("reason", "state", "conditions"),
    [
        (Reason.SUCCEEDED, READY, {"Ready": "True"}),
        (Reason.DRIFT_CORRECTED, READY, {"Ready": "True"}),
        (Reason.PROGRESSING, RECONCILING, {"Ready": "Unknown", "Reconciling": "True"}),
        (Reason.NOT_LEADER, RECONCILING, {"Ready": "Unknown", "Reconciling": "True"}),
        (Reason.ROLLED_BACK, STALLED, {"Ready": "False", "Stalled": "True"}),
        (Reason.OWNERSHIP_CONFLICT, STALLED, {"Ready": "False", "Stalled": "True"}),
        (Reason.FLUX_STILL_MANAGES, STALLED, {"Ready": "False", "Stalled": "True"}),
        (Reason.SUSPENDED, SUSPENDED, {"Ready": "False"}),
        # Held: the old revision runs, and a newer one waits (lastAttemptedRevision).
        (Reason.GATE_CLOSED, WAITING_FOR_GATE, {"Ready": "False", "Reconciling": "True"}),
    ],
)
def test_each_reason_has_one_state_and_kstatus_conditions(
    reason: Reason, state: str, conditions: dict[str, str]
) -> None:
    assert reason.state == state
    status = AppStatus(scope="s", app="a", state=reason.state, reason=reason, generation=4)
    found = status.status_body()["conditions"]
    assert {c["type"]: c["status"] for c in found} == conditions
    assert all(c["reason"] == reason and c["observedGeneration"] == 4 for c in found)


def test_status_from_before_conditions_is_read_in_place() -> None:
    """What the version before conditions wrote: one Ready condition, `revision` for
    the attempted revision. It is read without loss, so an upgrade re-applies nothing."""
    old = {
        "metadata": {"name": "staging.ui", "generation": 2},
        "spec": {"scope": "staging", "app": "ui"},
        "status": {
            "state": "Stalled",
            "reason": "RolledBack",
            "message": "rolled back",
            "revision": "bad",
            "lastAppliedRevision": "good",
            "fingerprint": "f",
            "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ],
        },
    }
    status = AppStatus.from_object(old)
    assert (status.attempted_revision, status.last_applied_revision) == ("bad", "good")
    assert status.fingerprint == "f" and status.generation == 2
    summary = status.to_summary()
    assert summary["revision"] == "good" and summary["lastAttemptedRevision"] == "bad"
    assert {"name", "kind", "ready", "reason", "message", "revision"} <= set(summary)
    body = status.status_body()
    assert {c["type"] for c in body["conditions"]} == {"Ready", "Stalled"}
    assert body["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_printer_columns_show_ready_reason_and_the_applied_revision() -> None:
    version = crd_manifest()["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["Applied"] == ".status.lastAppliedRevision"
    assert "Age" in columns
