"""Resolve where a HelmRelease's chart comes from into a local chart and a digest.

Charts come from a git path (Flux v1 `chart.git`, Flux v2 GitRepository), a Helm
repository, or OCI. The digest (git tree id or archive SHA-256) is part of the app's
fingerprint, so an unchanged chart with unchanged values costs no Helm call at all.
Fetches are shared within a pass: 1000 releases of one chart repo fetch it once.
Every name, URL and ref is checked (`conveyor.config.names`) before git or helm sees it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from conveyor.config.helmrelease import (
    ChartFromGit,
    ChartFromRepository,
    HelmReleaseSpec,
    SourceRef,
)
from conveyor.config.names import (
    UnsafeValueError,
    chart_name,
    chart_path,
    chart_version,
    git_ref,
    git_url,
    helm_release_name,
    helm_repository_url,
    kubernetes_namespace,
)
from conveyor.config.sources import (
    CHART_SOURCES,
    GitReference,
    GitRepository,
    HelmChart,
    HelmRepository,
    OCIReference,
    parse_source,
)
from conveyor.config.validation import describe
from conveyor.render.documents import Document, RenderError
from conveyor.render.helm import HelmCLI, HelmError
from conveyor.source.git import GitError, export_tree, fetch_tree

_EXACT_VERSION = re.compile(r"^v?\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]+)?$")


@dataclass(frozen=True)
class ResolvedChart:
    path: str  # a local chart directory or .tgz that `helm` can install
    digest: str
    origin: str  # for messages: where it came from


class ChartResolver:
    def __init__(
        self, cache_dir: Path, helm: HelmCLI, sources: dict[tuple[str, str, str], Document]
    ) -> None:
        self.cache_dir = cache_dir
        self.helm = helm
        self.sources = sources
        self._memo: dict[tuple[str, ...], asyncio.Task[ResolvedChart]] = {}

    async def resolve(self, spec: HelmReleaseSpec) -> ResolvedChart:
        # The release's names reach helm too; refused here, where the caller knows the
        # HelmRelease's file and line, rather than by HelmCLI with no file to name.
        _check(helm_release_name, spec.release_name, "spec.releaseName")
        _check(kubernetes_namespace, spec.target_namespace, "spec.targetNamespace")
        chart, origin = spec.chart, None
        if isinstance(chart, SourceRef):
            origin = self.sources.get((chart.kind, chart.namespace, chart.name))
            chart = self._from_source(chart)
        _check_chart(chart, source=origin)
        key: tuple[str, ...]
        if isinstance(chart, ChartFromGit):
            key = ("git", chart.url, chart.ref, chart.path)
        else:
            key = ("repo", chart.url, chart.name, chart.version or "")
        if key not in self._memo:
            self._memo[key] = asyncio.ensure_future(self._resolve(chart))
        return await self._memo[key]

    async def _resolve(self, chart: ChartFromGit | ChartFromRepository) -> ResolvedChart:
        if isinstance(chart, ChartFromGit):
            resolved = await asyncio.to_thread(self._from_git, chart)
            if needs_dependency_build(Path(resolved.path)):
                try:
                    await self.helm.dependency_build(Path(resolved.path))
                except HelmError as error:
                    raise RenderError(f"chart {resolved.origin}: {error.message}") from None
            return resolved
        return await self._from_repository(chart)

    def _from_source(self, ref: SourceRef) -> ChartFromGit | ChartFromRepository:
        document = self.sources.get((ref.kind, ref.namespace, ref.name))
        if document is None:
            raise RenderError(
                f"{ref.kind} {ref.namespace}/{ref.name} is not defined in the repository"
            )

        def error(message: str) -> RenderError:
            return RenderError(
                f"{ref.kind} {ref.name}: {message}", file=document.file, line=document.line
            )

        if ref.kind not in CHART_SOURCES:
            raise error("charts from this kind of source are not supported")
        try:
            source = parse_source(ref.kind, document.obj)
        except ValidationError as invalid:
            raise error(describe(invalid)) from None
        if isinstance(source, HelmChart):
            # `chartRef: {kind: HelmChart}`: the HelmChart names the chart, its version and
            # the repository (or git source) it comes from.
            return self._from_source(
                SourceRef(
                    kind=source.spec.source_ref.kind,
                    name=source.spec.source_ref.name,
                    namespace=ref.namespace,
                    chart=source.spec.chart,
                    version=source.spec.version,
                )
            )
        if isinstance(source, GitRepository):
            return ChartFromGit(
                url=source.spec.url, ref=_git_revision(source, error), path=ref.chart or "."
            )
        refresh = source.spec.interval or 300.0
        if isinstance(source, HelmRepository):
            url = source.spec.url
            if source.spec.type == "oci" and not url.startswith("oci://"):
                url = "oci://" + url
            return ChartFromRepository(
                url=url, name=str(ref.chart), version=ref.version, refresh_seconds=refresh
            )
        oci_ref = source.spec.ref or OCIReference()
        base, _, name = source.spec.url.rstrip("/").rpartition("/")
        return ChartFromRepository(
            url=base,
            name=name,
            version=oci_ref.tag or oci_ref.semver or ref.version,
            refresh_seconds=refresh,
        )

    async def source_tree(self, kind: str, namespace: str, name: str) -> tuple[Path, str]:
        """The files of the GitRepository `namespace/name` defined in the repository (a
        Flux Kustomization's `sourceRef`), fetched like a chart from git, and where it
        came from. RenderError names the source's file and line when it cannot be."""
        document = self.sources.get((kind, namespace, name))
        if document is None:
            raise RenderError(f"{kind} {namespace}/{name} is not defined in the repository")

        def error(message: str) -> RenderError:
            return RenderError(f"{kind} {name}: {message}", file=document.file, line=document.line)

        if kind != "GitRepository":
            raise error(
                "only GitRepository sources can be built (conveyor fetches charts from OCI, "
                "not manifests)"
            )
        try:
            source = parse_source(kind, document.obj)
        except ValidationError as invalid:
            raise error(describe(invalid)) from None
        if not isinstance(source, GitRepository):
            raise error("not a GitRepository")
        location = ChartFromGit(url=source.spec.url, ref=_git_revision(source, error), path=".")
        _check_chart(location, source=document)
        target, commit = await asyncio.to_thread(self._git_export, location, folder="sources")
        return target, f"{location.url}@{commit[:12]}"

    def _git_export(self, chart: ChartFromGit, *, folder: str) -> tuple[Path, str]:
        """`chart.path` of `chart.ref` of the git repository, exported below the cache's
        `folder` (named by its tree id, so unchanged content is exported once)."""
        mirror = self.cache_dir / "git" / hashlib.sha256(chart.url.encode()).hexdigest()[:16]
        try:
            commit, tree = fetch_tree(mirror, chart.url, chart.ref, chart.path.strip("/") or ".")
        except GitError as error:
            raise RenderError(f"{chart.url}@{chart.ref}:{chart.path}: {error.stderr}") from None
        target = self.cache_dir / folder / f"git-{tree}"
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=self.cache_dir) as scratch:
                unpacked = export_tree(mirror, tree, Path(scratch) / "tree")
                target.parent.mkdir(parents=True, exist_ok=True)
                unpacked.rename(target)
        return target, commit

    def _from_git(self, chart: ChartFromGit) -> ResolvedChart:
        try:
            target, commit = self._git_export(chart, folder="charts")
        except RenderError as error:
            raise RenderError(f"chart {error.detail}") from None
        tree = target.name.removeprefix("git-")
        if not (target / "Chart.yaml").exists():
            raise RenderError(f"{chart.url}@{chart.ref}: {chart.path} has no Chart.yaml")
        return ResolvedChart(
            path=str(target), digest=f"git:{tree}", origin=f"{chart.url}@{commit[:12]}:{chart.path}"
        )

    async def _from_repository(self, chart: ChartFromRepository) -> ResolvedChart:
        exact = bool(chart.version and _EXACT_VERSION.match(chart.version))
        key = hashlib.sha256(f"{chart.url}|{chart.name}|{chart.version}".encode()).hexdigest()
        cached = self.cache_dir / "charts" / f"repo-{key[:24]}"
        # An exact version never changes; a range (or latest) is asked again once the
        # source's interval has passed, not on every pass.
        fresh = (
            cached.exists()
            and any(cached.glob("*.tgz"))
            and (exact or time.time() - cached.stat().st_mtime < chart.refresh_seconds)
        )
        if not fresh:
            scratch = Path(tempfile.mkdtemp(dir=self.cache_dir))
            try:
                if chart.url.startswith("oci://"):
                    archive = await self.helm.pull(
                        f"{chart.url.rstrip('/')}/{chart.name}",
                        destination=scratch,
                        version=chart.version,
                    )
                else:
                    archive = await self.helm.pull(
                        chart.name, destination=scratch, version=chart.version, repo=chart.url
                    )
            except HelmError as error:
                shutil.rmtree(scratch, ignore_errors=True)
                raise RenderError(f"chart {chart.name} from {chart.url}: {error.message}") from None
            cached.mkdir(parents=True, exist_ok=True)
            for old in cached.glob("*.tgz"):
                old.unlink()
            archive.rename(cached / archive.name)
            os.utime(cached)  # the pull's time, for the refresh interval
            shutil.rmtree(scratch, ignore_errors=True)
        archive = next(cached.glob("*.tgz"))
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        return ResolvedChart(
            path=str(archive),
            digest=f"sha256:{digest}",
            origin=f"{chart.url}/{chart.name}:{archive.stem}",
        )


