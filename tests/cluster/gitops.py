"""Helpers for end-to-end tests: a real config repo (bare repo on disk) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import yaml

from conveyor.cluster.ownership import OWNER_LABEL
from conveyor.cluster.shards import (
    APPS_ANNOTATION,
    PASS_ANNOTATION,
    SHARDS_LABEL,
    shard_lease_name,
)
from conveyor.source.git import run_git
from tests.conftest import ROOT, SandboxHandle

T = TypeVar("T")
CHART = ROOT / "examples" / "charts" / "service"


class ConfigRepo:
    """A bare repository plus a working clone to commit into."""

    def __init__(self, root: Path, *, branch: str = "main") -> None:
        self.bare = root / "config.git"
        self.work = root / "config"
        self.branch = branch
        run_git(["init", "--quiet", "--bare", "--initial-branch", branch, str(self.bare)])
        run_git(["init", "--quiet", "--initial-branch", branch, str(self.work)])
        run_git(["remote", "add", "origin", str(self.bare)], cwd=self.work)

    @property
    def url(self) -> str:
        return str(self.bare)

    def write(self, path: str, text: str) -> None:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).lstrip())

    def remove(self, path: str) -> None:
        run_git(["rm", "-r", "--quiet", path], cwd=self.work)

    def commit(self, message: str = "change") -> str:
        run_git(["add", "--all"], cwd=self.work)
        run_git(
            [
                "-c",
                "user.name=test",
                "-c",
                "user.email=t@t",
                "commit",
                "--quiet",
                "--allow-empty",
                "-m",
                message,
            ],
            cwd=self.work,
        )
        run_git(["push", "--quiet", "origin", f"HEAD:{self.branch}"], cwd=self.work)
        return run_git(["rev-parse", "HEAD"], cwd=self.work).strip()


def chart_repo(
    root: Path, *, chart: Path = CHART, extra_templates: Mapping[str, str] | None = None
) -> str:
    """A git repository holding `chart` (the example chart by default) at the folder of
    its name, `service` for the example (Flux v1 `chart.git`), with `extra_templates`
    (file name → text) added to its templates/."""
    bare = root / "charts.git"
    work = root / "charts"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "master", str(bare)])
    run_git(["init", "--quiet", "--initial-branch", "master", str(work)])
    subprocess.run(["cp", "-r", str(chart), str(work / chart.name)], check=True)
    for name, text in (extra_templates or {}).items():
        (work / chart.name / "templates" / name).write_text(text)
    run_git(["add", "--all"], cwd=work)
    run_git(
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "chart"], cwd=work
    )
    run_git(["push", "--quiet", str(bare), "HEAD:master"], cwd=work)
    return f"file://{bare}"


def conveyor(
    sandbox: SandboxHandle, *args: str, check: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env=sandbox.env,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def reconcile_json(
    sandbox: SandboxHandle, repo: ConfigRepo, path: str, *extra: str
) -> tuple[int, dict[str, Any]]:
    result = conveyor(
        sandbox, "reconcile", "--repo", repo.url, "--path", path, "-o", "json", *extra
    )
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"no JSON from reconcile (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        ) from None


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in report["items"]}


def kubectl_json(sandbox: SandboxHandle, *args: str) -> dict[str, Any] | None:
    result = sandbox.run("kubectl", *args, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def conveyor_apps(sandbox: SandboxHandle, scope: str) -> list[dict[str, Any]]:
    """The ConveyorApp objects of an environment's scope (its apps and its source)."""
    listing = kubectl_json(
        sandbox, "get", "conveyorapps", "-n", "conveyor-system", "-l", f"conveyor.dev/scope={scope}"
    )
    items: list[dict[str, Any]] = (listing or {}).get("items", [])
    return items


def hold_lease(
    sandbox: SandboxHandle, scope: str, holder: str, *, duration: int, renewed_ago: float = 0
) -> None:
    """Make the environment's Lease (it must exist) look held by `holder`, renewed
    `renewed_ago` seconds ago, for `duration` seconds: another writer, live or stale."""
    lease = kubectl_json(sandbox, "get", "lease", f"conveyor-{scope}", "-n", "conveyor-system")
    assert lease is not None, f"no lease for {scope}"
    renewed = datetime.now(UTC) - timedelta(seconds=renewed_ago)
    at = renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease["spec"] = {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration,
        "acquireTime": at,
        "renewTime": at,
        "leaseTransitions": 1,
    }
    sandbox.run("kubectl", "replace", "-f", "-", input=json.dumps(lease))


