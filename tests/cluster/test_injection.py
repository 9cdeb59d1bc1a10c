"""No command runs because of what a config repo says, through the real entry points and
the real helm (issue #10, part 2). The unit tests (tests/unit/test_injection.py) cover
each git call and each check; these run `conveyor reconcile` and `conveyor diff
--base/--head` on a config repo with the issue's two payloads, and measure helm's own
handling of `--`, the second line of defence behind the checks.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest

from conveyor.render.helm import HelmCLI, HelmError
from tests.cluster.gitops import (
    CHART,
    ConfigRepo,
    by_name,
    chart_repo,
    conveyor,
    deployment,
    flux_v1_release,
    reconcile_json,
)
from tests.cluster.test_agent import AgentProcess, agents  # noqa: F401 (a fixture)
from tests.conftest import SandboxHandle
from tests.unit.test_injection import hostile_script, upload_pack

pytestmark = pytest.mark.cluster


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def hostile_releases(
    env: str, namespace: str, charts: str, marker: Path, script: Path
) -> dict[str, str]:
    """The issue's two payloads as files of a config repo: a Flux v1 chart `ref` that
    `git fetch` would take as `--upload-pack`, and a `releaseName` that `helm template`
    would take as `--post-renderer`."""
    return {
        f"{env}/api.yaml": flux_v1_release("api", namespace, charts).replace(
            "ref: master", f'ref: "{upload_pack(marker)}"'
        ),
        f"{env}/worker.yaml": flux_v1_release("worker", namespace, charts).replace(
            "releaseName: worker", f'releaseName: "--post-renderer={script}"'
        ),
    }


def test_reconcile_stalls_only_the_hostile_apps_and_runs_nothing(
    sandbox: SandboxHandle, tmp_path: Path, namespace: str, marker: Path
) -> None:
    repo = ConfigRepo(tmp_path)
    charts = chart_repo(tmp_path)
    env = f"envs/e{uuid.uuid4().hex[:8]}"
    script = hostile_script(tmp_path, marker)
    repo.write(f"{env}/web/deploy.yaml", deployment("web", namespace))
    repo.write(f"{env}/ui.yaml", flux_v1_release("ui", namespace, charts))
    for path, text in hostile_releases(env, namespace, charts, marker, script).items():
        repo.write(path, text)
    repo.commit("two hostile releases among good apps")

    code, report = reconcile_json(sandbox, repo, env)

    assert code == 1
    apps = by_name(report)
    assert apps["web"]["ready"] and apps["ui"]["ready"], apps
    api = apps["api"]
    assert api["state"] == "Stalled" and api["reason"] == "RenderFailed"
    assert (
        f"{env}/api.yaml:1: spec.chart.ref: expected a value that does not start" in api["message"]
    )
    (worker,) = [a for a in report["items"] if f"{env}/worker.yaml" in (a["message"] or "")]
    assert worker["state"] == "Stalled" and worker["reason"] == "RenderFailed"
    assert (
        f"{env}/worker.yaml:1: spec.releaseName: expected a value that does not"
        in worker["message"]
    )
    assert report["pruned"] == []
    assert not marker.exists()
    releases = sandbox.run("helm", "list", "-n", namespace, "-q").stdout.split()
    assert releases == ["ui"]


def test_agent_applies_the_good_apps_and_runs_nothing_for_the_hostile_ones(
    sandbox: SandboxHandle,
    tmp_path: Path,
    namespace: str,
    marker: Path,
    agents: list[AgentProcess],  # noqa: F811 (the fixture)
) -> None:
    repo = ConfigRepo(tmp_path)
    charts = chart_repo(tmp_path)
    env = f"envs/e{uuid.uuid4().hex[:8]}"
    script = hostile_script(tmp_path, marker)
    repo.write(f"{env}/web/deploy.yaml", deployment("web", namespace))
    repo.write(f"{env}/ui.yaml", flux_v1_release("ui", namespace, charts))
    for path, text in hostile_releases(env, namespace, charts, marker, script).items():
        repo.write(path, text)
    repo.commit("two hostile releases among good apps")

    agent = AgentProcess(sandbox, repo, env, tmp_path, "--interval", "600s")
    agents.append(agent)
    agent.wait_ready()

    assert agent.process.poll() is None  # still serving
    assert sandbox.run("helm", "list", "-n", namespace, "-q").stdout.split() == ["ui"]
    assert sandbox.run("kubectl", "get", "deployment", "web", "-n", namespace).returncode == 0
    log = agent.log.read_text()
    assert f"{env}/api.yaml:1: chart ref" in log, log
    assert f"{env}/worker.yaml:1: spec.releaseName" in log, log
    assert not marker.exists()


def test_diff_of_a_pull_request_with_hostile_releases_runs_nothing(
    sandbox: SandboxHandle, tmp_path: Path, marker: Path
) -> None:
    """`conveyor diff --base/--head`, as CI runs it on a pull request's head."""
    repo = ConfigRepo(tmp_path)
    charts = chart_repo(tmp_path)
    env = "prod"
    script = hostile_script(tmp_path, marker)
    repo.write(f"{env}/ui.yaml", flux_v1_release("ui", "apps", charts))
    base = repo.commit("base")
    repo.write(f"{env}/ui.yaml", flux_v1_release("ui", "apps", charts, replicas=3))
    for path, text in hostile_releases(env, "apps", charts, marker, script).items():
        repo.write(path, text)
    head = repo.commit("pull request")

    outfile = tmp_path / "diff.txt"  # the text unwrapped, as CI posts it
    result = conveyor(
        sandbox,
        *("diff", "--repo", str(repo.work), "--base", base, "--head", head, "--path", env),
        *("--outfile", str(outfile)),
    )

    assert result.returncode == 2, result.stdout + result.stderr
    text = outfile.read_text()
    assert f"{env}/api.yaml:1: spec.chart.ref: expected a value that does not start" in text
    assert f"{env}/worker.yaml:1: spec.releaseName: expected a value that does not" in text
    assert "replicas: 3" in text  # the good release was rendered by helm
    assert not marker.exists()


