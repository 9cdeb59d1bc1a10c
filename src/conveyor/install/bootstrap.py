"""`conveyor bootstrap` and `conveyor uninstall`: conveyor put into the cluster it deploys
to, as `flux bootstrap` puts Flux there, and taken out again with the apps left running.

Bootstrap commits conveyor's own HelmRelease (and the chart it names) into the config
repository under the environment's folder, so that from then on conveyor is one more app
of the environment and upgrades of conveyor itself go through git. It installs the chart
with helm only while no agent holds the environment's Lease (the first install, or an
agent that is gone); with a live agent it leaves the release to it (one writer) and asks
it for a pass. Then it waits until the agent is Ready: its Deployment available and the
Lease held and renewed by an agent. Every step looks before it writes, so a second run
changes nothing: no commit, no helm revision, no Secret update.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from conveyor import __version__
from conveyor.cluster.apply import FIELD_MANAGER
from conveyor.cluster.client import KubeClient
from conveyor.cluster.health import HealthStatus, assess
from conveyor.cluster.lease import LEASE_API_VERSION, LeaderElector
from conveyor.errors import ConveyorError
from conveyor.images.reference import split_reference
from conveyor.install.chart import CHART_DIR
from conveyor.reconcile.requests import answers_requests, environment_elector, request_reconcile
from conveyor.reconcile.status import (
    API_VERSION,
    KIND,
    NAMESPACE,
    STALLED,
    AppStatus,
    StatusStore,
    crd_manifest,
)
from conveyor.reconcile.target import ResolvedTarget, Target, fetch_target, helm_cli, kube_client
from conveyor.render.helm import HelmCLI, parse_manifest
from conveyor.source.git import Author, change_trailer, commit_and_push

RELEASE = "conveyor"  # the chart's release, in NAMESPACE
DEPLOYMENT = "conveyor"  # the agent's, as the chart names it
DASHBOARD = "conveyor-dashboard"
DEPLOY_KEY_SECRET = "conveyor-git"  # noqa: S105  # a name: the chart's git.secretName
SELF_FOLDER = "conveyor-system"  # conveyor's own app, under the environment's folder
# The chart's copy in git, in a dot folder: discovery never reads dot folders, so its
# templates are not taken for manifests.
CHART_FOLDER = ".chart"
RELEASE_FILE = "release.yaml"
OBSERVER = "bootstrap-observer"  # the identity that only reads the Lease


class BootstrapError(ConveyorError):
    """Bootstrap or uninstall cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DeployKey:
    """The private key and the git host's known_hosts the agent's ssh uses."""

    identity: Path
    known_hosts: Path


@dataclass(frozen=True)
class BootstrapRequest:
    repo: str
    env: str
    path: str | None = None
    branch: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    deploy_key: DeployKey | None = None
    image: str | None = None  # REPOSITORY[:TAG]; None: the chart's default
    namespaces: tuple[str, ...] = ()  # namespaced RBAC; empty: cluster-wide
    timeout: float = 300.0
    author: Author = field(default_factory=Author)


@dataclass
class BootstrapResult:
    folder: str  # where conveyor's own app is in git
    scope: str
    commit: str | None = None  # None: git held it already
    installed_revision: int | None = None  # the helm revision bootstrap made, if any
    helm_revision: int = 0  # the release's revision at the end
    secret: str | None = None  # "created", "updated", "unchanged", or None (no key)
    holder: str = ""  # the agent holding the Lease
    seconds: dict[str, float] = field(default_factory=dict)


Progress = Callable[[str], None]


def ssh_url(repo: str) -> bool:
    """Whether git reaches `repo` over ssh (and so needs a deploy key in the cluster)."""
    return repo.startswith("ssh://") or ("@" in repo.split("/", 1)[0] and "://" not in repo)


def deploy_key_help(repo: str) -> str:
    """How to make a deploy key for `repo`, for a bootstrap run without one."""
    return (
        f"{repo} is reached over ssh and no --ssh-key was given; make a deploy key:\n"
        "  ssh-keygen -t ed25519 -N '' -C conveyor -f conveyor-deploy-key\n"
        "  ssh-keyscan HOST > known_hosts            # HOST: the git server\n"
        "add conveyor-deploy-key.pub to the repository as a read-only deploy key, then:\n"
        "  conveyor bootstrap ... --ssh-key conveyor-deploy-key --known-hosts known_hosts"
    )


