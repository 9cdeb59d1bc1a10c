"""`conveyor reconcile` and `conveyor diff` end to end: real git, real cluster, real helm."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from conveyor.causes import DETAILS_LIMIT
from conveyor.cluster.helm_storage import decode_release, encode_release
from tests.cluster.gitops import (
    CHART,
    ConfigRepo,
    by_name,
    chart_repo,
    conveyor,
    deployment,
    flux_v1_release,
    hold_lease,
    kubectl_json,
    reconcile_json,
)
from tests.conftest import ROOT, SandboxHandle

pytestmark = pytest.mark.cluster


@pytest.fixture
def repo(tmp_path: Path) -> ConfigRepo:
    return ConfigRepo(tmp_path)


@pytest.fixture
def env_path() -> str:
    """A unique environment folder per test, so scopes never collide."""
    return f"envs/e{uuid.uuid4().hex[:8]}"


def replicas(sandbox: SandboxHandle, namespace: str, name: str) -> int | None:
    live = kubectl_json(sandbox, "get", "deployment", name, "-n", namespace)
    return None if live is None else int(live["spec"]["replicas"])


def test_change_in_git_reaches_cluster_and_noop_makes_no_writes(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    charts = chart_repo(tmp_path)
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace, replicas=2))
    repo.write(f"{env_path}/ui.yaml", flux_v1_release("ui", namespace, charts, tag="1.0.0"))
    first = repo.commit("first")
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    apps = by_name(report)
    assert apps["web"]["ready"] and apps["ui"]["ready"]
    assert apps["web"]["revision"] == first
    assert apps["ui"]["helmRevision"] == 1
    releases = json.loads(sandbox.run("helm", "list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("ui", "deployed")]
    assert replicas(sandbox, namespace, "web") == 2

    code, again = reconcile_json(sandbox, repo, env_path)
    assert code == 0
    assert again["writes"] == 0  # unchanged apps cost no API write and no helm call
    assert by_name(again)["ui"]["helmRevision"] == 1

    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace, replicas=3))
    repo.write(f"{env_path}/ui.yaml", flux_v1_release("ui", namespace, charts, tag="1.1.0"))
    second = repo.commit("second")
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0
    assert replicas(sandbox, namespace, "web") == 3
    ui = kubectl_json(sandbox, "get", "deployment", "ui", "-n", namespace)
    assert ui is not None
    assert ui["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/ui:1.1.0"
    assert by_name(report)["ui"]["helmRevision"] == 2
    assert by_name(report)["web"]["revision"] == second
    # Status survives in the cluster, visible to kubectl and `conveyor get apps`.
    listed = json.loads(conveyor(sandbox, "get", "apps", "-o", "json", check=True).stdout)
    mine = {i["name"]: i for i in listed["items"] if i["revision"] == second}
    assert set(mine) == {"web", "ui"}
    assert sandbox.run("kubectl", "get", "conveyorapps", "-n", "conveyor-system").returncode == 0
    scope = env_path.replace("/", "-")
    # kstatus conditions: kubectl waits on them, and the columns show them.
    waited = sandbox.run(
        "kubectl",
        "wait",
        "--for=condition=Ready",
        f"conveyorapp/{scope}.web",
        "-n",
        "conveyor-system",
        "--timeout=20s",
        check=False,
    )
    assert waited.returncode == 0, waited.stderr
    table = sandbox.run("kubectl", "get", "conveyorapp", f"{scope}.ui", "-n", "conveyor-system")
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "APP", "READY", "REASON", "APPLIED"]
    assert row.split()[1:5] == ["ui", "True", "ReconciliationSucceeded", second]
    events = kubectl_json(
        sandbox,
        "get",
        "events",
        "-n",
        "conveyor-system",
        "--field-selector",
        f"involvedObject.name={scope}.web",
    )
    assert events is not None
    assert {e["reason"] for e in events["items"]} >= {"ReconciliationSucceeded"}


def test_removed_app_and_removed_object_are_pruned(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    repo.write(f"{env_path}/a/deploy.yaml", deployment("a", namespace))
    repo.write(
        f"{env_path}/a/config.yaml",
        f"""
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: a-config, namespace: {namespace}}}
        data: {{k: v}}
        """,
    )
    repo.write(f"{env_path}/b/deploy.yaml", deployment("b", namespace))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    assert replicas(sandbox, namespace, "b") == 1

    repo.remove(f"{env_path}/b")
    repo.remove(f"{env_path}/a/config.yaml")
    repo.commit("remove b and a's config")
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0
    assert report["pruned"] == ["b"]
    assert replicas(sandbox, namespace, "b") is None
    assert kubectl_json(sandbox, "get", "configmap", "a-config", "-n", namespace) is None
    assert replicas(sandbox, namespace, "a") == 1


def test_broken_yaml_stalls_only_its_app_and_prunes_nothing(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    repo.write(f"{env_path}/good/deploy.yaml", deployment("good", namespace))
    repo.write(f"{env_path}/bad/deploy.yaml", deployment("bad", namespace))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0

    repo.write(
        f"{env_path}/bad/deploy.yaml",
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: bad
          labels: [unclosed
        """,
    )
    repo.write(f"{env_path}/good/deploy.yaml", deployment("good", namespace, replicas=2))
    repo.commit("break bad")
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 1
    apps = by_name(report)
    assert apps["good"]["ready"] and replicas(sandbox, namespace, "good") == 2
    assert apps["bad"]["state"] == "Stalled"
    assert apps["bad"]["reason"] == "RenderFailed"
    assert f"{env_path}/bad/deploy.yaml:6: invalid YAML" in apps["bad"]["message"]
    assert report["pruned"] == []
    assert replicas(sandbox, namespace, "bad") == 1  # still running as last applied


