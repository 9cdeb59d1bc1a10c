"""Flux v2 source objects that say where a HelmRelease's chart comes from: GitRepository,
HelmRepository, OCIRepository and HelmChart (`source.toolkit.fluxcd.io`).

Only the fields that locate a chart are read; their values reach git and helm command
lines, so they are typed here (see `Argument`) rather than trusted as they come.
"""

from __future__ import annotations

from typing import Any, Literal

from conveyor.config.helmrelease import Duration
from conveyor.config.manifest import ObjectMeta
from conveyor.config.validation import Argument, FileModel, ObjectName, Text


class _Source(FileModel):
    metadata: ObjectMeta


class GitReference(FileModel):
    branch: Argument | None = None
    tag: Argument | None = None
    semver: Text | None = None
    name: Argument | None = None
    commit: Argument | None = None


class GitRepositorySpec(FileModel):
    url: Argument
    ref: GitReference | None = None
    interval: Duration | None = None


class GitRepository(_Source):
    spec: GitRepositorySpec


class HelmRepositorySpec(FileModel):
    url: Argument
    type: Literal["default", "oci"] | None = None
    interval: Duration | None = None


class HelmRepository(_Source):
    spec: HelmRepositorySpec


class OCIReference(FileModel):
    tag: Argument | None = None
    semver: Argument | None = None
    digest: Argument | None = None


class OCIRepositorySpec(FileModel):
    url: Argument
    ref: OCIReference | None = None
    interval: Duration | None = None


class OCIRepository(_Source):
    spec: OCIRepositorySpec


class HelmChartSourceRef(FileModel):
    kind: Literal["HelmRepository", "GitRepository", "Bucket"]
    name: ObjectName


class HelmChartSpec(FileModel):
    chart: Argument
    version: Argument | None = None
    source_ref: HelmChartSourceRef
    interval: Duration | None = None


class HelmChart(_Source):
    spec: HelmChartSpec


FluxSource = GitRepository | HelmRepository | OCIRepository | HelmChart
CHART_SOURCES: dict[str, type[FluxSource]] = {
    "GitRepository": GitRepository,
    "HelmRepository": HelmRepository,
    "OCIRepository": OCIRepository,
    "HelmChart": HelmChart,
}


def parse_source(kind: str, obj: dict[str, Any]) -> FluxSource:
    """The source `obj` typed as `kind`, one of CHART_SOURCES. Raises pydantic's
    ValidationError (see `describe`)."""
    return CHART_SOURCES[kind].model_validate(obj)