def chart_values(
    request: BootstrapRequest, resolved: ResolvedTarget, *, folder_is_env: bool
) -> dict[str, Any]:
    """The chart's values for this environment: what the HelmRelease in git holds too."""
    git: dict[str, Any] = {"url": request.repo, "branch": resolved.checkout.branch}
    if folder_is_env:
        git["path"] = resolved.env_path
    else:
        git["env"] = request.env
    if request.deploy_key is not None:
        git["secretName"] = DEPLOY_KEY_SECRET
    values: dict[str, Any] = {"git": git}
    if request.namespaces:
        values["rbac"] = {"mode": "namespaced", "namespaces": sorted(set(request.namespaces))}
    if request.image:
        repository, tag, _ = split_reference(request.image)
        values["image"] = {"repository": repository, **({"tag": tag} if tag else {})}
    return values


def release_document(request: BootstrapRequest, chart_path: str, values: dict[str, Any]) -> str:
    """conveyor's own HelmRelease (Flux v1): its chart from this repository's copy."""
    release = {
        "apiVersion": "helm.fluxcd.io/v1",
        "kind": "HelmRelease",
        # Drift of conveyor's own objects is reported, never reverted by conveyor itself:
        # an uninstall, or someone scaling it down in an incident, must not be undone by
        # the agent being removed.
        "metadata": {
            "name": RELEASE,
            "namespace": NAMESPACE,
            "annotations": {"conveyor.dev/drift": "warn"},
        },
        "spec": {
            "releaseName": RELEASE,
            "targetNamespace": NAMESPACE,
            "chart": {"git": request.repo, "ref": values["git"]["branch"], "path": chart_path},
            "values": values,
        },
    }
    header = (
        f"# conveyor {__version__} itself, written by `conveyor bootstrap`. The agent\n"
        "# applies it like any app: change it (or run bootstrap again) to upgrade conveyor.\n"
    )
    return header + yaml.safe_dump(release, sort_keys=False)


def _write_self(root: Path, folder: str, document: str) -> None:
    target = root / folder / SELF_FOLDER
    chart = target / CHART_FOLDER
    shutil.rmtree(chart, ignore_errors=True)
    shutil.copytree(CHART_DIR, chart, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / RELEASE_FILE).write_text(document)


def _resolve(request: BootstrapRequest) -> tuple[ResolvedTarget, bool]:
    """The environment as the agent will see it, and whether the agent names it by its
    folder (`--path`) rather than by conveyor.yaml (`--env`)."""
    base = Target(
        repo=request.repo,
        branch=request.branch,
        path=request.path or request.env,
        kubeconfig=request.kubeconfig,
        context=request.context,
    )
    resolved = fetch_target(base, purpose="bootstrap")
    if request.path or not (resolved.checkout.path / "conveyor.yaml").exists():
        return resolved, True
    named = Target(
        repo=request.repo,
        branch=request.branch,
        env=request.env,
        kubeconfig=request.kubeconfig,
        context=request.context,
    )
    return fetch_target(named, purpose="bootstrap"), False


async def _apply_secret(kube: KubeClient, key: DeployKey) -> str:
    """The deploy-key Secret, written only when its content differs. Its values are
    never printed."""
    try:
        data = {
            "identity": key.identity.read_text(),
            "known_hosts": key.known_hosts.read_text(),
        }
    except (OSError, UnicodeDecodeError) as error:
        raise BootstrapError(f"cannot read the deploy key: {error}") from None
    live = await kube.get("v1", "Secret", DEPLOY_KEY_SECRET, namespace=NAMESPACE)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": DEPLOY_KEY_SECRET, "namespace": NAMESPACE},
        "type": "Opaque",
        "stringData": data,
    }
    if live is not None:
        current = {k: base64.b64decode(v).decode() for k, v in (live.get("data") or {}).items()}
        if current == data:
            return "unchanged"
    await kube.apply(secret, field_manager=FIELD_MANAGER, force=True)
    return "created" if live is None else "updated"


def _objects(manifest: str) -> list[dict[str, Any]]:
    """A release's objects as helm stores them: no CRDs (helm keeps crds/ apart)."""
    return [o for o in parse_manifest(manifest) if o.get("kind") != "CustomResourceDefinition"]


async def _live_holder(elector: LeaderElector) -> str | None:
    """Who holds the Lease and renews it (an agent, or a command's pass), or None."""
    holder = await elector.observe()
    return holder if holder is not None and elector.holder_renews() else None


async def _live_agent(elector: LeaderElector) -> str | None:
    """The agent holding the Lease and renewing it, or None."""
    holder = await _live_holder(elector)
    return holder if holder is not None and answers_requests(holder) else None