def test_unreachable_remote_leaves_everything_in_place(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    scope = env_path.replace("/", "-")
    fetched = kubectl_json(sandbox, "get", "conveyorapp", scope, "-n", "conveyor-system")
    assert fetched is not None and fetched["status"]["reason"] == "Fetched"
    shutil.move(repo.bare, tmp_path / "gone.git")

    # Another writer holds the environment's Lease, renewed just now: the command
    # records nothing past it, and says why (the holder fetches and records on its own).
    hold_lease(sandbox, scope, "agent-elsewhere", duration=60)
    held = conveyor(sandbox, "reconcile", "--repo", repo.url, "--path", env_path)
    assert held.returncode == 1 and "source failed" in held.stderr, held.stderr
    assert "not recording the failure on the source's status" in held.stderr, held.stderr
    assert "held by agent-elsewhere" in held.stderr
    unwritten = kubectl_json(sandbox, "get", "conveyorapp", scope, "-n", "conveyor-system")
    assert unwritten is not None and unwritten["status"]["reason"] == "Fetched"
    assert unwritten["metadata"]["resourceVersion"] == fetched["metadata"]["resourceVersion"]

    # With the Lease free, the command takes it for that one write and releases it.
    sandbox.run("kubectl", "delete", "lease", f"conveyor-{scope}", "-n", "conveyor-system")
    result = conveyor(sandbox, "reconcile", "--repo", repo.url, "--path", env_path)
    assert result.returncode == 1
    assert "source failed" in result.stderr and "nothing was applied or pruned" in result.stderr
    assert "not recording" not in result.stderr
    assert replicas(sandbox, namespace, "web") == 1
    listed = json.loads(conveyor(sandbox, "get", "apps", "-o", "json", check=True).stdout)
    source = next(s for s in listed["sources"] if s["scope"] == scope)
    assert source["state"] == "Stalled" and source["reason"] == "FetchFailed"
    assert "gone" not in source["message"] and "config.git" in source["message"]
    web = next(i for i in listed["items"] if i["scope"] == scope)
    assert web["ready"]
    lease = kubectl_json(sandbox, "get", "lease", f"conveyor-{scope}", "-n", "conveyor-system")
    assert lease is not None and not lease["spec"].get("holderIdentity"), lease


def test_plain_app_that_never_becomes_healthy_is_rolled_back_to_the_last_good_revision(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace, image="web:1.0.0"))
    good = repo.commit("web 1.0.0")
    assert reconcile_json(sandbox, repo, env_path)[0] == 0

    # 1.1.0 cannot schedule anywhere and brings a new ConfigMap along.
    broken = deployment("web", namespace, image="web:1.1.0").replace(
        "    spec:\n      containers:",
        "    spec:\n      nodeSelector: {disk: none}\n      containers:",
    )
    assert "nodeSelector" in broken
    extra = (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web-extra, namespace: {namespace}}}\n"
    )
    repo.write(f"{env_path}/web/deploy.yaml", broken)
    repo.write(f"{env_path}/web/extra.yaml", extra)
    bad = repo.commit("web 1.1.0")
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "6")
    assert code == 1
    web = by_name(report)["web"]
    assert web["state"] == "Stalled" and web["reason"] == "RolledBack", web
    assert f"rolled back to revision {good[:12]}" in web["message"]
    live = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    assert live is not None
    pod_spec = live["spec"]["template"]["spec"]
    assert pod_spec["containers"][0]["image"].endswith("/web:1.0.0")
    assert "nodeSelector" not in pod_spec
    # What the failed revision added is gone again, as `helm rollback` would do.
    assert kubectl_json(sandbox, "get", "configmap", "web-extra", "-n", namespace) is None

    # The failed content is not retried on the next pass ...
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "6")
    assert code == 1 and report["writes"] == 0
    # What runs is the last good revision; the failed one is only the attempted one.
    assert by_name(report)["web"]["revision"] == good
    assert by_name(report)["web"]["lastAttemptedRevision"] == bad
    # ... and a fixed revision is applied afresh, the extra ConfigMap with it.
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace, image="web:1.1.1"))
    repo.commit("web 1.1.1")
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "60")
    assert code == 0, report
    assert by_name(report)["web"]["reason"] == "ReconciliationSucceeded"
    assert kubectl_json(sandbox, "get", "configmap", "web-extra", "-n", namespace) is not None


