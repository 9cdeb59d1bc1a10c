"""cal-itp release channels without the invoke glue: `conveyor release -f channels/X.yaml`
and `conveyor diff -f channels/X.yaml`, reading their channel files as they are.

Releases run in file order, as invoke ran them, and stop at the first failure: for helm,
`helm dependency update` then `helm upgrade NAME CHART --install --namespace NS
--values ... --reset-values`; for kustomize, the rendered directory applied server-side.
Every input is checked before anything is applied. The diff compares with the live
cluster through a server-side dry run (not Helm's stored release, which they asked
about) and masks Secrets; it is the pull-request comment their workflow posts: two
header lines, then one fenced diff, or "No changes found for <channel>".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.cluster.apply import ApplyError, apply_objects
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.diff import diff_objects
from conveyor.cluster.objects import Obj
from conveyor.config.channel import Channel, ChannelRelease
from conveyor.config.helmrelease import parse_duration
from conveyor.config.project import ConfigError
from conveyor.config.userfile import UserFileError, load_documents, read_text
from conveyor.errors import ConveyorError
from conveyor.reconcile.plan import PlanDiff, namespaced, render_text
from conveyor.render.discover import KUSTOMIZATION_FILES
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError, parse_manifest
from conveyor.render.kustomize import render_kustomization
from conveyor.source.git import GitError, repository_root


class ReleaseFailed(ConveyorError, RuntimeError):
    """A release of the channel failed; the ones before it were applied."""


@dataclass(frozen=True)
class ChannelFiles:
    """Where a channel's paths and secrets are."""

    root: Path  # the git repository root, which the channel's paths are relative to
    secrets_dir: Path | None  # `<name>.yaml` for each of `secrets` and `secret_helm_values`


@dataclass(frozen=True)
class ReleaseOutcome:
    name: str
    driver: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver, "detail": self.detail}


def channel_root(channel: Channel, cwd: Path) -> Path:
    """As invoke found it: the git repository holding `git_repo` (default the cwd)."""
    start = (cwd / channel.git_repo).resolve() if channel.git_repo else cwd.resolve()
    try:
        return repository_root(start)
    except (GitError, OSError):
        return start


def _secret_file(files: ChannelFiles, name: str) -> Path:
    if files.secrets_dir is None:
        raise ConfigError(f"secret {name!r} is named but no secrets directory is given")
    for suffix in (".yaml", ".yml"):
        path = files.secrets_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    raise ConfigError(f"secret {name!r} not found in {files.secrets_dir} (as {name}.yaml)")


def check_inputs(releases: list[ChannelRelease], files: ChannelFiles) -> None:
    """Every chart, values file, kustomization and secret exists: ConfigError otherwise,
    before anything is applied."""
    for release in releases:
        where = f"release {release.name}"
        if release.driver == "helm":
            chart = files.root / str(release.helm_chart)
            if not (chart / "Chart.yaml").is_file():
                raise ConfigError(f"{where}: no chart at {release.helm_chart} (no Chart.yaml)")
            for values in release.helm_values:
                if not (files.root / values).is_file():
                    raise ConfigError(f"{where}: values file {values} does not exist")
            if release.timeout is not None:
                parse_duration(release.timeout, default=0)
        else:
            directory = files.root / str(release.kustomize_dir)
            if not any((directory / n).is_file() for n in KUSTOMIZATION_FILES):
                raise ConfigError(f"{where}: no kustomization in {release.kustomize_dir}")
        for name in [*release.secrets, *release.secret_helm_values]:
            _secret_file(files, name)


def _secrets(release: ChannelRelease, files: ChannelFiles) -> list[Obj]:
    objects = []
    for name in release.secrets:
        path = _secret_file(files, name)
        try:
            documents = [d.data for d in load_documents(read_text(path), file=None) if d.data]
        except UserFileError:
            raise ConfigError(f"secret {name!r}: not valid YAML") from None  # never echo it
        for document in documents:
            if not isinstance(document, dict) or not isinstance(
                document.setdefault("metadata", {}), dict
            ):
                raise ConfigError(f"secret {name!r}: a document is not a Kubernetes object")
            metadata = document.setdefault("metadata", {})
            if not metadata.get("namespace"):
                if not release.namespace:
                    raise ConfigError(f"secret {name!r} has no namespace and the release none")
                metadata["namespace"] = release.namespace
            objects.append(document)
    return objects


