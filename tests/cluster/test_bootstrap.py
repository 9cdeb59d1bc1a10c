"""conveyor's chart and `conveyor bootstrap` / `uninstall`, on the real sandbox.

kwok's node runs no containers: it marks the chart's Pods Running and Ready, which is why
bootstrap also waits for the environment's Lease, which only a running agent takes. The
test plays the kubelet for one of the two Pods (`PodOnHost`): it runs that Pod's
container command (`conveyor agent` with the Deployment's own arguments) as a process on
this host, with what the kubelet would give it and nothing else:

- a ServiceAccount token of the Pod's account, bound to that Pod (`kubectl create token
  --bound-object-kind Pod`), its CA and namespace at
  /var/run/secrets/kubernetes.io/serviceaccount, seen only by that process (a private
  mount namespace binds a directory of the test over /run);
- KUBERNETES_SERVICE_HOST/_PORT pointing at the sandbox's apiserver, and no kubeconfig;
- the Pod's name as hostname (a private UTS namespace), which names the agent's Lease
  identity as in a Pod;
- the container's env; `--listen` moved to a free port of the host (the host network
  stands in for the Pod's);
- when the Pod is deleted, the process gets SIGTERM, as the kubelet sends it.

What is not simulated: the image (the process runs this checkout's conveyor with the
sandbox's helm; test_image.py runs the image itself), the kubelet's probes and the Pod's
network namespace.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.cluster.shards import SHARDS_LABEL, owner_of
from conveyor.install.chart import CHART_DIR
from conveyor.source.git import run_git
from tests.cluster.gitops import (
    ConfigRepo,
    conveyor,
    deployment,
    kubectl_json,
    wait_for,
    write_configmap_apps,
)
from tests.cluster.test_in_cluster import apiserver, pod_files
from tests.cluster.test_readme_cluster import as_run
from tests.conftest import SandboxHandle
from tests.unit.test_readme import readme_commands

pytestmark = pytest.mark.cluster
SYSTEM = "conveyor-system"
ACCOUNT = "system:serviceaccount:conveyor-system:conveyor"
APPS_SHARDED = 20  # both of two shards own some: all to one has odds of 1 in 524,288


def chart_values(**overrides: Any) -> dict[str, Any]:
    return {"git": {"url": "https://git.example.com/config.git", "path": "production"}, **overrides}


def helm_template(sandbox: SandboxHandle, values: dict[str, Any], tmp_path: Path) -> str:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return sandbox.run(
        "helm", "template", "conveyor", str(CHART_DIR), "--namespace", SYSTEM,
        "--values", str(values_file), "--include-crds",
    ).stdout  # fmt: skip


def test_chart_lints_clean_and_renders_what_the_apiserver_accepts(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    """Both RBAC modes, every optional part on, through a server-side dry run (the
    ServiceMonitor aside: the sandbox has no Prometheus operator, so no such kind)."""
    every_part = chart_values(
        rbac={"mode": "namespaced", "namespaces": [namespace]},
        dashboard={"enabled": True, "tokenSecretName": "tokens"},
        networkPolicy={"enabled": True},
        agent={"webhookSecretName": "webhook"},
        git={"url": "ssh://git@git.example.com/config.git", "env": "production",
             "secretName": "conveyor-git"},
    )  # fmt: skip
    for values in (chart_values(), every_part):
        values_file = tmp_path / "lint.yaml"
        values_file.write_text(yaml.safe_dump(values))
        lint = sandbox.run(
            "helm", "lint", "--strict", str(CHART_DIR), "--namespace", SYSTEM,
            "--values", str(values_file),
        )  # fmt: skip
        assert "0 chart(s) failed" in lint.stdout, lint.stdout
        rendered = helm_template(sandbox, values, tmp_path)
        (tmp_path / "rendered.yaml").write_text(rendered)
        sandbox.run("kubectl", "create", "namespace", SYSTEM, check=False)
        dry_run = sandbox.run(
            "kubectl", "apply", "--dry-run=server", "-f", str(tmp_path / "rendered.yaml"),
            check=False,
        )  # fmt: skip
        assert dry_run.returncode == 0, dry_run.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert kinds.count("Deployment") == 2 and "PodDisruptionBudget" in kinds
    assert "NetworkPolicy" in kinds and "CustomResourceDefinition" in kinds
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    with_monitor = helm_template(
        sandbox, chart_values(metrics={"serviceMonitor": {"enabled": True}}), tmp_path
    )
    assert "kind: ServiceMonitor" in with_monitor
    sharded = helm_template(
        sandbox, chart_values(agent={"replicas": 3, "sharding": {"enabled": True}}), tmp_path
    )
    assert "- --shards=3" in sharded and "replicas: 3" in sharded
    assert "--shards" not in helm_template(sandbox, chart_values(), tmp_path)
    refused = sandbox.run(
        "helm", "template", "conveyor", str(CHART_DIR), "--namespace", SYSTEM,
        "--set", "git.url=x", "--set", "git.path=p", "--set", "rbac.mode=namespaced",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "rbac.namespaces: namespaced mode needs the namespaces" in refused.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PodOnHost:
    """One of the chart's Pods, its container run as a host process (module docstring)."""

    name: str
    process: subprocess.Popen[str]
    log: Path
    terminated: bool = False  # SIGTERM sent

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def container_command(pod: dict[str, Any], port: int) -> tuple[list[str], dict[str, str]]:
    container = pod["spec"]["containers"][0]
    args = [
        f"--listen=0.0.0.0:{port}" if arg.startswith("--listen=") else arg
        for arg in container["args"]
    ]
    env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    return args, env