def test_failed_helm_upgrade_is_rolled_back_and_a_new_revision_is_tried_again(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    charts = chart_repo(tmp_path)
    good = flux_v1_release("api", namespace, charts, tag="1.0.0", timeout=8)
    repo.write(f"{env_path}/api.yaml", good)
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0

    # Pods that can never schedule: the upgrade never becomes healthy.
    broken = good.replace(
        "    replicaCount: 1", "    replicaCount: 1\n    nodeSelector: {disk: none}"
    )
    repo.write(f"{env_path}/api.yaml", broken.replace("1.0.0", "2.0.0"))
    repo.commit("bad upgrade")
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "8")
    assert code == 1
    api = by_name(report)["api"]
    assert api["state"] == "Stalled" and api["reason"] == "RolledBack"
    assert "rolled back to Helm revision 1" in api["message"]
    history = json.loads(
        sandbox.run("helm", "history", "api", "-n", namespace, "-o", "json").stdout
    )
    assert history[-1]["status"] == "deployed"
    assert "Rollback to 1" in history[-1]["description"]
    live = kubectl_json(sandbox, "get", "deployment", "api", "-n", namespace)
    assert live is not None
    assert live["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.0.0")

    # The same content is not retried (no loop of failing upgrades) ...
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "8")
    assert code == 1 and report["writes"] == 0
    # ... but a new revision starts afresh: no "retries exhausted" dead end.
    repo.write(f"{env_path}/api.yaml", good.replace("1.0.0", "2.0.1"))
    repo.commit("fixed")
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "30")
    assert code == 0, report
    assert by_name(report)["api"]["reason"] == "ReconciliationSucceeded"


