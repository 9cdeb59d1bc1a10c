"""Shared clusters: two config repos with the same environment folder never prune,
patch or count each other's apps; what both define is refused for the second one;
statuses written before identities are claimed without a reinstall."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from conveyor.cluster.ownership import OWNER_LABEL, SOURCE_ANNOTATION, EnvironmentIdentity
from tests.cluster.gitops import (
    ConfigRepo,
    by_name,
    chart_repo,
    conveyor,
    conveyor_apps,
    deployment,
    flux_v1_release,
    kubectl_json,
    reconcile_json,
)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


def config_map(name: str, namespace: str, value: str) -> str:
    return f"""
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: {namespace}
data:
  owner: {value}
"""


def namespace_doc(name: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"


@pytest.fixture
def env_path() -> str:
    """The same folder name in both repos, unique to the test."""
    return f"staging{uuid.uuid4().hex[:6]}"


def identity(repo: ConfigRepo, env_path: str) -> EnvironmentIdentity:
    return EnvironmentIdentity.of(repo.url, branch="main", path=env_path, name=env_path)


def helm_revisions(sandbox: SandboxHandle, release: str, namespace: str) -> list[int]:
    out = sandbox.run("helm", "history", release, "-n", namespace, "-o", "json").stdout
    return [int(r["revision"]) for r in json.loads(out)]


def label_of(obj: dict[str, Any] | None, key: str) -> str | None:
    assert obj is not None
    labels: dict[str, str] = obj["metadata"].get("labels") or {}
    return labels.get(key)


def test_two_repos_with_the_same_folder_never_prune_each_other(
    sandbox: SandboxHandle, tmp_path: Path, env_path: str
) -> None:
    ns_a, ns_b = f"own-a-{uuid.uuid4().hex[:6]}", f"own-b-{uuid.uuid4().hex[:6]}"
    charts = chart_repo(tmp_path)
    a = ConfigRepo(tmp_path / "a")
    a.write(f"{env_path}/ns/ns.yaml", namespace_doc(ns_a))
    a.write(f"{env_path}/ui.yaml", flux_v1_release("ui", ns_a, charts))
    a.write(f"{env_path}/web/deploy.yaml", deployment("web", ns_a))
    a.commit()
    b = ConfigRepo(tmp_path / "b")
    b.write(f"{env_path}/ns/ns.yaml", namespace_doc(ns_b))
    b.write(f"{env_path}/api/deploy.yaml", deployment("api", ns_b))
    b.commit()

    for round_ in range(3):
        code, report_a = reconcile_json(sandbox, a, env_path)
        assert code == 0, report_a
        assert report_a["pruned"] == [], f"round {round_}: {report_a}"
        assert set(by_name(report_a)) == {"ns", "ui", "web"}
        code, report_b = reconcile_json(sandbox, b, env_path)
        assert code == 0, report_b
        assert report_b["pruned"] == [], f"round {round_}: {report_b}"
        assert set(by_name(report_b)) == {"ns", "api"}
        for kind, name, namespace in [
            ("deployment", "web", ns_a),
            ("deployment", "ui", ns_a),
            ("deployment", "api", ns_b),
            ("namespace", ns_a, None),
            ("namespace", ns_b, None),
        ]:
            args = ["get", kind, name] + (["-n", namespace] if namespace else [])
            live = kubectl_json(sandbox, *args)
            assert live is not None, f"round {round_}: {kind} {name} is gone"
            assert live["metadata"].get("deletionTimestamp") is None
    assert helm_revisions(sandbox, "ui", ns_a) == [1]  # never reinstalled, never upgraded

    # Each object, ConveyorApp and release carries its own environment's identity.
    web = kubectl_json(sandbox, "get", "deployment", "web", "-n", ns_a)
    assert label_of(web, OWNER_LABEL) == identity(a, env_path).id
    assert web is not None
    assert web["metadata"]["annotations"][SOURCE_ANNOTATION] == identity(a, env_path).source
    api = kubectl_json(sandbox, "get", "deployment", "api", "-n", ns_b)
    assert label_of(api, OWNER_LABEL) == identity(b, env_path).id
    secrets = kubectl_json(sandbox, "get", "secret", "-n", ns_a, "-l", "owner=helm,name=ui")
    assert secrets is not None
    assert {label_of(s, OWNER_LABEL) for s in secrets["items"]} == {identity(a, env_path).id}
    listed = json.loads(conveyor(sandbox, "get", "apps", "-o", "json", check=True).stdout)
    sources = {s["scope"]: s["source"] for s in listed["sources"] if env_path in s["scope"]}
    assert sorted(sources.values()) == sorted(
        [identity(a, env_path).source, identity(b, env_path).source]
    )
    assert env_path in sources  # the first keeps the plain name; the second gets its own

    # An app leaving B's git is pruned from B only.
    b.remove(f"{env_path}/api")
    b.commit()
    code, report_b = reconcile_json(sandbox, b, env_path)
    assert code == 0 and report_b["pruned"] == ["api"]
    assert kubectl_json(sandbox, "get", "deployment", "api", "-n", ns_b) is None
    assert kubectl_json(sandbox, "get", "deployment", "web", "-n", ns_a) is not None
    sandbox.run("kubectl", "delete", "namespace", ns_a, ns_b, "--wait=false", check=False)


def test_object_and_release_both_repos_define_are_refused_for_the_second_until_adopted(
    sandbox: SandboxHandle, tmp_path: Path, env_path: str, namespace: str
) -> None:
    charts = chart_repo(tmp_path)
    a = ConfigRepo(tmp_path / "a")
    a.write(f"{env_path}/shared/cm.yaml", config_map("shared", namespace, "from-a"))
    a.write(f"{env_path}/svc.yaml", flux_v1_release("svc", namespace, charts, tag="1.0.0"))
    a.commit()
    b = ConfigRepo(tmp_path / "b")
    b.write(f"{env_path}/shared/cm.yaml", config_map("shared", namespace, "from-b"))
    b.write(f"{env_path}/svc.yaml", flux_v1_release("svc", namespace, charts, tag="2.0.0"))
    b.write(f"{env_path}/own/cm.yaml", config_map("only-b", namespace, "from-b"))
    b.commit()
    assert reconcile_json(sandbox, a, env_path)[0] == 0
    id_a = identity(a, env_path)

    code, report = reconcile_json(sandbox, b, env_path)
    assert code == 1
    apps = by_name(report)
    for app in ("shared", "svc"):
        assert apps[app]["state"] == "Stalled", apps[app]
        assert apps[app]["reason"] == "OwnershipConflict"
        assert id_a.source in apps[app]["message"] and id_a.id in apps[app]["message"]
    assert "Helm release" in apps["svc"]["message"]
    assert apps["own"]["ready"]  # the rest of B goes on
    shared = kubectl_json(sandbox, "get", "configmap", "shared", "-n", namespace)
    assert shared is not None and shared["data"]["owner"] == "from-a"
    assert label_of(shared, OWNER_LABEL) == id_a.id
    assert helm_revisions(sandbox, "svc", namespace) == [1]
    svc = kubectl_json(sandbox, "get", "deployment", "svc", "-n", namespace)
    assert svc is not None
    assert svc["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.0.0")

    # A takeover happens only when asked for: `conveyor adopt` for one app, an
    # annotation in git for the other.
    scope_b = next(
        s["scope"]
        for s in json.loads(conveyor(sandbox, "get", "apps", "-o", "json", check=True).stdout)[
            "sources"
        ]
        if s["source"] == identity(b, env_path).source
    )
    adopted = conveyor(sandbox, "adopt", "shared", "--env", scope_b, "--from", id_a.id)
    assert adopted.returncode == 0, adopted.stderr
    b.write(
        f"{env_path}/svc.yaml",
        flux_v1_release("svc", namespace, charts, tag="2.0.0").replace(
            "  annotations:\n", f"  annotations:\n    conveyor.dev/adopt-from: {id_a.source}\n", 1
        ),
    )
    b.commit()
    code, report = reconcile_json(sandbox, b, env_path)
    assert code == 0, report
    shared = kubectl_json(sandbox, "get", "configmap", "shared", "-n", namespace)
    assert shared is not None and shared["data"]["owner"] == "from-b"
    assert label_of(shared, OWNER_LABEL) == identity(b, env_path).id
    assert helm_revisions(sandbox, "svc", namespace) == [1, 2]  # an upgrade, not a reinstall

    # Now A is the one refused, and changes nothing of B's.
    code, report = reconcile_json(sandbox, a, env_path)
    assert code == 1
    assert by_name(report)["shared"]["reason"] == "OwnershipConflict"
    shared = kubectl_json(sandbox, "get", "configmap", "shared", "-n", namespace)
    assert shared is not None and shared["data"]["owner"] == "from-b"
    assert helm_revisions(sandbox, "svc", namespace) == [1, 2]


def test_statuses_and_objects_from_before_identities_are_claimed_without_a_reinstall(
    sandbox: SandboxHandle, tmp_path: Path, env_path: str, namespace: str
) -> None:
    charts = chart_repo(tmp_path)
    repo = ConfigRepo(tmp_path / "a")
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace))
    repo.write(f"{env_path}/ui.yaml", flux_v1_release("ui", namespace, charts))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    # What the version before identities left behind: the same objects, statuses and
    # release, without the owner label and source annotation.
    unowned = [f"{OWNER_LABEL}-"]
    for args in (
        ["conveyorapps", "-n", "conveyor-system", "-l", f"conveyor.dev/scope={env_path}"],
        ["deployment", "web", "-n", namespace],
        ["secret", "-n", namespace, "-l", "owner=helm,name=ui"],
    ):
        sandbox.run("kubectl", "label", *args, *unowned, "--overwrite")
        if args[0] != "secret":
            sandbox.run("kubectl", "annotate", *args, f"{SOURCE_ANNOTATION}-", "--overwrite")
    before = conveyor_apps(sandbox, env_path)
    assert len(before) == 3
    assert all(OWNER_LABEL not in (i["metadata"].get("labels") or {}) for i in before)

    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    assert report["pruned"] == []
    assert helm_revisions(sandbox, "ui", namespace) == [1]  # no reinstall, no upgrade
    mine = identity(repo, env_path).id
    after = kubectl_json(
        sandbox, "get", "conveyorapps", "-n", "conveyor-system", "-l", f"{OWNER_LABEL}={mine}"
    )
    assert after is not None
    assert sorted(i["metadata"]["name"] for i in after["items"]) == sorted(
        i["metadata"]["name"] for i in before
    )
    assert (
        label_of(kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace), OWNER_LABEL)
        == mine
    )
    secrets = kubectl_json(sandbox, "get", "secret", "-n", namespace, "-l", "owner=helm,name=ui")
    assert secrets is not None
    assert {label_of(s, OWNER_LABEL) for s in secrets["items"]} == {mine}

    # A second repo with the same folder does not take what the first just claimed.
    other = ConfigRepo(tmp_path / "b")
    other.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace, replicas=3))
    other.commit()
    code, report = reconcile_json(sandbox, other, env_path)
    assert code == 1 and by_name(report)["web"]["reason"] == "OwnershipConflict"
    web = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    assert web is not None and web["spec"]["replicas"] == 1
    assert report["pruned"] == []
