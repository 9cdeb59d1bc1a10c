"""A bad file stalls only its app: `conveyor reconcile` on the sandbox with three apps, one
of which gets one of issue #10's reproducers (the fuzzing found the same kinds of file).

The other two apps still reach the cluster and are Ready, the broken one is Stalled with
the file, line and field, the exit code says something failed, and nothing is pruned:
the broken app's objects stay as last applied.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.gitops import (
    ConfigRepo,
    by_name,
    chart_repo,
    deployment,
    flux_v1_release,
    kubectl_json,
    reconcile_json,
)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


def queue_file(namespace: str, body: str) -> str:
    return f"apiVersion: v1\nmetadata: {{name: queue-extra, namespace: {namespace}}}\n{body}"


# case → (app it breaks, file below the environment, its text from the namespace and the
# chart repository, what the message says)
BROKEN: dict[str, tuple[str, str, Callable[[str, str], str], str]] = {
    "annotations-list": (
        "queue",
        "queue/extra.yaml",
        lambda ns, charts: queue_file(ns, "kind: ConfigMap\n").replace(
            "namespace: ", "annotations: [x], namespace: "
        ),
        "queue/extra.yaml:1: metadata.annotations: expected a mapping, got a list",
    ),
    "secret-data-date": (
        "queue",
        "queue/extra.yaml",
        lambda ns, charts: queue_file(ns, "kind: Secret\ndata: 2024-01-01\n"),
        "queue/extra.yaml:1: data: expected a mapping, got a date",
    ),
    "v1-timeout-duration": (
        "ui",
        "ui.yaml",
        lambda ns, charts: flux_v1_release("ui", ns, charts).replace("timeout: 60", "timeout: 5m"),
        "ui.yaml:1: spec.timeout: expected seconds, got '5m'",
    ),
    "chart-ref-nul": (
        "ui",
        "ui.yaml",
        lambda ns, charts: flux_v1_release("ui", ns, charts).replace(
            "ref: master", 'ref: "mas\\0ter"'
        ),
        "ui.yaml:1: spec.chart.ref: expected text without control characters",
    ),
}


def live_replicas(sandbox: SandboxHandle, namespace: str, name: str) -> int | None:
    live = kubectl_json(sandbox, "get", "deployment", name, "-n", namespace)
    return None if live is None else int(live["spec"]["replicas"])


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_bad_file_stalls_only_its_app_and_prunes_nothing(
    case: str, sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    app, relative, text, message = BROKEN[case]
    env = f"envs/e{uuid.uuid4().hex[:8]}"
    charts = chart_repo(tmp_path)
    repo = ConfigRepo(tmp_path / "config")
    repo.write(f"{env}/web/deploy.yaml", deployment("web", namespace))
    repo.write(f"{env}/queue/deploy.yaml", deployment("queue", namespace))
    repo.write(f"{env}/ui.yaml", flux_v1_release("ui", namespace, charts))
    repo.commit("three apps")
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 0, report
    assert all(item["ready"] for item in report["items"]), report

    repo.write(f"{env}/{relative}", text(namespace, charts))
    repo.write(f"{env}/web/deploy.yaml", deployment("web", namespace, replicas=2))
    repo.commit(f"break {app}: {case}")
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 1, report
    apps = by_name(report)
    assert set(apps) == {"web", "queue", "ui"}
    broken = apps.pop(app)
    assert broken["state"] == "Stalled" and broken["reason"] == "RenderFailed"
    assert f"{env}/{message}" in broken["message"]
    assert all(item["ready"] for item in apps.values()), apps
    assert live_replicas(sandbox, namespace, "web") == 2  # the others were applied
    assert report["pruned"] == []
    assert live_replicas(sandbox, namespace, "queue") == 1  # as last applied
    assert live_replicas(sandbox, namespace, "ui") == 1
    releases = sandbox.run("helm", "list", "-n", namespace, "-q").stdout.split()
    assert releases == ["ui"]