async def bootstrap(request: BootstrapRequest, *, progress: Progress) -> BootstrapResult:
    started = time.monotonic()
    try:
        resolved, folder_is_env = await asyncio.to_thread(_resolve, request)
    except ValueError as error:  # ConfigError, a path outside the repository
        raise BootstrapError(str(error)) from None
    values = chart_values(request, resolved, folder_is_env=folder_is_env)
    folder = resolved.env_path
    own_folder = PurePosixPath(folder, SELF_FOLDER)
    document = release_document(request, str(own_folder / CHART_FOLDER), values)
    result = BootstrapResult(folder=str(own_folder), scope=resolved.scope)

    def change(root: Path) -> None:
        _write_self(root, folder, document)

    message = (
        f"conveyor bootstrap: conveyor {__version__} in {result.folder}\n\n"
        f"{change_trailer('bootstrap')}"
    )
    result.commit = await asyncio.to_thread(
        commit_and_push, resolved.checkout, change, message=message, author=request.author
    )
    progress(
        f"git: {'committed ' + result.commit[:12] if result.commit else 'unchanged'} "
        f"({result.folder})"
    )
    result.seconds["git"] = time.monotonic() - started

    helm = helm_cli(resolved)
    async with kube_client(resolved) as kube:
        step = time.monotonic()
        await StatusStore(kube).install()  # conveyor-system and the CRD, as an agent makes them
        if request.deploy_key is not None:
            result.secret = await _apply_secret(kube, request.deploy_key)
            progress(f"deploy key: Secret {NAMESPACE}/{DEPLOY_KEY_SECRET} {result.secret}")
        scope = await StatusStore(kube).scope_for(resolved.identity, scope=resolved.scope)
        result.scope = scope
        elector = environment_elector(kube, scope, identity=OBSERVER)
        desired = _objects(await helm.template(RELEASE, NAMESPACE, str(CHART_DIR), values))
        holder = await _live_agent(elector)
        if holder is not None:
            # One writer: the agent applies conveyor's release from git; nudge it.
            progress(f"agent {holder} holds the Lease: it applies the release from git")
            if result.commit is not None:
                await request_reconcile(kube, scope, app=None)
        elif not await _release_matches(helm, desired):
            release = await helm.upgrade_install(
                RELEASE,
                NAMESPACE,
                str(CHART_DIR),
                values,
                timeout=request.timeout,
                description=f"conveyor bootstrap {__version__}",
                labels=resolved.identity.labels(),
            )
            result.installed_revision = int(release["version"])
            progress(f"helm: release {NAMESPACE}/{RELEASE} revision {release['version']}")
        else:
            progress(f"helm: release {NAMESPACE}/{RELEASE} unchanged")
        result.seconds["install"] = time.monotonic() - step
        step = time.monotonic()
        result.holder = await _wait_ready(
            kube, elector, helm_check=lambda: _release_matches(helm, desired),
            scope=scope, commit=result.commit, request=request, progress=progress,
        )  # fmt: skip
        status = await helm.status(RELEASE, NAMESPACE)
        result.helm_revision = int((status or {}).get("version") or 0)
        result.seconds["ready"] = time.monotonic() - step
    result.seconds["total"] = time.monotonic() - started
    return result


async def _release_matches(helm: HelmCLI, desired: list[dict[str, Any]]) -> bool:
    """Whether conveyor's release holds exactly the objects bootstrap rendered."""
    if await helm.status(RELEASE, NAMESPACE) is None:
        return False
    return bool(_objects(await helm.manifest(RELEASE, NAMESPACE)) == desired)


async def _wait_ready(
    kube: KubeClient,
    elector: LeaderElector,
    *,
    helm_check: Callable[[], Awaitable[bool]],
    scope: str,
    commit: str | None,
    request: BootstrapRequest,
    progress: Progress,
) -> str:
    """Until the release is what bootstrap asked for, the agent's Deployment is
    available and an agent holds the Lease; returns the holder. The agent giving up on
    the commit that changed conveyor's release ends the wait with its reason."""
    deadline = time.monotonic() + request.timeout
    said = ""
    while True:
        waiting = []
        if not await helm_check():
            status = await _self_status(kube, scope)
            if status is not None and commit and status.attempted_revision == commit:
                if status.state == STALLED:
                    raise BootstrapError(
                        f"the agent could not apply conveyor's release at {commit[:12]}: "
                        f"{status.reason}: {status.message}"
                    )
            waiting.append(
                "the agent to apply conveyor's release"
                + (f" ({status.state}: {status.message})" if status and status.message else "")
            )
        deployment = await kube.get("apps/v1", "Deployment", DEPLOYMENT, namespace=NAMESPACE)
        health = assess(deployment) if deployment is not None else None
        if health is None or health.status is not HealthStatus.CURRENT:
            waiting.append(health.message if health else f"Deployment {DEPLOYMENT}: not there")
        holder = await _live_agent(elector)
        if holder is None:
            waiting.append(f"an agent to hold Lease {NAMESPACE}/{elector.name}")
        if not waiting:
            return holder or ""
        message = "waiting for " + "; ".join(waiting)
        if message != said:
            progress(message)
            said = message
        if time.monotonic() > deadline:
            raise BootstrapError(
                f"the agent was not Ready within {request.timeout:.0f}s: {'; '.join(waiting)}"
            )
        await asyncio.sleep(1.0)


