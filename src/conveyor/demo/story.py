"""The whole road on one machine: CI publishes, the agents deploy, image automation
follows a new tag, a promotion waits for a queue to drain, the dashboard shows it all.

Every step runs the same `conveyor` commands a team would run (as subprocesses, with
the environment CI would give them), against real parts on loopback: two sandbox
clusters, `staging` and `production`, each with its own agent (conveyor.yaml names each
environment's kubeconfig context, as teams with a cluster per environment do), the
staging sandbox's registry, git repositories on disk, and an SQS server (moto).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from conveyor.errors import ConveyorError
from conveyor.images.push import push
from conveyor.sandbox import Sandbox
from conveyor.sandbox.paths import state_root
from conveyor.source.git import run_git

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
APPS = ("ui", "api", "worker")
ENVIRONMENTS = ("staging", "production")
QUEUE = "demo-jobs"
ECR = "000000000000.dkr.ecr.eu-west-1.amazonaws.com"
# The images each app's CI builds (the worker has two containers).
IMAGES = {"ui": ["ui"], "api": ["api"], "worker": ["worker-r", "worker-python"]}


class DemoError(ConveyorError, RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def context_of(sandbox: Sandbox) -> str:
    """The kubeconfig context a sandbox's kubeconfig names."""
    return f"sandbox-{sandbox.name}"