async def _objects(release: ChannelRelease, files: ChannelFiles, helm: HelmCLI) -> list[Obj]:
    """What the release would apply: its secrets, then its chart or kustomization."""
    objects = _secrets(release, files)
    if release.driver == "helm":
        chart = files.root / str(release.helm_chart)
        await helm.dependency_update(chart)
        manifest = await helm.template(
            str(release.helm_name),
            str(release.namespace),
            str(chart),
            {},
            values_files=_values_files(release, files),
        )
        return objects + namespaced(parse_manifest(manifest), str(release.namespace))
    documents = await render_kustomization(
        files.root / str(release.kustomize_dir), repo_root=files.root
    )
    return objects + [d.obj for d in documents]


async def _missing_namespace(kube: KubeClient, release: ChannelRelease) -> list[Obj]:
    """The release's Namespace, when its secrets come before Helm would create it."""
    if await kube.get("v1", "Namespace", str(release.namespace)) is not None:
        return []
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": release.namespace}}]


def _values_files(release: ChannelRelease, files: ChannelFiles) -> list[Path]:
    return [files.root / v for v in release.helm_values] + [
        _secret_file(files, name) for name in release.secret_helm_values
    ]


async def release_channel(
    channel: Channel,
    releases: list[ChannelRelease],
    *,
    files: ChannelFiles,
    kube: KubeClient,
    helm: HelmCLI,
    progress: Callable[[str], None] | None = None,
) -> list[ReleaseOutcome]:
    """Apply the releases in order. ConfigError (nothing applied) for a missing input;
    ReleaseFailed naming the release that failed."""
    say = progress or (lambda _m: None)
    check_inputs(releases, files)
    outcomes = []
    for release in releases:
        say(f"releasing {release.name} ({release.driver})")
        try:
            secrets = _secrets(release, files)
            if release.driver == "helm":
                if secrets:
                    await apply_objects(kube, [*await _missing_namespace(kube, release), *secrets])
                chart = files.root / str(release.helm_chart)
                await helm.dependency_update(chart)
                installed = await helm.upgrade_install(
                    str(release.helm_name),
                    str(release.namespace),
                    str(chart),
                    {},
                    timeout=parse_duration(release.timeout, default=300.0),
                    description=f"conveyor release {channel.channel}",
                    values_files=_values_files(release, files),
                )
                detail = (
                    f"helm release {release.namespace}/{release.helm_name} "
                    f"revision {installed.get('version')}"
                )
            else:
                documents = await render_kustomization(
                    files.root / str(release.kustomize_dir), repo_root=files.root
                )
                # Together, so that a Namespace of the kustomization exists before its Secrets.
                await apply_objects(kube, [*secrets, *(d.obj for d in documents)])
                detail = f"applied {len(documents)} objects from {release.kustomize_dir}"
        except (HelmError, ApplyError, RenderError, ApiError, UnknownKindError) as error:
            raise ReleaseFailed(f"release {release.name} failed: {error}") from None
        if secrets:
            detail += f" (+{len(secrets)} secret objects)"
        outcomes.append(ReleaseOutcome(release.name, release.driver, detail))
    return outcomes


async def diff_channel(
    channel: Channel,
    releases: list[ChannelRelease],
    *,
    files: ChannelFiles,
    kube: KubeClient,
    helm: HelmCLI,
) -> list[PlanDiff]:
    """Per release, what `release` would change in the cluster (Secrets masked)."""
    check_inputs(releases, files)
    plans = []
    for release in releases:
        plan = PlanDiff(app=release.name)
        plans.append(plan)
        try:
            plan.changes = await diff_objects(kube, await _objects(release, files, helm))
        except HelmError as error:
            plan.error = f"helm {error.command}: {error.message}"
        except (RenderError, ApiError, UnknownKindError) as error:
            plan.error = str(error)
    return plans


def channel_comment(channel: Channel, plans: list[PlanDiff], *, cluster: str) -> str:
    """The pull-request comment: two header lines, then the fenced diff or "No changes"."""
    header = (
        f"## conveyor diff for channel `{channel.channel}`\n"
        f"Compared with the live cluster `{cluster}` by server-side dry run; "
        "Secret values are masked.\n\n"
    )
    text = render_text(plans)
    if not text:
        return f"{header}No changes found for {channel.channel}.\n"
    return f"{header}```diff\n{text}```\n"