def _git_revision(source: GitRepository, error: Callable[[str], RenderError]) -> str:
    """The ref of a GitRepository, by Flux's precedence: commit, name, tag, branch."""
    git_ref = source.spec.ref or GitReference()
    if git_ref.semver and not (git_ref.commit or git_ref.name):
        raise error("spec.ref.semver is not supported; name a tag or branch")
    return git_ref.commit or git_ref.name or git_ref.tag or git_ref.branch or "master"


def needs_dependency_build(chart_dir: Path) -> bool:
    chart_file = chart_dir / "Chart.yaml"
    if not chart_file.exists():
        return False
    dependencies = (yaml.safe_load(chart_file.read_text()) or {}).get("dependencies") or []
    return bool(dependencies) and not (chart_dir / "charts").exists()


def _check(
    rule: Callable[..., str], value: object, what: str, *, source: Document | None = None
) -> None:
    """RenderError when `value` breaks `rule`; `source` is the Flux source it came from."""
    try:
        rule(value, what=what)
    except UnsafeValueError as error:
        raise RenderError(f"{source.where()}: {error}" if source else str(error)) from None


def _check_chart(
    chart: ChartFromGit | ChartFromRepository, *, source: Document | None = None
) -> None:
    """RenderError unless the chart's URL, ref, path, name and version are safe to pass
    to git and helm; `source` is the Flux source (or HelmChart) the HelmRelease names."""
    if isinstance(chart, ChartFromGit):
        _check(git_url, chart.url, "chart git URL", source=source)
        _check(git_ref, chart.ref, "chart ref", source=source)
        _check(chart_path, chart.path, "chart path", source=source)
        return
    _check(helm_repository_url, chart.url, "chart repository URL", source=source)
    _check(chart_name, chart.name, "chart name", source=source)
    if chart.version is not None:
        _check(chart_version, chart.version, "chart version", source=source)