@dataclass
class Demo:
    console: Console
    root: Path
    sandboxes: dict[str, Sandbox]  # environment → its cluster
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    registry: str = ""
    config: Path | None = None  # the config repo, once made

    # -- helpers ----------------------------------------------------------------------

    def conveyor(
        self,
        *args: str,
        cwd: Path | None = None,
        check: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=cwd,
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise DemoError(
                f"conveyor {' '.join(args[:2])} failed ({result.returncode}):\n"
                f"{result.stdout[-1500:]}\n{result.stderr[-1500:]}"
            )
        return result

    def background(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def statuses(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every environment's apps, each read from its own cluster."""
        if self.config is None:
            raise DemoError("no config repository yet")
        listing = self.conveyor(
            "get", "apps", "--all-environments", "--repo", str(self.config), "-o", "json",
            check=False,
        )  # fmt: skip
        if not listing.stdout:
            raise DemoError(f"conveyor get apps failed: {listing.stderr[-1500:]}")
        return {(i["scope"], i["name"]): i for i in json.loads(listing.stdout)["items"]}

    def wait(self, what: str, check: Callable[[], bool], *, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with self.console.status(what):
            while time.monotonic() < deadline:
                for process in self.processes:
                    if process.poll() is not None and process.returncode not in (0, None):
                        raise DemoError(
                            f"a background process exited while {what}; logs in "
                            f"{self.root / 'logs'}"
                        )
                if check():
                    return
                time.sleep(1)
        raise DemoError(f"timed out {what}; logs in {self.root / 'logs'}")

    def all_ready(self, environment: str) -> bool:
        statuses = self.statuses()
        return all(statuses.get((environment, app), {}).get("ready") for app in APPS)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    # -- the story ------------------------------------------------------------------------

    def config_repo(self, sqs_endpoint: str) -> Path:
        """The config repo, Cellenics-shaped: one folder per environment on master."""
        bare = self.root / "releases.git"
        work = self.root / "releases"
        run_git(["init", "-q", "--bare", "--initial-branch", "master", str(bare)])
        run_git(["init", "-q", "--initial-branch", "master", str(work)])
        project = {
            "environments": [
                {
                    "name": "staging",
                    "path": "staging",
                    "branch": "master",
                    "cluster": {"context": context_of(self.sandboxes["staging"])},
                },
                {
                    "name": "production",
                    "path": "production",
                    "branch": "master",
                    "cluster": {"context": context_of(self.sandboxes["production"])},
                    "gates": [
                        {
                            "type": "queue-empty",
                            "queues": [QUEUE],
                            "regions": ["eu-west-1"],
                            "endpoint-url": sqs_endpoint,
                            "timeout": "5m",
                            "interval": "2s",
                        }
                    ],
                },
            ],
            "guard": {
                "protected": ["staging/**", "production/**"],
                "allow": ["**/*.md"],
                "identities": ["ci-bot"],
            },
        }
        (work / "conveyor.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
        (work / "README.md").write_text("# releases\n\nFilled in by CI. Do not edit by hand.\n")
        for environment in ENVIRONMENTS:
            (work / environment).mkdir()
            (work / environment / "README.md").write_text(f"# {environment}\n")
        run_git(["add", "--all"], cwd=work)
        run_git(
            [
                "-c",
                "user.name=demo",
                "-c",
                "user.email=demo@localhost",
                "commit",
                "-q",
                "-m",
                "Start the releases repo",
            ],
            cwd=work,
        )
        run_git(["push", "-q", str(bare), "HEAD:master"], cwd=work)
        self.config = bare
        return bare

    def kubectl(self, environment: str, *args: str) -> subprocess.CompletedProcess[str]:
        """kubectl on an environment's cluster."""
        context = context_of(self.sandboxes[environment])
        return subprocess.run(
            ["kubectl", "--context", context, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )

    def app_repo(self, app: str, config_bare: Path) -> tuple[Path, Path, str]:
        """An app repo from examples/apps/<app>, with the example chart as its chart-infra/."""
        bare = self.root / "apps" / f"{app}.git"
        work = self.root / "apps" / app
        shutil.copytree(EXAMPLES / "apps" / app, work)
        shutil.copytree(EXAMPLES / "charts" / "service", work / "chart-infra")
        profile_path = work / ".conveyor" / "publish.yaml"
        profile = yaml.safe_load(profile_path.read_text())
        profile["config-repo"] = {"url": str(config_bare), "branch": "master"}
        for name, settings in profile["environments"].items():
            # Namespaces name their environment, so that kubectl's output says which.
            settings["namespace"] = f"{{app}}-{name}"
            # Images live in the sandbox's registry instead of ECR.
            settings["values"] = {
                key: value.replace(ECR, self.registry) if isinstance(value, str) else value
                for key, value in settings.get("values", {}).items()
            }
        profile_path.write_text(yaml.safe_dump(profile, sort_keys=False))
        run_git(["init", "-q", "--bare", "--initial-branch", "master", str(bare)])
        run_git(["init", "-q", "--initial-branch", "master", str(work)])
        run_git(["add", "--all"], cwd=work)
        run_git(
            [
                "-c",
                "user.name=dev",
                "-c",
                "user.email=dev@localhost",
                "commit",
                "-q",
                "-m",
                f"{app}: first release",
            ],
            cwd=work,
        )
        run_git(["push", "-q", str(bare), "HEAD:master"], cwd=work)
        sha = run_git(["rev-parse", "HEAD"], cwd=work).strip()
        return work, bare, sha

    def publish(
        self, app: str, work: Path, bare: Path, sha: str, *, release: str | None = None
    ) -> str:
        """What the app's CI does after pushing its images: a push to master goes to
        staging, a published release (a semver tag) to production."""
        if release is None:
            version = f"refs-heads-master-{sha[:7]}-{int(time.time())}"
            environment, ref, event = "staging", "refs/heads/master", "push"
        else:
            version = release.lstrip("v")
            environment, ref, event = "production", f"refs/tags/{release}", "release"
        built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for image in IMAGES[app]:
            push(self.registry, image, [version], created=built)
        chart_git = f"file://{bare}"
        if app == "api":  # Flux v2: the chart comes from a GitRepository, tags via a setter
            settings = [
                f"GitRepository:spec.url={chart_git}",
                f"ImageRepository:spec.image={self.registry}/{app}",
                f"HelmRelease:spec.values.image.repository={self.registry}/{app}",
            ]
        else:
            settings = [f"HelmRelease:spec.chart.git={chart_git}"]
        self.conveyor(
            "publish",
            "--environment",
            environment,
            "--version",
            version,
            "--ref",
            ref,
            "--sha",
            sha,
            "--event",
            event,
            "--author-name",
            "ci-bot",
            *(arg for setting in settings for arg in ("--set", setting)),
            cwd=work,
        )
        return version


@contextmanager
def sqs_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per SQS request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def create_queue(endpoint: str) -> tuple[Any, str]:
    """The job queue production's gate watches (empty to begin with)."""
    import boto3

    sqs = boto3.client(
        "sqs",
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id="demo",
        aws_secret_access_key="demo",  # noqa: S106 - moto accepts any credentials
    )
    url: str = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
    return sqs, url


def drain_later(sqs: Any, url: str, *, after: float) -> threading.Thread:
    """A sample worker: after a while it processes (receives and deletes) every job."""

    def consume() -> None:
        time.sleep(after)
        while True:
            batch = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            ).get("Messages", [])
            if not batch:
                attributes = sqs.get_queue_attributes(
                    QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
                )
                if attributes["Attributes"]["ApproximateNumberOfMessages"] == "0":
                    return
            for message in batch:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return thread


def summary(demo: Demo) -> Table:
    table = Table(title="conveyor demo: what runs where")
    for column in ("environment", "cluster", "app", "state", "image tag", "git revision", "helm"):
        table.add_column(column, overflow="fold")
    statuses = demo.statuses()
    for environment in ENVIRONMENTS:
        for app in APPS:
            status = statuses.get((environment, app), {})
            image = demo_image(demo, environment, app)
            state = status.get("state", "missing")
            style = "green" if status.get("ready") else "red"
            table.add_row(
                environment,
                context_of(demo.sandboxes[environment]),
                app,
                f"[{style}]{state}",
                image,
                str(status.get("revision", ""))[:12],
                str(status.get("helmRevision") or ""),
            )
    return table


def demo_image(demo: Demo, environment: str, app: str) -> str:
    """The image tag the app's Deployment runs in the environment's cluster."""
    result = demo.kubectl(
        environment,
        "get",
        "deployment",
        app,
        "-n",
        f"{app}-{environment}",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    )
    # The tag is what moves between environments; the registry is the same everywhere.
    return result.stdout.rsplit(":", 1)[-1] if result.returncode == 0 else "-"


def dashboard_clusters(demo: Demo, url: str) -> list[str]:
    """What the dashboard shows of each environment: its cluster, once both answer
    with every app."""

    def both() -> bool:
        try:
            matrix = httpx.get(f"{url}/api/v1/matrix", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        shown = {e["name"]: e for e in matrix["environments"]}
        return all(
            e in shown and shown[e]["reachable"] and shown[e]["apps"] == len(APPS)
            for e in ENVIRONMENTS
        )

    demo.wait("the dashboard reads both clusters", both, timeout=60)
    matrix = httpx.get(f"{url}/api/v1/matrix", timeout=5).json()
    return [f"{e['name']} on {e['cluster']}" for e in matrix["environments"]]


def run(*, interactive: bool) -> int:
    console = Console()
    root = state_root() / "demo"
    if root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    prefix = os.environ.get("DEMO_SANDBOX")
    sandboxes = {e: Sandbox(f"{prefix}-{e}" if prefix else e) for e in ENVIRONMENTS}
    started = time.monotonic()
    with console.status("starting the sandboxes (the first run builds Kubernetes)") as spinner:
        for environment, sandbox in sandboxes.items():
            spinner.update(f"starting the {environment} cluster")
            sandbox.down()  # a fresh cluster: the story starts from nothing
            state = sandbox.up()
        spinner.update("ready")
    staging = sandboxes["staging"]
    demo = Demo(console=console, root=root, sandboxes=sandboxes, registry=staging.registry())
    demo.env = {
        **os.environ,
        # Both clusters, as a person's kubeconfig holds them; conveyor.yaml picks one per
        # environment by its context.
        "KUBECONFIG": os.pathsep.join(str(s.kubeconfig) for s in sandboxes.values()),
        "PATH": f"{state.bin_dir}{os.pathsep}{os.environ['PATH']}",
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "CONVEYOR_CACHE": str(root / "cache"),
    }
    try:
        with sqs_server() as sqs_endpoint:
            return _story(demo, sqs_endpoint, interactive=interactive, started=started)
    except DemoError as error:
        console.print(f"[red]demo failed:[/] {error}")
        return 1
    finally:
        demo.stop()
        if not interactive or os.environ.get("DEMO_KEEP") != "1":
            for sandbox in sandboxes.values():
                sandbox.down()


def _story(demo: Demo, sqs_endpoint: str, *, interactive: bool, started: float) -> int:
    console = demo.console
    config = demo.config_repo(sqs_endpoint)
    console.print(
        f"[bold]1.[/] config repo {config} with environments staging → production, each "
        "in its own cluster (production gated on an empty SQS queue)"
    )
    # The releases read an account-wide ConfigMap through valuesFrom, as Cellenics' do:
    # Flux v1 ones from the flux namespace, Flux v2 ones (api) from their own namespace.
    for environment in ENVIRONMENTS:
        for namespace in ("flux", f"api-{environment}"):
            for args in (
                ("create", "namespace", namespace),
                (
                    "create",
                    "configmap",
                    "account-config",
                    "-n",
                    namespace,
                    "--from-literal=account-config.yaml=awsAccountId: '000000000000'",
                ),
            ):
                created = demo.kubectl(environment, *args)
                if created.returncode != 0:
                    raise DemoError(f"kubectl {' '.join(args[:2])}: {created.stderr}")

    sqs, queue_url = create_queue(sqs_endpoint)
    versions = {}
    for app in APPS:
        work, bare, sha = demo.app_repo(app, config)
        demo.publish(app, work, bare, sha, release="v1.0.0")
        versions[app] = demo.publish(app, work, bare, sha)
    console.print(
        "[bold]2.[/] CI published release v1.0.0 of ui, api and worker to production, and "
        f"master builds to staging: {', '.join(f'{a} {v}' for a, v in versions.items())}"
    )

    hook_secret = demo.root / "hook.secret"
    hook_secret.write_text(secrets.token_hex(16))
    for environment in ENVIRONMENTS:
        demo.background(
            f"agent-{environment}",
            "agent",
            "--repo",
            str(config),
            "--env",
            environment,
            "--interval",
            "5s",
            "--timeout",
            "120",
            "--webhook-secret-file",
            str(hook_secret),
        )
    demo.wait(
        "the agents deploy the releases",
        lambda: demo.all_ready("staging") and demo.all_ready("production"),
    )
    console.print("[bold]3.[/] the agents deployed them: staging and production Ready")

    new_tag = f"refs-heads-master-{secrets.token_hex(4)[:7]}-{int(time.time()) + 60}"
    push(
        demo.registry,
        "ui",
        [new_tag],
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)),
    )
    demo.conveyor(
        "images", "update", "--repo", str(config), "--branch", "master", "--path", "staging"
    )
    demo.wait(
        f"image automation rolls ui {new_tag} out to staging",
        lambda: demo_image(demo, "staging", "ui").endswith(new_tag) and demo.all_ready("staging"),
    )
    console.print(
        f"[bold]4.[/] image automation found ui:{new_tag} and committed it; staging runs it"
    )

    for i in range(5):
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"job": i}))
    drain_later(sqs, queue_url, after=8)
    console.print(
        f"[bold]5.[/] promoting staging → production; 5 jobs wait in {QUEUE}, a "
        "worker drains them in ~8 s"
    )
    promotion_started = time.monotonic()
    demo.conveyor(
        "promote",
        "--repo",
        str(config),
        "--from",
        "staging",
        "--to",
        "production",
        "--gate-timeout",
        "3m",
        "--author-name",
        "ci-bot",
    )
    console.print(
        f"   the queue gate opened after {time.monotonic() - promotion_started:.0f}s;"
        " the promotion was committed"
    )

    def promoted() -> bool:
        # Ready alone is the status before the agent saw the promotion commit: wait until
        # production runs staging's images, and is Ready with them.
        same = all(
            demo_image(demo, "production", app) == demo_image(demo, "staging", app) for app in APPS
        )
        return same and demo.all_ready("production")

    demo.wait("the production agent deploys the promoted versions", promoted)
    console.print(
        "[bold]6.[/] production runs the versions tested on staging (copied across clusters)"
    )

    token = secrets.token_urlsafe(32)
    (demo.root / "dashboard.tokens").write_text(f"demo {token}\n")
    (demo.root / "dashboard.tokens").chmod(0o600)
    port = free_port()
    demo.background(
        "dashboard",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--token-file",
        str(demo.root / "dashboard.tokens"),
        "--repo",
        str(config),
    )
    shown = dashboard_clusters(demo, f"http://127.0.0.1:{port}")
    console.print(f"[bold]7.[/] the dashboard reads both clusters: {', '.join(shown)}")
    console.print(summary(demo))
    ready = all(demo.all_ready(e) for e in ENVIRONMENTS)
    console.print(
        f"dashboard: http://127.0.0.1:{port}/ (token: {token})\n"
        f"done in {time.monotonic() - started:.0f}s; logs in {demo.root / 'logs'}"
    )
    if interactive and ready:
        console.print("press Ctrl-C to stop the demo and clean up")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("cleaning up")
    return 0 if ready else 1