def test_release_left_pending_by_a_crash_is_recovered(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    charts = chart_repo(tmp_path)
    repo.write(f"{env_path}/worker.yaml", flux_v1_release("worker", namespace, charts))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    # What a crash mid-upgrade leaves: the latest revision stuck in pending-upgrade.
    secret_name = "sh.helm.release.v1.worker.v1"
    secret = kubectl_json(sandbox, "get", "secret", secret_name, "-n", namespace)
    assert secret is not None
    body = decode_release(secret["data"]["release"])
    body["info"]["status"] = "pending-upgrade"
    secret["data"]["release"] = encode_release(body)
    secret["metadata"]["labels"]["status"] = "pending-upgrade"
    sandbox.run("kubectl", "replace", "-f", "-", input=json.dumps(secret))
    stuck = sandbox.run("helm", "upgrade", "worker", str(CHART), "-n", namespace, check=False)
    assert "another operation" in stuck.stderr

    repo.write(f"{env_path}/worker.yaml", flux_v1_release("worker", namespace, charts, tag="1.0.1"))
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    status = json.loads(
        sandbox.run("helm", "status", "worker", "-n", namespace, "-o", "json").stdout
    )
    assert status["info"]["status"] == "deployed"
    assert status["version"] == 2


def test_flux_v2_release_from_oci_with_values_from_and_depends_on(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    sandbox.run("helm", "package", str(CHART), "--destination", str(tmp_path))
    sandbox.run(
        "helm",
        "push",
        str(tmp_path / "service-0.1.0.tgz"),
        f"oci://{sandbox.registry}/v2charts",
        "--plain-http",
    )
    sandbox.run(
        "kubectl",
        "create",
        "configmap",
        "api-values",
        "-n",
        namespace,
        "--from-literal=values.yaml=replicaCount: 3",
    )
    repo.write(
        f"{env_path}/sources.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {{name: internal, namespace: {namespace}}}
        spec: {{type: oci, url: "oci://{sandbox.registry}/v2charts"}}
        ---
        apiVersion: source.toolkit.fluxcd.io/v1beta2
        kind: OCIRepository
        metadata: {{name: service-chart, namespace: {namespace}}}
        spec:
          url: oci://{sandbox.registry}/v2charts/service
          ref: {{tag: 0.1.0}}
        ---
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmChart
        metadata: {{name: service-range, namespace: {namespace}}}
        spec:
          chart: service
          version: ">=0.1.0 <1.0.0"
          sourceRef: {{kind: HelmRepository, name: internal}}
        ---
        apiVersion: image.toolkit.fluxcd.io/v1beta2
        kind: ImagePolicy
        metadata: {{name: api, namespace: {namespace}}}
        spec:
          imageRepositoryRef: {{name: api}}
          policy: {{semver: {{range: ">=0.0.0"}}}}
        """,
    )
    repo.write(
        f"{env_path}/api.yaml",
        f"""
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {{name: api, namespace: {namespace}}}
        spec:
          interval: 5m
          dependsOn: [{{name: db}}]
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {{kind: HelmRepository, name: internal}}
          valuesFrom:
            - kind: ConfigMap
              name: api-values
          values:
            image:
              repository: registry.local/api
              tag: 0.90.0 # {{"$imagepolicy": "{namespace}:api:tag"}}
        """,
    )
    repo.write(
        f"{env_path}/db.yaml",
        f"""
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {{name: db, namespace: {namespace}}}
        spec:
          chartRef: {{kind: OCIRepository, name: service-chart}}
          values: {{service: {{enabled: false}}}}
        """,
    )
    repo.write(
        f"{env_path}/cache.yaml",
        f"""
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {{name: cache, namespace: {namespace}}}
        spec:
          chartRef: {{kind: HelmChart, name: service-range}}
          values: {{service: {{enabled: false}}}}
        """,
    )
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    assert set(by_name(report)) == {"api", "db", "cache"}  # the ImagePolicy is not an app
    releases = json.loads(sandbox.run("helm", "list", "-n", namespace, "-o", "json").stdout)
    cache = next(r for r in releases if r["name"] == "cache")
    assert cache["chart"] == "service-0.1.0"  # the range, through the HelmChart
    api = kubectl_json(sandbox, "get", "deployment", "api", "-n", namespace)
    assert api is not None and api["spec"]["replicas"] == 3  # from valuesFrom
    assert api["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/api:0.90.0"
    assert kubectl_json(sandbox, "get", "imagepolicy", "api", "-n", namespace) is None
    assert kubectl_json(sandbox, "get", "service", "db", "-n", namespace) is None


def test_kustomization_directory_is_rendered_with_kustomize(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    repo.write(
        f"{env_path}/site/kustomization.yaml",
        f"""
        namespace: {namespace}
        resources: [deploy.yaml]
        configMapGenerator:
          - name: site-config
            literals: [mode=fast]
        """,
    )
    repo.write(f"{env_path}/site/deploy.yaml", deployment("site", "placeholder"))
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    assert by_name(report)["site"]["kind"] == "kustomize"
    assert replicas(sandbox, namespace, "site") == 1
    configs = kubectl_json(sandbox, "get", "configmaps", "-n", namespace)
    assert configs is not None
    assert any(c["metadata"]["name"].startswith("site-config-") for c in configs["items"])


def test_empty_render_is_not_pruned_unless_allowed(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    repo.write(f"{env_path}/web/deploy.yaml", "# emptied by a bad merge\n")
    repo.commit("empty")
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 1
    assert by_name(report)["web"]["reason"] == "EmptyRender"
    assert replicas(sandbox, namespace, "web") == 1
    code, report = reconcile_json(sandbox, repo, env_path, "--allow-empty", "web")
    assert code == 0
    assert replicas(sandbox, namespace, "web") is None


def test_suspended_app_is_left_alone_until_resumed(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    scope = env_path.replace("/", "-")
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    conveyor(sandbox, "suspend", "web", "--env", scope, check=True)
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace, replicas=2))
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env_path)
    assert by_name(report)["web"]["state"] == "Suspended"
    assert replicas(sandbox, namespace, "web") == 1
    conveyor(sandbox, "resume", "web", "--env", scope, check=True)
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0 and replicas(sandbox, namespace, "web") == 2


def config_map(name: str, namespace: str, value: str) -> str:
    return f"""
    apiVersion: v1
    kind: ConfigMap
    metadata: {{name: {name}, namespace: {namespace}}}
    data: {{value: "{value}"}}
    """


DIFF_HEADER = re.compile(r"^# (\S+): (create|update|delete) (\S+) (\S+)$", re.MULTILINE)


def test_what_diff_shows_is_exactly_what_the_next_reconcile_applies_and_prunes(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace))
    for name in ("kept", "changed", "removed"):
        repo.write(f"{env_path}/web/{name}.yaml", config_map(name, namespace, "1"))
    repo.write(f"{env_path}/other/config.yaml", config_map("other", namespace, "1"))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0

    def live() -> dict[tuple[str, str], dict[str, Any]]:
        found = {}
        for kind in ("configmaps", "deployments"):
            listed = kubectl_json(sandbox, "get", kind, "-n", namespace, "-l", "conveyor.dev/app")
            for item in (listed or {}).get("items", []):
                found[(item["kind"], item["metadata"]["name"])] = item
        return found

    before = live()
    assert sorted(n for _, n in before) == ["changed", "kept", "other", "removed", "web"]
    repo.write(f"{env_path}/web/added.yaml", config_map("added", namespace, "1"))
    repo.write(f"{env_path}/web/changed.yaml", config_map("changed", namespace, "2"))
    repo.remove(f"{env_path}/web/removed.yaml")
    repo.commit("add, change, remove")

    shown = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    planned = {
        (app, action, kind, ref.removeprefix(f"{namespace}/"))
        for app, action, kind, ref in DIFF_HEADER.findall(shown.stdout)
    }
    assert planned == {
        ("web", "create", "ConfigMap", "added"),
        ("web", "update", "ConfigMap", "changed"),
        ("web", "delete", "ConfigMap", "removed"),
    }, shown.stdout
    assert "-  value: '1'" in shown.stdout and "+  value: '2'" in shown.stdout

    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    after = live()
    version = {k: o["metadata"]["resourceVersion"] for k, o in before.items()}
    # What the diff listed happened, and nothing else was written.
    for _, action, kind, name in planned:
        if action == "create":
            assert (kind, name) not in before and (kind, name) in after
        elif action == "update":
            assert after[(kind, name)]["metadata"]["resourceVersion"] != version[(kind, name)]
        else:
            assert (kind, name) in before and (kind, name) not in after
    listed = {(kind, name) for _, _, kind, name in planned}
    untouched = {k: o["metadata"]["resourceVersion"] for k, o in after.items() if k not in listed}
    assert untouched == {k: v for k, v in version.items() if k not in listed}
    assert after[("ConfigMap", "changed")]["data"] == {"value": "2"}
    assert after[("ConfigMap", "added")]["data"] == {"value": "1"}
    # The app's inventory is what the plan applied; the next diff has nothing left.
    scope = env_path.replace("/", "-")
    status = kubectl_json(sandbox, "get", "conveyorapp", f"{scope}.web", "-n", "conveyor-system")
    assert status is not None
    assert sorted(i["name"] for i in status["status"]["inventory"]) == [
        "added",
        "changed",
        "kept",
        "web",
    ]
    again = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert again.returncode == 0, again.stdout + again.stderr

    # An app leaves git while another fails to render: the engine prunes no app then,
    # and the diff shows no deletion for it, only why.
    repo.remove(f"{env_path}/other/config.yaml")
    repo.write(f"{env_path}/web/changed.yaml", "kind: [\n")
    repo.commit("remove other, break web")
    shown = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert "# other: note: left git; not pruned while a render fails" in shown.stdout
    assert DIFF_HEADER.findall(shown.stdout) == []
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 1 and report["pruned"] == [], report
    assert live()[("ConfigMap", "other")]["data"] == {"value": "1"}


def test_diff_against_live_exit_codes_and_masked_secrets(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    charts = chart_repo(tmp_path)
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace))
    repo.write(
        f"{env_path}/web/secret.yaml",
        f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: web-secret, namespace: {namespace}}}
        stringData: {{password: first-password}}
        """,
    )
    repo.write(f"{env_path}/ui.yaml", flux_v1_release("ui", namespace, charts))
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0
    same = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert same.returncode == 0, same.stdout + same.stderr

    repo.write(
        f"{env_path}/web/secret.yaml",
        f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: web-secret, namespace: {namespace}}}
        stringData: {{password: second-password}}
        """,
    )
    repo.write(f"{env_path}/ui.yaml", flux_v1_release("ui", namespace, charts, replicas=4))
    repo.commit()
    changed = conveyor(
        sandbox, "diff", "--repo", repo.url, "--path", env_path, "--format", "markdown"
    )
    assert changed.returncode == 1
    text = changed.stdout
    assert "### ui" in text and "+  replicas: 4" in text  # the rendered HelmRelease change
    assert "password: '*** (secret value changed)'" in text
    assert "second-password" not in text and "first-password" not in text
    assert "c2Vjb25k" not in text  # nor base64 of it

    repo.write(f"{env_path}/web/deploy.yaml", "kind: [\n")
    repo.commit()
    broken = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert broken.returncode == 2


def test_diff_is_clean_after_a_reconcile_of_a_chart_whose_objects_name_no_namespace(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    """Helm puts a chart's objects without a namespace (or with an empty one) into the
    release's namespace; the diff compares them there, not in `default`, and a
    cluster-scoped object stays without one."""
    charts = chart_repo(tmp_path, chart=ROOT / "tests" / "fixtures" / "charts" / "namespaceless")
    repo.write(
        f"{env_path}/team.yaml",
        f"""
        apiVersion: helm.fluxcd.io/v1
        kind: HelmRelease
        metadata: {{name: team, namespace: {namespace}}}
        spec:
          releaseName: team
          chart: {{git: "{charts}", path: namespaceless, ref: master}}
          values: {{replicaCount: 2}}
        """,
    )
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 0, report
    for kind in ("deployment/team-web", "configmap/team-config", "cronjob/team-job"):
        assert kubectl_json(sandbox, "get", kind, "-n", namespace) is not None
    clean = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert (clean.returncode, clean.stdout) == (0, ""), clean.stdout + clean.stderr
    sandbox.run("kubectl", "delete", "clusterrole", f"team-{namespace}-reader")


def test_failed_helm_upgrade_says_its_cause_and_where_the_value_is_written(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str, tmp_path: Path
) -> None:
    """Not helm's kilobytes of escaped JSON: the cause in one line, led by the file, line
    and key of the value in the HelmRelease, in the report, the status and the Event."""
    charts = chart_repo(tmp_path)
    good = flux_v1_release("api", namespace, charts, timeout=8)
    repo.write(f"{env_path}/api.yaml", good)
    repo.commit()
    assert reconcile_json(sandbox, repo, env_path)[0] == 0

    repo.write(f"{env_path}/api.yaml", good.replace("replicaCount: 1", 'replicaCount: "two"'))
    repo.commit("replicas as text")
    line = 1 + (repo.work / env_path / "api.yaml").read_text().splitlines().index(
        '    replicaCount: "two"'
    )
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "8")
    assert code == 1
    cause = (
        "Deployment api: spec.replicas: cannot unmarshal string into int32 "
        f"(values: replicaCount in {env_path}/api.yaml:{line})"
    )
    api = by_name(report)["api"]
    assert api["message"].startswith(cause), api["message"]
    assert len(api["message"]) < 300 and '\\"' not in api["message"]
    scope = env_path.replace("/", "-")
    status = kubectl_json(sandbox, "get", "conveyorapp", f"{scope}.api", "-n", "conveyor-system")
    assert status is not None and status["status"]["message"] == api["message"]
    ready = next(c for c in status["status"]["conditions"] if c["type"] == "Ready")
    assert ready["message"] == api["message"]
    # helm's own words are kept, capped, behind the cause: the status's details, the Event.
    details = status["status"]["details"]
    assert len(details) <= DETAILS_LIMIT and "details" not in api  # for scripts: the cause
    assert details.startswith("Error: UPGRADE FAILED: cannot patch") and "\n" not in api["message"]
    events = kubectl_json(
        sandbox,
        "get",
        "events",
        "-n",
        "conveyor-system",
        "--field-selector",
        f"involvedObject.name={scope}.api",
    )
    assert events is not None
    assert any(
        e["message"].startswith(cause) and "\n\nError: UPGRADE FAILED" in e["message"]
        for e in events["items"]
    ), events["items"]
    table = conveyor(sandbox, "get", "apps", "--scope", scope, "-o", "json")
    assert cause in table.stdout and '\\"apiVersion' not in table.stdout

    # A template that fails on a value names the key as the template reads it.
    repo.write(f"{env_path}/api.yaml", good.replace("replicaCount: 1", "service: null"))
    repo.commit("no service block")
    line = 1 + (repo.work / env_path / "api.yaml").read_text().splitlines().index(
        "    service: null"
    )
    code, report = reconcile_json(sandbox, repo, env_path, "--timeout", "8")
    assert code == 1
    message = by_name(report)["api"]["message"]
    assert message.startswith("template: service/templates/service.yaml:1:"), message
    assert "at <.Values.service.enabled>: nil pointer" in message
    assert (
        "nil pointer evaluating interface {}.enabled "
        f"(values: service in {env_path}/api.yaml:{line}); rolled back to Helm revision 1"
        in message
    )


def test_an_object_of_a_kind_the_cluster_does_not_serve_names_its_file_and_line(
    sandbox: SandboxHandle, repo: ConfigRepo, env_path: str, namespace: str
) -> None:
    widget = f"""
apiVersion: example.com/v1
kind: Widget
metadata: {{name: gadget, namespace: {namespace}}}
spec: {{size: 1}}
"""
    repo.write(f"{env_path}/web/deploy.yaml", deployment("web", namespace) + "---" + widget)
    repo.commit()
    line = 1 + (repo.work / env_path / "web" / "deploy.yaml").read_text().splitlines().index(
        "apiVersion: example.com/v1"
    )
    cause = (
        f"{env_path}/web/deploy.yaml:{line}: "
        "the cluster does not serve kind Widget in example.com/v1"
    )
    code, report = reconcile_json(sandbox, repo, env_path)
    assert code == 1
    assert by_name(report)["web"]["message"] == cause
    scope = env_path.replace("/", "-")
    status = kubectl_json(sandbox, "get", "conveyorapp", f"{scope}.web", "-n", "conveyor-system")
    assert status is not None and status["status"]["message"] == cause
    diff = conveyor(sandbox, "diff", "--repo", repo.url, "--path", env_path)
    assert diff.returncode == 2
    assert f"# web: error: {cause}" in " ".join(diff.stdout.split()), diff.stdout


def test_a_broken_conveyor_yaml_is_named_as_in_the_repository(
    sandbox: SandboxHandle, repo: ConfigRepo, namespace: str
) -> None:
    """The pass reads a clone in conveyor's cache; its path is no help to anyone."""
    repo.write(
        "conveyor.yaml",
        f"""
        environments:
          - name: {namespace}
            path: {namespace}
            gates: [{{type: soak, duration: forever}}]
        """,
    )
    repo.write(f"{namespace}/web/deploy.yaml", deployment("web", namespace))
    repo.commit()
    result = conveyor(sandbox, "reconcile", "--repo", f"file://{repo.url}", "--env", namespace)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert " conveyor.yaml:4: environments[0].gates[0].duration: expected a duration" in output
    assert "/conveyor.yaml" not in output, output