async def _self_status(kube: KubeClient, scope: str) -> AppStatus | None:
    """The status of the app that is conveyor's own release, in the environment."""
    statuses = await StatusStore(kube).load_all(scope=scope)
    return next((s for s in statuses.values() if s.release == f"{NAMESPACE}/{RELEASE}"), None)


AGENT_PODS = "app.kubernetes.io/name=conveyor"  # the chart's selector label


@dataclass
class UninstallResult:
    release: bool = False  # the chart's release was there and is gone
    leases: list[str] = field(default_factory=list)  # deleted
    kept_leases: list[str] = field(default_factory=list)  # held by a live agent elsewhere
    secret: bool = False
    statuses: int = 0  # ConveyorApps deleted (only with purge)
    crd: bool = False


async def uninstall(
    *,
    kubeconfig: str | None,
    context: str | None,
    purge: bool,
    timeout: float,
    progress: Progress,
) -> UninstallResult:
    """Remove conveyor: its release (agents, RBAC, Services), the environments' Leases
    once their agents have let go, and the deploy key. The apps stay as they run, with
    their Helm releases; so do the ConveyorApp statuses and their CRD (a later bootstrap
    resumes from them: inventories for prune, last good revisions), unless `purge`
    deletes those and the namespace too. A Lease an agent outside the cluster still
    renews is left to it."""
    result = UninstallResult()
    helm = helm_cli(kubeconfig_path=kubeconfig, context=context)
    started = time.monotonic()
    deadline = started + timeout
    async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
        # The agents go first, while their RBAC still lets them release their Leases on
        # SIGTERM; they report the deletion as drift and never undo it (bootstrap's
        # release says conveyor.dev/drift: warn).
        for name in (DEPLOYMENT, DASHBOARD):
            await kube.delete("apps/v1", "Deployment", name, namespace=NAMESPACE)
        while await kube.list("v1", "Pod", namespace=NAMESPACE, label_selector=AGENT_PODS):
            if time.monotonic() > deadline:
                raise BootstrapError(
                    f"conveyor's Pods in {NAMESPACE} still run after {timeout:.0f}s"
                )
            await asyncio.sleep(1.0)
        progress(f"agents stopped ({time.monotonic() - started:.1f}s)")
        result.release = await helm.status(RELEASE, NAMESPACE) is not None
        await helm.uninstall(RELEASE, NAMESPACE)
        progress(
            f"helm: release {NAMESPACE}/{RELEASE} "
            f"{'uninstalled' if result.release else 'absent'} ({time.monotonic() - started:.1f}s)"
        )
        for lease in await kube.list(LEASE_API_VERSION, "Lease", namespace=NAMESPACE):
            name = lease["metadata"]["name"]
            if not name.startswith("conveyor-"):
                continue
            # Our agents are gone: a holder that still renews past one lease duration is
            # an agent outside the cluster, whose Lease stays.
            duration = float((lease.get("spec") or {}).get("leaseDurationSeconds") or 15)
            until = min(deadline, time.monotonic() + duration + 2.0)
            if await _wait_released(kube, name, deadline=until):
                await kube.delete(LEASE_API_VERSION, "Lease", name, namespace=NAMESPACE)
                result.leases.append(name)
            else:
                result.kept_leases.append(name)
        progress(f"leases: {len(result.leases)} deleted ({time.monotonic() - started:.1f}s)")
        result.secret = await kube.delete("v1", "Secret", DEPLOY_KEY_SECRET, namespace=NAMESPACE)
        if purge:
            statuses = await StatusStore(kube).list_all()
            for status in statuses:
                await kube.delete(API_VERSION, KIND, status.name, namespace=NAMESPACE)
            result.statuses = len(statuses)
            result.crd = await kube.delete(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                crd_manifest()["metadata"]["name"],
            )
            await kube.delete("v1", "Namespace", NAMESPACE)
    return result


async def _wait_released(kube: KubeClient, name: str, *, deadline: float) -> bool:
    """Whether the Lease is free, or its holder stopped renewing, before `deadline`."""
    elector = LeaderElector(kube, namespace=NAMESPACE, name=name, identity=OBSERVER)
    while True:
        if await _live_holder(elector) is None:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(1.0)