class Kubelet:
    """Runs every agent Pod of the chart that kwok says runs, and sends SIGTERM to the
    process of a Pod once it is being deleted (a rollout, an uninstall)."""

    def __init__(self, sandbox: SandboxHandle, work: Path) -> None:
        self.sandbox = sandbox
        self.work = work
        self.pods: dict[str, PodOnHost] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def running(self) -> list[str]:
        return sorted(n for n, p in self.pods.items() if p.process.poll() is None)

    def output(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()}" for n, p in sorted(self.pods.items()))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            live = {p["metadata"]["name"]: p for p in agent_pods(self.sandbox)}
            for name, pod in live.items():
                if name not in self.pods:
                    self.pods[name] = self._start(pod)
            for name, running in self.pods.items():
                if name not in live and not running.terminated:
                    running.process.send_signal(signal.SIGTERM)  # once, as the kubelet
                    running.terminated = True

    def _start(self, pod: dict[str, Any]) -> PodOnHost:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        token = self.sandbox.run(
            "kubectl", "create", "token", pod["spec"]["serviceAccountName"], "-n", SYSTEM,
            "--bound-object-kind", "Pod", "--bound-object-name", name, "--bound-object-uid", uid,
        ).stdout.strip()  # fmt: skip
        run_dir = self.work / f"run-{name}"
        account = run_dir / "secrets" / "kubernetes.io" / "serviceaccount"
        pod_files(self.sandbox, account, token=token, namespace=SYSTEM)
        args, container_env = container_command(pod, free_port())
        host, api_port = apiserver(self.sandbox)
        env = {k: v for k, v in self.sandbox.env.items() if k != "KUBECONFIG"}
        env.update(container_env)
        env.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=api_port)
        log = self.work / f"{name}.log"
        process = subprocess.Popen(
            [
                "unshare", "--mount", "--uts", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$0" /run && hostname "$1" && shift && exec "$@"',
                str(run_dir), name,
                sys.executable, "-m", "conveyor", *args,
            ],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        return PodOnHost(name, process, log)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for running in self.pods.values():
            if running.process.poll() is None:
                running.process.send_signal(signal.SIGTERM)
        for running in self.pods.values():
            try:
                running.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                running.process.kill()


@pytest.fixture
def kubelet(sandbox: SandboxHandle, tmp_path: Path) -> Iterator[Kubelet]:
    work = tmp_path / "kubelet"
    work.mkdir()
    running = Kubelet(sandbox, work)
    yield running
    running.stop()
    print(running.output())


def agent_pods(sandbox: SandboxHandle) -> list[dict[str, Any]]:
    listed = kubectl_json(
        sandbox, "get", "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/component=agent"
    )
    items = (listed or {}).get("items", [])
    pods = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def can_i(sandbox: SandboxHandle, *args: str) -> bool:
    result = sandbox.run("kubectl", "auth", "can-i", *args, f"--as={ACCOUNT}", check=False)
    return result.stdout.strip() == "yes"


def helm_revisions(sandbox: SandboxHandle) -> list[int]:
    history = sandbox.run("helm", "history", "conveyor", "-n", SYSTEM, "-o", "json", check=False)
    return [r["revision"] for r in json.loads(history.stdout)] if history.returncode == 0 else []


def commits(repo: ConfigRepo) -> list[str]:
    return run_git(["--git-dir", str(repo.bare), "log", "--format=%H", "main"]).split()


def readme_line(start: str, *, having: str) -> str:
    return next(c for c in readme_commands() if c.startswith(start) and having in c)


def bootstrap_json(sandbox: SandboxHandle, line: str, filled: dict[str, str]) -> dict[str, Any]:
    """A README bootstrap line as written, with `-o json` for the test to read it."""
    started = time.monotonic()
    result = conveyor(sandbox, *as_run(line, filled), "-o", "json", timeout=300)
    assert result.returncode == 0, f"{line}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    print(f"{line}: {time.monotonic() - started:.1f}s, steps {report['seconds']}")
    return report


@pytest.fixture
def no_conveyor_release(sandbox: SandboxHandle) -> Iterator[None]:
    """conveyor-system holds one release of the chart per cluster: none before, none after."""
    conveyor(sandbox, "uninstall", "--timeout", "30")
    yield
    conveyor(sandbox, "uninstall", "--timeout", "30")


def test_bootstrap_namespaced_agent_reconciles_upgrades_through_git_uninstall_keeps_apps(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    no_conveyor_release: None,
    kubelet: Kubelet,
) -> None:
    """The README's lines: bootstrap (namespaced), again (a no-op), an upgrade (through
    git: the agent applies it, its Pods roll), uninstall (the app keeps running)."""
    name = f"boot-{namespace[2:]}"
    repo = ConfigRepo(tmp_path / "repo")
    repo.write(f"{name}/web/deploy.yaml", deployment("web", namespace))
    repo.commit("an environment with one app")
    filled = {"URL": repo.url, "NAME": name, "NS": namespace, "IMAGE": "localhost/conveyor:next"}
    install = readme_line("conveyor bootstrap", having="--namespace NS")
    first = bootstrap_json(sandbox, install, filled)
    # An agent identity is `<hostname>-<pid>-<random>`, and a Pod's hostname its name.
    assert any(first["holder"].startswith(f"{pod}-") for pod in kubelet.running()), first
    assert first["installed_revision"] == 1 and first["secret"] is None

    # conveyor's own release is in git, committed once, with the trailer.
    message = run_git(["--git-dir", str(repo.bare), "log", "-1", "--format=%B", "main"])
    assert "Conveyor-Change: bootstrap" in message
    release_file = f"main:{name}/conveyor-system/release.yaml"
    release = yaml.safe_load(run_git(["--git-dir", str(repo.bare), "show", release_file]))
    assert release["spec"]["chart"]["path"] == f"{name}/conveyor-system/.chart"
    assert release["spec"]["values"]["rbac"] == {"mode": "namespaced", "namespaces": [namespace]}

    # The agent, with its ServiceAccount's token only, reconciled the environment: the
    # app in the namespace it may use, and conveyor's own release from git.
    def ready_apps() -> set[str]:
        statuses = kubectl_json(sandbox, "get", "conveyorapps", "-n", SYSTEM)
        return {
            item["spec"]["app"]
            for item in (statuses or {}).get("items", [])
            if item["spec"].get("scope") == name and item.get("status", {}).get("state") == "Ready"
        }

    wait_for(lambda: {"web", "conveyor"} <= ready_apps(), timeout=120, what="web and conveyor")
    web = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    assert web is not None and web["metadata"]["labels"]["conveyor.dev/owner"]
    assert helm_revisions(sandbox) == [1, 2]  # the agent's first pass took the release over

    # What namespaced mode forbids, as the agent's ServiceAccount.
    assert can_i(sandbox, "create", "deployments", "-n", namespace)
    assert can_i(sandbox, "update", "leases", "-n", SYSTEM)
    assert not can_i(sandbox, "create", "deployments", "-n", "default")
    assert not can_i(sandbox, "list", "secrets", "--all-namespaces")
    assert not can_i(sandbox, "get", "secrets", "-n", "kube-system")
    assert not can_i(sandbox, "create", "namespaces")
    assert not can_i(sandbox, "create", "clusterroles")
    assert not can_i(sandbox, "delete", "customresourcedefinitions")

    # Running it again changes nothing: no commit, no helm revision.
    before = commits(repo)
    again = bootstrap_json(sandbox, install, filled)
    assert again["commit"] is None and again["installed_revision"] is None, again
    assert commits(repo) == before and helm_revisions(sandbox) == [1, 2]

    # An upgrade goes through git: bootstrap commits, the agent holding the Lease applies
    # it (bootstrap runs no helm beside it), its Pods roll, a new Pod's agent leads.
    old_pods = kubelet.running()
    upgrade_line = readme_line("conveyor bootstrap", having="--namespace NS --image")
    upgrade = bootstrap_json(sandbox, upgrade_line, filled)
    assert upgrade["commit"] and upgrade["installed_revision"] is None, upgrade
    assert commits(repo)[1:] == before
    live = kubectl_json(sandbox, "get", "deployment", "conveyor", "-n", SYSTEM)
    assert live is not None
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == filled["IMAGE"]
    assert helm_revisions(sandbox)[-1] >= 3
    wait_for(lambda: not set(old_pods) & set(kubelet.running()), timeout=60, what="the roll")

    # Uninstall: conveyor goes (its Pods get their SIGTERM), the app stays.
    started = time.monotonic()
    removed = conveyor(sandbox, *as_run(readme_line("conveyor uninstall", having=""), {}))
    print(f"uninstall: {time.monotonic() - started:.1f}s\n{removed.stderr}")
    assert removed.returncode == 0, removed.stderr
    assert f"conveyor-{name}" in removed.stdout
    wait_for(lambda: not kubelet.running(), timeout=60, what="the agents to exit")
    codes = {n: p.process.returncode for n, p in kubelet.pods.items()}
    assert set(codes.values()) == {0}, f"{codes}\n{kubelet.output()}"
    assert helm_revisions(sandbox) == []
    assert kubectl_json(sandbox, "get", "deployment", "conveyor", "-n", SYSTEM) is None
    assert kubectl_json(sandbox, "get", "lease", f"conveyor-{name}", "-n", SYSTEM) is None
    web_after = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    assert web_after is not None and web_after["metadata"]["uid"] == web["metadata"]["uid"]
    kept = kubectl_json(sandbox, "get", "conveyorapp", f"{name}.web", "-n", SYSTEM)
    assert kept is not None  # statuses stay for a later bootstrap (no --purge)


def test_bootstrap_cluster_wide_with_a_deploy_key(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    no_conveyor_release: None,
    kubelet: Kubelet,
) -> None:
    """The default mode, with the deploy-key Secret made from the given files (the
    repository is a local path, so the agent's git never needs the key it is given)."""
    name = f"wide-{namespace[2:]}"
    repo = ConfigRepo(tmp_path / "repo")
    repo.write(f"{name}/web/deploy.yaml", deployment("web", namespace))
    repo.commit("an environment with one app")
    key, hosts = tmp_path / "deploy-key", tmp_path / "known_hosts"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key-7f3a\n-----END ...\n")
    hosts.write_text("git.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleHostKey\n")
    args = ("bootstrap", "--repo", repo.url, "--env", name, "--ssh-key", str(key),
            "--known-hosts", str(hosts), "-o", "json")  # fmt: skip
    first = conveyor(sandbox, *args, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "not-a-real-key-7f3a" not in first.stdout + first.stderr
    report = json.loads(first.stdout)
    assert report["secret"] == "created" and report["installed_revision"] == 1
    secret = kubectl_json(sandbox, "get", "secret", "conveyor-git", "-n", SYSTEM)
    assert secret is not None and sorted(secret["data"]) == ["identity", "known_hosts"]
    live = kubectl_json(sandbox, "get", "deployment", "conveyor", "-n", SYSTEM)
    assert live is not None
    pod_spec = live["spec"]["template"]["spec"]
    assert {"name": "git", "secret": {"secretName": "conveyor-git", "defaultMode": 0o440}} in (
        pod_spec["volumes"]
    )
    env = {e["name"]: e["value"] for e in pod_spec["containers"][0]["env"]}
    assert "-i /etc/conveyor/git/identity" in env["GIT_SSH_COMMAND"]
    assert "--namespace" not in " ".join(pod_spec["containers"][0]["args"])
    # Cluster-wide: the agent may do what an environment's apps need, anywhere.
    assert can_i(sandbox, "create", "deployments", "-n", namespace)
    assert can_i(sandbox, "create", "namespaces")
    again = json.loads(conveyor(sandbox, *args, timeout=300).stdout)
    assert again["secret"] == "unchanged" and again["commit"] is None, again
    removed = conveyor(sandbox, "uninstall", "--timeout", "60")
    assert removed.returncode == 0, removed.stderr
    assert kubectl_json(sandbox, "get", "secret", "conveyor-git", "-n", SYSTEM) is None
    assert kubectl_json(sandbox, "get", "clusterrolebinding", "conveyor") is None
    assert kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace) is not None


def test_the_charts_sharded_replicas_split_the_apps_and_take_a_deleted_pods_over(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    no_conveyor_release: None,
    kubelet: Kubelet,
) -> None:
    """`agent.replicas=2` with `agent.sharding.enabled`: each Pod's agent holds a shard
    Lease and reconciles its share of the apps; a deleted Pod's agent (SIGTERM) leaves,
    and the other shards apply its apps' next revision."""
    name = f"shard-{namespace[2:]}"
    repo = ConfigRepo(tmp_path / "repo")

    def write_apps(version: str) -> str:
        write_configmap_apps(repo, name, namespace, count=APPS_SHARDED, version=version)
        return repo.commit(f"version {version}")

    first = write_apps("1")
    values = chart_values(
        git={"url": repo.url, "path": name},
        agent={"replicas": 2, "sharding": {"enabled": True}, "leaseDuration": 10,
               "interval": "5s"},
    )  # fmt: skip
    values_file = tmp_path / "sharded.yaml"
    values_file.write_text(yaml.safe_dump(values))
    sandbox.run(
        "helm", "install", "conveyor", str(CHART_DIR), "--namespace", SYSTEM,
        "--create-namespace", "--values", str(values_file),
    )  # fmt: skip

    def apps() -> dict[str, dict[str, Any]]:
        result = conveyor(sandbox, "get", "apps", "--env", name, "-o", "json", check=True)
        return {item["name"]: item for item in json.loads(result.stdout)["items"]}

    def settled(revision: str) -> dict[str, dict[str, Any]] | None:
        """The apps once all are Ready at `revision`, each owned by a running Pod's shard."""
        shown, pods = apps(), kubelet.running()
        ready = len(shown) == APPS_SHARDED and all(
            a["state"] == "Ready"
            and a["revision"] == revision
            and any(str(a["shard"]).startswith(f"{pod}-") for pod in pods)
            for a in shown.values()
        )
        return shown if ready else None

    # Both Pods' agents hold shard Leases and split the apps as hashing says.
    shown = wait_for(lambda: settled(first), timeout=120, what="the apps Ready, by both shards")
    shards = sorted({str(a["shard"]) for a in shown.values()})
    leases = kubectl_json(sandbox, "get", "leases", "-n", SYSTEM, "-l", SHARDS_LABEL)
    holders = sorted(str(lease["spec"]["holderIdentity"]) for lease in (leases or {})["items"])
    assert holders == shards and len(shards) == 2, (holders, shards)
    assert all(a["shard"] == owner_of(n, shards) for n, a in shown.items())
    assert all(a["lastWrittenBy"] == a["shard"] for a in shown.values())

    # A Pod deleted: its agent gets SIGTERM, releases and deletes its Lease, and exits 0;
    # the next revision of its apps is applied by the others (its replacement among them).
    victim_pod = next(p for p in kubelet.running() if shards[0].startswith(f"{p}-"))
    victim_apps = [n for n, a in shown.items() if a["shard"] == shards[0]]
    sandbox.run("kubectl", "delete", "pod", victim_pod, "-n", SYSTEM, "--wait=false")
    wait_for(
        lambda: kubelet.pods[victim_pod].process.poll() is not None,
        timeout=60,
        what="the deleted Pod's agent to exit",
    )
    assert kubelet.pods[victim_pod].process.returncode == 0, kubelet.pods[victim_pod].output()
    second = write_apps("2")
    shown = wait_for(lambda: settled(second), timeout=120, what="version 2 Ready, taken over")
    assert shards[0] not in {a["shard"] for a in shown.values()}
    assert all(shown[n]["lastWrittenBy"] not in (shards[0], None) for n in victim_apps), shown
    live = sorted({str(a["shard"]) for a in shown.values()})
    assert all(a["shard"] == owner_of(n, live) for n, a in shown.items())


def test_bootstrap_without_a_deploy_key_for_an_ssh_repo_says_how_to_make_one(
    sandbox: SandboxHandle,
) -> None:
    result = conveyor(sandbox, "bootstrap", "--repo", "git@git.example.com:team/config.git",
                      "--env", "production")  # fmt: skip
    assert result.returncode == 2
    assert "ssh-keygen -t ed25519" in result.stderr and "--ssh-key" in result.stderr