def write_configmap_apps(
    repo: ConfigRepo, folder: str, namespace: str, *, count: int, version: str
) -> None:
    """`count` apps `c0`, `c1`... in `folder`, each one ConfigMap saying `version`: the
    cheapest apps to apply, for tests of who applies them."""
    for i in range(count):
        repo.write(
            f"{folder}/c{i}/app.yaml",
            f"""
            apiVersion: v1
            kind: ConfigMap
            metadata: {{name: c{i}, namespace: {namespace}}}
            data: {{version: "{version}"}}
            """,
        )


def shard_lease(
    sandbox: SandboxHandle,
    scope: str,
    holder: str,
    *,
    apps: int,
    pass_seconds: float,
    renewed_ago: float = 0,
    duration: int = 600,
) -> None:
    """A shard Lease of the environment with `scope`, held by `holder` with the load a
    shard publishes, renewed `renewed_ago` seconds ago: a shard for the readers (`get
    apps`, the dashboard) without an agent. Delete them with `delete_shard_leases`."""
    renewed = (datetime.now(UTC) - timedelta(seconds=renewed_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": shard_lease_name(scope, holder),
            "namespace": "conveyor-system",
            "labels": {SHARDS_LABEL: environment_id(sandbox, scope)},
            "annotations": {APPS_ANNOTATION: str(apps), PASS_ANNOTATION: f"{pass_seconds:.3f}"},
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "acquireTime": renewed,
            "renewTime": renewed,
        },
    }
    sandbox.run("kubectl", "apply", "-f", "-", input=json.dumps(lease))


def delete_shard_leases(sandbox: SandboxHandle, scope: str) -> None:
    selector = f"{SHARDS_LABEL}={environment_id(sandbox, scope)}"
    sandbox.run("kubectl", "delete", "lease", "-n", "conveyor-system", "-l", selector)


def environment_id(sandbox: SandboxHandle, scope: str) -> str:
    """The id of the environment with `scope`, from its source status."""
    source = kubectl_json(sandbox, "get", "conveyorapp", scope, "-n", "conveyor-system")
    assert source is not None, f"no source status for {scope}"
    return str(source["metadata"]["labels"][OWNER_LABEL])


def wait_for(check: Callable[[], T], *, timeout: float = 60.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def deployment(
    name: str,
    namespace: str,
    *,
    replicas: int = 1,
    image: str = "web:1",
    registry: str = "registry.local",
    setter: str | None = None,
) -> str:
    """A Deployment of `registry/image`, with a Flux v2 setter comment `NS:POLICY` on it."""
    comment = f' # {{"$imagepolicy": "{setter}"}}' if setter else ""
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {namespace}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: main
          image: {registry}/{image}{comment}
"""


def flux_v1_release(
    name: str,
    namespace: str,
    chart_git: str,
    *,
    tag: str = "1.0.0",
    replicas: int = 1,
    timeout: int = 60,
) -> str:
    return f"""
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: {name}
  namespace: {namespace}
  annotations:
    fluxcd.io/automated: "true"
    filter.fluxcd.io/chart-image: semver:>=0.0.0
spec:
  releaseName: {name}
  timeout: {timeout}
  chart:
    git: {chart_git}
    path: service
    ref: master
  values:
    replicaCount: {replicas}
    image:
      repository: registry.local/{name}
      tag: "{tag}" # filled in by CI. do not modify.
"""


def flux_kustomization(name: str, path: str | None, **spec: Any) -> str:
    """A Flux Kustomization of `path` in this repository (`GitRepository/flux-system`),
    in flux-system, with `spec` added to its spec (camelCase, as in a file)."""
    body: dict[str, Any] = {
        "interval": "10m",
        "prune": True,
        "sourceRef": {"kind": "GitRepository", "name": "flux-system"},
        **spec,
    }
    if path is not None:
        body["path"] = path
    return yaml.safe_dump(
        {
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
            "kind": "Kustomization",
            "metadata": {"name": name, "namespace": "flux-system"},
            "spec": body,
        }
    )