def test_helm_takes_nothing_after_double_dash_as_an_option(
    sandbox: SandboxHandle, tmp_path: Path, marker: Path
) -> None:
    """Measured on the real helm: without `--` the issue's release name runs the
    post-renderer; HelmCLI puts positional values after `--`, where helm refuses it as
    a name. HelmCLI's own checks stop it before that; this is the layer behind them."""
    binary = shutil.which("helm", path=sandbox.env["PATH"])
    assert binary is not None
    script = hostile_script(tmp_path, marker)
    hostile = f"--post-renderer={script}"

    sandbox.run("helm", "template", hostile, str(CHART))
    assert marker.exists()  # what `--` is there to stop
    marker.unlink()

    helm = HelmCLI(binary=binary, kubeconfig=str(sandbox.kubeconfig))
    for args in (("template",), ("upgrade", "--install", "--namespace=default")):
        with pytest.raises(HelmError):
            asyncio.run(helm.run(*args, positional=[hostile, str(CHART)], kube=False))
    assert not marker.exists()


def test_every_helm_call_works_with_values_after_double_dash(
    sandbox: SandboxHandle, tmp_path: Path, namespace: str
) -> None:
    """The calls HelmCLI makes, in helm's argument order, against the sandbox: install,
    status, history, manifest, template, upgrade, rollback, dependency build, uninstall."""
    binary = shutil.which("helm", path=sandbox.env["PATH"])
    assert binary is not None
    helm = HelmCLI(binary=binary, kubeconfig=str(sandbox.kubeconfig))
    chart = tmp_path / "service"
    shutil.copytree(CHART, chart)

    async def story() -> None:
        await helm.dependency_build(chart)
        installed = await helm.upgrade_install("svc", namespace, str(chart), {}, timeout=60)
        assert installed["version"] == 1
        await helm.upgrade_install(
            "svc", namespace, str(chart), {"replicaCount": 2}, timeout=60, description="two"
        )
        status = await helm.status("svc", namespace)
        assert status is not None and status["version"] == 2
        assert [h["revision"] for h in await helm.history("svc", namespace)] == [1, 2]
        assert "kind: Deployment" in await helm.manifest("svc", namespace)
        assert "kind: Deployment" in await helm.template("svc", namespace, str(chart), {})
        await helm.rollback("svc", namespace, 1, timeout=60)
        assert [h["revision"] for h in await helm.history("svc", namespace)] == [1, 2, 3]
        await helm.uninstall("svc", namespace)
        assert await helm.status("svc", namespace) is None

    asyncio.run(story())
