"""ConfigMap and Secret data as valuesFrom and substituteFrom read it: one rule for both
(render/data_objects.py), tried here directly and through each of its readers."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from conveyor.render.data_objects import data_entries, data_value, find_data_object
from conveyor.render.documents import Document, RenderError
from tests.cluster.gitops import flux_kustomization
from tests.unit.test_flux_kustomization import apps, expanded, write


def secret(data: dict[str, str], **extra: object) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "vars", "namespace": "apps"},
        "data": data,
        **extra,
    }


def test_secret_data_is_base64_and_string_data_wins() -> None:
    obj = secret(
        {"a": base64.b64encode(b"one").decode(), "b": base64.b64encode(b"two").decode()},
        stringData={"b": "plain"},
    )
    assert data_value(obj, "a") == "one"
    assert data_value(obj, "b") == "plain"
    assert data_value(obj, "missing") is None
    assert data_entries(obj) == {"a": "one", "b": "plain"}
    folded = base64.b64encode(b"x" * 100).decode()
    # Folded over lines, as kustomize writes a generated Secret's long values.
    lines = "\n".join(folded[i : i + 76] for i in range(0, len(folded), 76)) + "\n"
    assert data_value(secret({"long": lines}), "long") == "x" * 100


@pytest.mark.parametrize(
    "raw", ["not base64!", "b25l dHdv", base64.b64encode(b"\xff\xfe").decode()]
)
def test_a_value_the_api_server_would_refuse_is_an_error_naming_object_and_key(raw: str) -> None:
    with pytest.raises(RenderError) as failed:
        data_entries(secret({"token": raw}))
    assert str(failed.value) == "Secret apps/vars key 'token' is not base64 of UTF-8 text"
    assert raw not in str(failed.value)


def test_an_object_without_namespace_is_found_in_default_where_it_is_applied() -> None:
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "v"}, "data": {}}
    documents = [Document(obj=config, file="f.yaml", line=1)]
    assert find_data_object(documents, "ConfigMap", "default", "v") is documents[0]
    assert find_data_object(documents, "ConfigMap", "apps", "v") is None
    assert find_data_object(documents, "Secret", "default", "v") is None


def test_substitute_from_a_bad_secret_in_git_stalls_its_app_naming_the_kustomization(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "env/vars.yaml",
        """
        apiVersion: v1
        kind: Secret
        metadata: {name: vars, namespace: flux-system}
        data: {token: "c2VjcmV0!!"}
        """,
    )
    write(
        tmp_path,
        "apps/web/config.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: web, namespace: default}
        data: {token: "${token}"}
        """,
    )
    spec = {"postBuild": {"substituteFrom": [{"kind": "Secret", "name": "vars"}]}}
    write(tmp_path, "env/web.yaml", flux_kustomization("web", "./apps/web", **spec))
    error = apps(expanded(tmp_path, "env", data={}))["web"].error
    assert str(error) == (
        "env/web.yaml:1: postBuild.substituteFrom Secret flux-system/vars key 'token' "
        "is not base64 of UTF-8 text"
    )
