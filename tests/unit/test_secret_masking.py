"""Secret values never reach a diff: data, kubectl's last-applied copy, and annotations of
any object that copy them. The sandbox test (tests/cluster/test_secret_diffs.py) runs the
same paths against a real apiserver."""

from __future__ import annotations

import base64
import json

from conveyor.cluster.diff import LAST_APPLIED, mask_secrets, normalize, secret_values, unified
from conveyor.promote.offline_diff import diff_objects_offline

PLAIN = "s3cr3t-old-value"
NEW_PLAIN = "s3cr3t-new-value"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def applied_secret(value: str) -> dict[str, object]:
    """A Secret as `kubectl apply` leaves it: data, and the whole object again as JSON."""
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "db", "namespace": "ns"},
        "stringData": {"password": value},
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "db",
            "namespace": "ns",
            "annotations": {LAST_APPLIED: json.dumps(body), "note": f"copied {value}"},
        },
        "data": {"password": b64(value)},
    }


def test_normalize_drops_the_last_applied_copy_of_any_object() -> None:
    config_map = {
        "kind": "ConfigMap",
        "metadata": {"name": "c", "annotations": {LAST_APPLIED: "{}", "keep": "me"}},
    }
    normalized = normalize(config_map)
    assert normalized is not None
    assert normalized["metadata"]["annotations"] == {"keep": "me"}


def test_a_secret_masks_its_last_applied_copy_and_annotations_holding_its_values() -> None:
    before, after = mask_secrets(applied_secret(PLAIN), applied_secret(NEW_PLAIN))
    text = unified(before, after, label="Secret ns/db")
    for leaked in (PLAIN, NEW_PLAIN, b64(PLAIN), b64(NEW_PLAIN)):
        assert leaked not in text
    assert after is not None
    assert after["data"] == {"password": "*** (secret value changed)"}
    assert after["metadata"]["annotations"] == {
        LAST_APPLIED: "*** (secret value changed)",
        "note": "*** (secret value changed)",
    }


def test_an_annotation_of_another_object_that_copies_a_secret_value_is_masked() -> None:
    secrets = secret_values([applied_secret(PLAIN)])
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "web", "annotations": {"harmless": "yes"}},
        "spec": {"template": {"metadata": {"annotations": {"password-copy": f"x{b64(PLAIN)}x"}}}},
    }
    _, masked = mask_secrets(None, deployment, known=secrets)
    assert masked is not None
    assert masked["metadata"]["annotations"] == {"harmless": "yes"}
    assert masked["spec"]["template"]["metadata"]["annotations"] == {"password-copy": "***"}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["password-copy"] != "***"


def test_secret_values_are_recognised_stored_and_as_text_but_not_when_tiny() -> None:
    secret = {
        "kind": "Secret",
        "data": {"a": b64(PLAIN), "binary": base64.b64encode(b"\xff\xfe\x00").decode()},
        "stringData": {"b": NEW_PLAIN, "tiny": "ab"},
    }
    found = secret_values([secret, {"kind": "ConfigMap", "data": {"x": "not a secret"}}])
    assert {PLAIN, b64(PLAIN), NEW_PLAIN, b64(NEW_PLAIN)} <= found
    assert "ab" not in found and "not a secret" not in found


def test_malformed_secret_data_is_no_crash_for_masking() -> None:
    for data in (["x"], "2024-01-01", None):
        secret = {"kind": "Secret", "metadata": {"name": "s"}, "data": data}
        assert secret_values([secret]) == frozenset()
        before, _ = mask_secrets(secret, None)
        assert before == secret


def test_offline_diff_of_a_secret_shows_the_change_but_no_value() -> None:
    was, now = applied_secret(PLAIN), applied_secret(NEW_PLAIN)
    for obj in (was, now):
        obj["metadata"]["annotations"].pop(LAST_APPLIED)  # type: ignore[union-attr]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": {"copy": NEW_PLAIN}},
    }
    changes = diff_objects_offline([was], [now, pod])
    text = "".join(c.diff for c in changes)
    assert [c.action for c in changes] == ["update", "create"]
    assert "*** (secret value changed)" in text
    for leaked in (PLAIN, NEW_PLAIN, b64(PLAIN), b64(NEW_PLAIN)):
        assert leaked not in text
