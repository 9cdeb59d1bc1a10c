"""Promotion between two real clusters (sandboxes "staging" and "production"): versions
copied with each environment's settings intact, gates on SQS (moto's server), approvals,
soak and health, the agent holding a gated revision, candidate branches, rollback, pull
request diffs, and cal-itp release channels."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.sandbox import Sandbox
from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, chart_repo, flux_v1_release, wait_for
from tests.conftest import ROOT, SandboxHandle
from tests.queues import CREDENTIALS, Sqs, sqs_fixture  # noqa: F401 -- the fixture

pytestmark = pytest.mark.cluster
QUEUE = "sqs_studioml_gorunner_cpu_production_0"


def _handle(name: str) -> tuple[SandboxHandle, bool]:
    box = Sandbox(name, progress=lambda m: print(f"[{name}] {m}", flush=True))
    was_running = box.status().ready
    state = box.up()
    env = dict(os.environ)
    env["KUBECONFIG"] = str(box.kubeconfig)
    env["PATH"] = f"{state.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    for kind in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{kind}_HOME"] = str(box.layout.root / f"helm-{kind.lower()}")
    return SandboxHandle(box, env, box.registry()), was_running


@dataclass
class Clusters:
    staging: SandboxHandle
    production: SandboxHandle

    def env(self) -> dict[str, str]:
        """For conveyor: the tools on PATH and a $KUBECONFIG of a third cluster, so that
        every command proves it goes to the cluster conveyor.yaml names, not $KUBECONFIG."""
        return {**self.staging.env, "KUBECONFIG": str(self.decoy), **CREDENTIALS}

    @property
    def decoy(self) -> Path:
        """A kubeconfig of a cluster that is not there (port 9 on loopback)."""
        path = self.staging.sandbox.layout.root / "decoy-kubeconfig"
        config = self.staging.sandbox.kubeconfig.read_text()
        path.write_text(re.sub(r"https://127\.0\.0\.1:\d+", "https://127.0.0.1:9", config))
        return path


@pytest.fixture(scope="session")
def clusters() -> Iterator[Clusters]:
    staging, staging_was_running = _handle("staging")
    production, production_was_running = _handle("production")
    yield Clusters(staging, production)
    if not os.environ.get("CONVEYOR_KEEP_SANDBOX"):
        for handle, was_running in (
            (staging, staging_was_running),
            (production, production_was_running),
        ):
            if not was_running:
                handle.sandbox.down()


class Pipeline:
    """A config repo with a staging and a production environment (unique names, so tests
    never share statuses or namespaces), each on its own cluster."""

    def __init__(self, clusters: Clusters, root: Path) -> None:
        self.clusters = clusters
        self.repo = ConfigRepo(root)
        self.charts = chart_repo(root)
        self.id = uuid.uuid4().hex[:6]
        self.staging, self.production = f"staging-{self.id}", f"production-{self.id}"
        self.namespace = {
            self.staging: f"ui-{self.id}-staging",
            self.production: f"ui-{self.id}-prod",
        }
        self.sandbox = {self.staging: clusters.staging, self.production: clusters.production}

    def project(self, *, production_gates: Sequence[dict[str, Any]] = ()) -> str:
        return yaml.safe_dump(
            {
                "environments": [
                    {
                        "name": self.staging,
                        "path": "staging",
                        "cluster": {"kubeconfig": str(self.clusters.staging.kubeconfig)},
                    },
                    {
                        "name": self.production,
                        "path": "production",
                        "cluster": {"kubeconfig": str(self.clusters.production.kubeconfig)},
                        "gates": list(production_gates),
                    },
                ]
            }
        )

    def release(self, env: str, *, tag: str, replicas: int) -> str:
        return flux_v1_release("ui", self.namespace[env], self.charts, tag=tag, replicas=replicas)

    def setup(
        self,
        *,
        staging: str = "1.1.0",
        production: str = "1.0.0",
        gates: Sequence[dict[str, Any]] = (),
    ) -> str:
        self.repo.write("conveyor.yaml", self.project(production_gates=gates))
        self.repo.write("staging/ui.yaml", self.release(self.staging, tag=staging, replicas=1))
        self.repo.write(
            "production/ui.yaml", self.release(self.production, tag=production, replicas=3)
        )
        return self.repo.commit("staging and production")

    def conveyor(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            env=self.clusters.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def promote(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """`conveyor promote` from staging to production, with `extra` options."""
        return self.conveyor(
            "promote",
            "--repo",
            self.repo.url,
            "--from",
            self.staging,
            "--to",
            self.production,
            *extra,
        )

    def reconcile(self, env: str) -> dict[str, Any]:
        result = self.conveyor("reconcile", "--repo", self.repo.url, "--env", env, "-o", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def deployment(self, env: str) -> dict[str, Any] | None:
        result = self.sandbox[env].run(
            "kubectl",
            "get",
            "deployment",
            "ui",
            "-n",
            self.namespace[env],
            "-o",
            "json",
            check=False,
        )
        return json.loads(result.stdout) if result.returncode == 0 else None

    def image(self, env: str) -> str | None:
        live = self.deployment(env)
        return (
            None
            if live is None
            else str(live["spec"]["template"]["spec"]["containers"][0]["image"])
        )

    def status(self, env: str, app: str = "ui") -> dict[str, Any]:
        result = self.sandbox[env].run(
            "kubectl",
            "get",
            "conveyorapp",
            f"{env}.{app}",
            "-n",
            "conveyor-system",
            "-o",
            "json",
            check=False,
        )
        return json.loads(result.stdout).get("status", {}) if result.returncode == 0 else {}

    def head(self) -> str:
        return run_git(["--git-dir", self.repo.url, "rev-parse", "main"]).strip()

    def production_file(self) -> str:
        return run_git(["--git-dir", self.repo.url, "show", "main:production/ui.yaml"])


@pytest.fixture
def pipeline(clusters: Clusters, tmp_path: Path) -> Pipeline:
    return Pipeline(clusters, tmp_path)


def queue_gate(sqs: Sqs, **extra: Any) -> dict[str, Any]:
    return {
        "type": "queue-empty",
        "queues": [QUEUE],
        "regions": ["us-west-2", "us-east-2"],
        "endpoint-url": sqs.endpoint,
        **extra,
    }


def test_a_version_promoted_from_staging_reaches_production_with_its_own_settings(
    pipeline: Pipeline,
) -> None:
    pipeline.setup()
    pipeline.reconcile(pipeline.staging)
    pipeline.reconcile(pipeline.production)
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"
    started = time.monotonic()
    result = pipeline.promote("--apply")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"promote + apply in production: {seconds:.1f}s")
    live = pipeline.deployment(pipeline.production)
    assert live is not None
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/ui:1.1.0"
    assert live["spec"]["replicas"] == 3  # production's, not staging's 1
    assert live["metadata"]["namespace"] == pipeline.namespace[pipeline.production]
    assert pipeline.deployment(pipeline.staging)["spec"]["replicas"] == 1  # type: ignore[index]
    # Nothing of production's ended up on the staging cluster, nor the reverse.
    assert (
        pipeline.clusters.staging.run(
            "kubectl", "get", "namespace", pipeline.namespace[pipeline.production], check=False
        ).returncode
        != 0
    )
    written = pipeline.production_file()
    assert 'tag: "1.1.0" # filled in by CI. do not modify.' in written
    assert "replicaCount: 3" in written and f"namespace: {live['metadata']['namespace']}" in written
    assert "filter.fluxcd.io/chart-image: semver:>=0.0.0" in written
    assert pipeline.status(pipeline.production)["state"] == "Ready"


def test_the_queue_gate_holds_the_promotion_until_a_consumer_drains_it(
    pipeline: Pipeline, sqs: Sqs
) -> None:
    sqs.create(QUEUE, "us-west-2", "us-east-2")
    pipeline.setup(gates=[queue_gate(sqs, timeout="2m", interval="1s")])
    pipeline.reconcile(pipeline.production)
    sqs.send("us-east-2", QUEUE, 2)
    running = sqs.take("us-east-2", QUEUE)  # a job is running: its message is in flight
    sqs.send("us-east-2", QUEUE, 1)
    before = pipeline.head()
    timed_out = pipeline.promote("--gate-timeout", "3s", "--apply")
    assert timed_out.returncode == 1, timed_out.stdout + timed_out.stderr
    message = " ".join(timed_out.stderr.split())
    assert f"gate queue-empty closed: queue {QUEUE} in us-east-2 has 3 messages" in message
    assert "(1 waiting, 2 in flight, 0 delayed); nothing was written" in message
    assert pipeline.head() == before
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"
    consumer = sqs.drain_later("us-east-2", QUEUE, after=4.0, running=tuple(running))
    started = time.monotonic()
    result = pipeline.promote("--apply")
    waited = time.monotonic() - started
    consumer.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert waited >= 4.0
    print(f"promotion waited {waited:.1f}s for the queue (drained after 4.0s) and applied")
    assert pipeline.head() != before
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.1.0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def agent_logs(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_the_agent_holds_a_gated_revision_and_applies_it_when_the_gate_opens(
    pipeline: Pipeline, sqs: Sqs, tmp_path: Path, agent_logs: list[subprocess.Popen[bytes]]
) -> None:
    sqs.create(QUEUE, "us-west-2", "us-east-2")
    pipeline.setup(gates=[queue_gate(sqs, interval="1s")])
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "agent",
            "--repo",
            pipeline.repo.url,
            "--env",
            pipeline.production,
            "--interval",
            "1s",
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        env=pipeline.clusters.env(),
        stdout=log.open("w"),  # the agent logs on stdout
        stderr=subprocess.STDOUT,
    )
    agent_logs.append(agent)
    wait_for(
        lambda: pipeline.status(pipeline.production).get("state") == "Ready",
        timeout=120,
        what=f"first apply; log: {log}",
    )
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"
    sqs.send("us-west-2", QUEUE, 1)
    running = sqs.take("us-west-2", QUEUE)  # a job started: one message in flight
    pipeline.repo.write(
        "production/ui.yaml", pipeline.release(pipeline.production, tag="1.2.0", replicas=3)
    )
    revision = pipeline.repo.commit("ui 1.2.0 to production (merged pull request)")
    status = wait_for(
        lambda: (s := pipeline.status(pipeline.production)).get("state") == "WaitingForGate" and s,
        timeout=60,
        what="WaitingForGate",
    )
    assert status["reason"] == "GateClosed"
    assert status["message"] == (
        f"revision {revision[:12]} waits for gate queue-empty: queue {QUEUE} in us-west-2 has "
        "1 messages (0 waiting, 1 in flight, 0 delayed)"
    )
    time.sleep(3)  # several passes: still held, the cluster keeps what it ran
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"
    assert pipeline.status(pipeline.production)["state"] == "WaitingForGate"
    consumer = sqs.drain_later("us-west-2", QUEUE, after=0, running=tuple(running))
    consumer.join()
    drained = time.monotonic()
    wait_for(
        lambda: pipeline.image(pipeline.production) == "registry.local/ui:1.2.0",
        timeout=60,
        what="the held revision applied",
    )
    wait_for(lambda: pipeline.status(pipeline.production).get("state") == "Ready", timeout=60)
    print(
        f"agent applied the held revision {time.monotonic() - drained:.1f}s after the queue drained"
    )
    assert pipeline.status(pipeline.production)["lastAppliedRevision"] == revision
    assert agent.poll() is None, log.read_text()


def test_branch_mode_writes_a_candidate_branch_with_the_rendered_diff(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.setup()
    pipeline.reconcile(pipeline.production)
    before = pipeline.head()
    diff = tmp_path / "diff.md"
    result = pipeline.promote(
        "--mode",
        "branch",
        "--outfile",
        str(diff),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert pipeline.head() == before
    branch = f"candidates/{pipeline.production}-all-1.1.0"
    candidate = run_git(["--git-dir", pipeline.repo.url, "show", f"{branch}:production/ui.yaml"])
    assert 'tag: "1.1.0" # filled in by CI. do not modify.' in candidate
    assert "replicaCount: 3" in candidate
    text = diff.read_text()
    namespace = pipeline.namespace[pipeline.production]
    # The chart labels its objects with the version: both change, nothing else does.
    assert f"### ui\n\nupdate Service {namespace}/ui, update Deployment {namespace}/ui\n" in text
    assert (
        "-      - image: registry.local/ui:1.0.0\n+      - image: registry.local/ui:1.1.0\n" in text
    )
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"  # review first


def test_rollback_restores_the_previous_version_in_git_and_the_cluster(pipeline: Pipeline) -> None:
    pipeline.setup()
    pipeline.reconcile(pipeline.production)
    promote = pipeline.promote("--apply")
    assert promote.returncode == 0, promote.stdout + promote.stderr
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.1.0"
    started = time.monotonic()
    result = pipeline.conveyor(
        "rollback",
        "--repo",
        pipeline.repo.url,
        "--env",
        pipeline.production,
        "--app",
        "ui",
        "-o",
        "json",
    )
    print(f"rollback (commit + apply): {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["from"], report["to"]) == ("1.1.0", "1.0.0")
    assert 'tag: "1.0.0" # filled in by CI. do not modify.' in pipeline.production_file()
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"
    history = json.loads(
        pipeline.clusters.production.run(
            "helm", "history", "ui", "-n", pipeline.namespace[pipeline.production], "-o", "json"
        ).stdout
    )
    assert [h["status"] for h in history][-1] == "deployed" and len(history) == 3
    # Git and the cluster agree: the next pass changes nothing and keeps the rollback.
    again = pipeline.reconcile(pipeline.production)
    assert again["writes"] == 0
    assert pipeline.image(pipeline.production) == "registry.local/ui:1.0.0"


def test_approval_soak_and_healthy_gates(pipeline: Pipeline) -> None:
    gates = [
        {"type": "healthy"},
        {"type": "soak", "duration": "6s"},
        {"type": "approval"},
    ]
    pipeline.setup(gates=gates)
    pipeline.reconcile(pipeline.staging)
    applied = time.monotonic()

    def check(version: str) -> dict[str, dict[str, Any]]:
        result = pipeline.conveyor(
            "gate",
            "check",
            "--repo",
            pipeline.repo.url,
            "--env",
            pipeline.production,
            "--version",
            version,
            "-o",
            "json",
        )
        assert result.returncode in (0, 1), result.stderr
        return {g["type"]: g for g in json.loads(result.stdout)["gates"]}

    gates_now = check("1.1.0")
    assert gates_now["healthy"] == {
        "gate": "healthy",
        "type": "healthy",
        "state": "open",
        "message": f"{pipeline.staging}: 1 apps Ready",
    }
    assert gates_now["soak"]["state"] == "closed"
    assert re.fullmatch(
        rf"ui 1\.1\.0 Ready in {pipeline.staging} for \d+s of 6s", gates_now["soak"]["message"]
    )
    assert gates_now["approval"]["state"] == "closed"
    assert (
        check("9.9.9")["soak"]["message"]
        == f"ui 9.9.9 is not applied in {pipeline.staging} (has 1.1.0)"
    )
    approve = pipeline.conveyor(
        "approve",
        "--repo",
        pipeline.repo.url,
        "--env",
        pipeline.production,
        "--version",
        "1.1.0",
        "--by",
        "qa-lead",
    )
    assert approve.returncode == 0, approve.stderr
    time.sleep(max(0.0, 7.5 - (time.monotonic() - applied)))
    gates_now = check("1.1.0")
    assert {t: g["state"] for t, g in gates_now.items()} == {
        "healthy": "open",
        "soak": "open",
        "approval": "open",
    }, gates_now
    # A broken app in staging closes the healthy gate, naming it.
    run_git(["pull", "--quiet", "--rebase", "origin", "main"], cwd=pipeline.repo.work)
    pipeline.repo.write("staging/broken.yaml", "kind: HelmRelease\nmetadata: [unclosed\n")
    pipeline.repo.commit("broken")
    result = pipeline.conveyor(
        "reconcile", "--repo", pipeline.repo.url, "--env", pipeline.staging, "-o", "json"
    )
    assert result.returncode == 1
    healthy = check("1.1.0")["healthy"]
    assert healthy["state"] == "closed"
    assert healthy["message"].startswith(f"{pipeline.staging}: broken is Stalled (RenderFailed)")
    promote = pipeline.promote()
    assert promote.returncode == 1 and "gate healthy closed" in promote.stderr


def test_pull_request_diff_of_a_helmrelease_values_change(pipeline: Pipeline) -> None:
    pipeline.setup()
    namespace = pipeline.namespace[pipeline.production]
    secret = (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n"
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ui-keys\n  namespace: {ns}\n"
        "stringData:\n  token: {value}\n"
    )
    pipeline.repo.write(
        "production/keys/secret.yaml", secret.format(ns=namespace, value="old-token-4521")
    )
    pipeline.repo.commit("keys")
    pipeline.reconcile(pipeline.production)
    work = pipeline.repo.work
    run_git(["checkout", "--quiet", "-b", "bigger"], cwd=work)
    release = pipeline.release(pipeline.production, tag="1.0.0", replicas=4)
    release = release.replace(
        "  values:\n",
        "  valuesFrom:\n    - configMapKeyRef:\n"
        f"        {{name: ui-tuning, namespace: {namespace}, key: values.yaml}}\n"
        "  values:\n",
    )
    pipeline.repo.write("production/ui.yaml", release)
    pipeline.repo.write(
        "production/keys/secret.yaml", secret.format(ns=namespace, value="new-token-9876")
    )
    run_git(["add", "--all"], cwd=work)
    run_git(
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "4 replicas"],
        cwd=work,
    )
    offline = pipeline.conveyor(
        "diff",
        "--repo",
        str(work),
        "--base",
        "main",
        "--head",
        "bigger",
        "--env",
        pipeline.production,
        "--format",
        "markdown",
    )
    assert offline.returncode == 1, offline.stdout + offline.stderr
    text = offline.stdout
    assert text.startswith(f"## conveyor diff: {pipeline.production}: main (")
    assert (
        f"### ui\n\n_Note:_ valuesFrom ConfigMap {namespace}/ui-tuning key 'values.yaml' is not "
        in text
    )
    assert f"update Deployment {namespace}/ui" in text
    assert "-  replicas: 3\n+  replicas: 4\n" in text
    assert f"### keys\n\nupdate Secret {namespace}/ui-keys" in text
    assert "-  token: '***'\n+  token: '*** (secret value changed)'\n" in text
    assert "token-4521" not in text and "token-9876" not in text
    # Against the cluster, valuesFrom is read from it: the ConfigMap's values show too.
    pipeline.clusters.production.run(
        "kubectl",
        "create",
        "configmap",
        "ui-tuning",
        "-n",
        namespace,
        "--from-literal=values.yaml=env: {TUNED: 'yes'}",
    )
    live = pipeline.conveyor(
        "diff",
        "--repo",
        str(work),
        "--head",
        "bigger",
        "--against",
        "live",
        "--env",
        pipeline.production,
    )
    assert live.returncode == 1, live.stdout + live.stderr
    assert "-  replicas: 3\n+  replicas: 4\n" in live.stdout
    assert "+        - name: TUNED\n+          value: 'yes'\n" in live.stdout
    assert "token: '*** (secret value changed)'" in live.stdout and "token-9876" not in live.stdout


def calitp_repo(root: Path, suffix: str) -> tuple[Path, Path]:
    """examples/calitp as a repository of its own, with namespaces unique to this test, and
    its secrets (kept outside git, as Secret Manager kept them)."""
    repo = root / "data-infra"
    shutil.copytree(
        ROOT / "examples" / "calitp", repo, ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in sorted(repo.rglob("*"), reverse=True):  # children before their folders
        renamed = path.name.replace("-test", f"-{suffix}")
        if path.is_file() and path.suffix == ".yaml":
            text = path.read_text().replace("metabase-test", f"metabase-{suffix}")
            path.write_text(text.replace("archiver-test", f"archiver-{suffix}"))
        if renamed != path.name:
            path.rename(path.with_name(renamed))
    run_git(["init", "--quiet", "--initial-branch", "main", str(repo)])
    run_git(["add", "--all"], cwd=repo)
    run_git(
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "channels"],
        cwd=repo,
    )
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / f"archiver-{suffix}_feed-secrets.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: feed-secrets\n"
        f"  namespace: archiver-{suffix}\nstringData:\n  MTC_511_API_KEY: key-0042\n"
    )
    (secrets / f"metabase-{suffix}_database.yaml").write_text("database:\n  password: pw-0042\n")
    return repo, secrets


def test_a_calitp_channel_releases_and_diffs_as_their_workflow_expects(
    clusters: Clusters, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    repo, secrets = calitp_repo(tmp_path, suffix)
    env = {**clusters.staging.env, "CONVEYOR_SECRETS_DIR": str(secrets)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )

    conveyor = [sys.executable, "-m", "conveyor"]
    first = run(*conveyor, "diff", "-f", "channels/test.yaml", "--outfile", "diff.md")
    assert first.returncode == 1, first.stderr
    comment = (repo / "diff.md").read_text().splitlines()
    assert comment[0] == "## conveyor diff for channel `test`"
    assert comment[1].startswith(
        "Compared with the live cluster `sandbox-staging` by server-side dry run"
    )
    assert comment[2:4] == ["", "```diff"] and comment[-1] == "```"
    body = "\n".join(comment)
    assert "# archiver: create Deployment" in body and "# metabase: create Deployment" in body
    assert body.index("# archiver:") < body.index("# metabase:")  # file order
    assert "MTC_511_API_KEY: '***'" in body and "key-0042" not in body and "pw-0042" not in body
    started = time.monotonic()
    released = run(sys.executable, "-m", "invoke", "release", "-f", "channels/test.yaml")
    print(f"invoke release of the channel: {time.monotonic() - started:.1f}s")
    assert released.returncode == 0, released.stdout + released.stderr
    assert (
        f"metabase: helm release metabase-{suffix}/metabase-{suffix} revision 1" in released.stdout
    )
    releases = json.loads(
        clusters.staging.run("helm", "list", "-n", f"metabase-{suffix}", "-o", "json").stdout
    )
    assert [(r["name"], r["status"]) for r in releases] == [(f"metabase-{suffix}", "deployed")]
    archiver = clusters.staging.run(
        "kubectl", "get", "deployment", "gtfs-rt-archiver", "-n", f"archiver-{suffix}", "-o", "json"
    )
    image = json.loads(archiver.stdout)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "ghcr.io/cal-itp/gtfs-rt-archiver:2024.03.1"
    second = run(*conveyor, "diff", "-f", "channels/test.yaml", "--outfile", "diff.md")
    assert second.returncode == 0, second.stderr
    assert (repo / "diff.md").read_text().splitlines()[2:] == ["", "No changes found for test."]
    (repo / f"kubernetes/apps/values/metabase-{suffix}.yaml").write_text("replicas: 2\n")
    invoked = run(
        sys.executable, "-m", "invoke", "diff", "-f", "channels/test.yaml", "--app", "metabase"
    )
    assert invoked.returncode == 0, invoked.stderr
    assert "-  replicas: 1\n+  replicas: 2\n" in invoked.stdout
    assert "# archiver" not in invoked.stdout
    bad = run(*conveyor, "release", "-f", "channels/test.yaml", "--app", "nope")
    assert bad.returncode == 2 and "channel test has no release 'nope'" in bad.stderr
