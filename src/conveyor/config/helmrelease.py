"""HelmRelease objects as the teams write them: Flux v1 (`helm.fluxcd.io/v1`) and
Flux v2 (`helm.toolkit.fluxcd.io/v2`, also v2beta1/v2beta2), read into one model.

conveyor renders both with the real `helm`; this module only says *what* to install:
which chart from where, which values, in which namespace, with which remediation. The
file is read through typed models of each version's fields, in the forms Flux accepts
(v1 `timeout` in seconds, v2 durations such as `5m`), so that a wrong field is one error
naming it, not an exception deep in the render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError

from conveyor.config.manifest import ObjectMeta
from conveyor.config.validation import (
    Argument,
    FileModel,
    JsonObject,
    ObjectName,
    OrNull,
    Text,
    describe,
    expected,
)
from conveyor.errors import ConveyorError

FLUX_V1_GROUP = "helm.fluxcd.io"
FLUX_V2_GROUP = "helm.toolkit.fluxcd.io"
HELMRELEASE_GROUPS = (FLUX_V1_GROUP, FLUX_V2_GROUP)

DriftMode = Literal["enabled", "warn", "disabled"]


class HelmReleaseError(ConveyorError, ValueError):
    """The HelmRelease is missing something it needs; the message names the field."""


@dataclass(frozen=True)
class ChartFromGit:
    url: str
    ref: str
    path: str


@dataclass(frozen=True)
class ChartFromRepository:
    """A chart from a Helm HTTP repository, or OCI when `url` starts with oci://."""

    url: str
    name: str
    version: str | None
    # How long a pull for a version range stays good (Flux: the source's spec.interval).
    refresh_seconds: float = 300.0


@dataclass(frozen=True)
class SourceRef:
    """A Flux v2 reference to a source object (GitRepository, HelmRepository,
    OCIRepository, or a HelmChart of one of them) defined in the same config repo."""

    kind: str
    name: str
    namespace: str
    chart: str | None = None  # the chart name or path inside the source
    version: str | None = None


@dataclass(frozen=True)
class ValuesReference:
    kind: Literal["ConfigMap", "Secret"]
    name: str
    namespace: str
    key: str
    target_path: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class HelmReleaseSpec:
    api_version: str
    name: str
    namespace: str
    release_name: str
    target_namespace: str
    chart: ChartFromGit | ChartFromRepository | SourceRef
    values: dict[str, Any]
    values_from: list[ValuesReference]
    depends_on: list[str] = field(default_factory=list)
    suspend: bool = False
    timeout_seconds: float = 300.0
    install_retries: int = 0
    upgrade_retries: int = 0
    rollback_on_failure: bool = True
    drift: DriftMode = "enabled"
    automated: bool = False
    # Flux v1 valuesFrom that conveyor does not read (a URL, a file inside the chart):
    # named, so that the render says what it left out.
    unread_values_from: list[str] = field(default_factory=list)
    # Flux v2 postRenderers: kustomize fields (patches, images) applied in order to
    # what the chart renders.
    post_renderers: list[dict[str, Any]] = field(default_factory=list)
    # Where Flux's helm-controller keeps the release (v2 `spec.storageNamespace`, else
    # the HelmRelease's namespace); conveyor's helm keeps it in `target_namespace`.
    flux_storage_namespace: str | None = None

    @property
    def flux_v1(self) -> bool:
        return self.api_version.startswith(FLUX_V1_GROUP + "/")


def is_helmrelease(obj: dict[str, Any]) -> bool:
    api_version = str(obj.get("apiVersion", ""))
    return obj.get("kind") == "HelmRelease" and api_version.split("/")[0] in HELMRELEASE_GROUPS


# Go's time.Duration is int64 nanoseconds: Flux refuses anything longer.
MAX_DURATION_SECONDS = (2**63 - 1) / 1e9
# Flux's CRD pattern for durations (Go's syntax without signs, `us` or `ns`).
_DURATION = re.compile(r"^(\d+(\.\d+)?(ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str | int | float | None, *, default: float) -> float:
    """Go durations as Flux writes them: `5m`, `1h30m`, `90s`, `300ms`; a number is
    seconds (conveyor has always taken one)."""
    if text is None or text == "":
        return default
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise HelmReleaseError(f"invalid duration of type {type(text).__name__}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        stripped = text.strip()
        if not _DURATION.match(stripped):
            unit = " (missing unit)" if stripped.replace(".", "").isdigit() else ""
            raise HelmReleaseError(f"invalid duration {text!r}{unit}")
        seconds = sum(
            float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(stripped)
        )
    if not 0 <= seconds <= MAX_DURATION_SECONDS:
        raise HelmReleaseError(f"duration {text!r} is out of range")
    return seconds


def _duration(value: Any) -> float:
    try:
        return parse_duration(value, default=0.0)
    except HelmReleaseError:
        raise expected("a duration such as 30s, 5m or 1h30m") from None


def _seconds(value: Any) -> int:
    # Flux v1: an integer number of seconds, and nothing else.
    if isinstance(value, bool) or not isinstance(value, int):
        raise expected("seconds")
    if not 0 <= value <= MAX_DURATION_SECONDS:
        raise expected("seconds", got=f"{value} (out of range)")
    return value


Duration = Annotated[float, BeforeValidator(_duration)]
Seconds = Annotated[int, BeforeValidator(_seconds)]
Retries = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # negative: retry forever (Flux)


# -- Flux v1: helm.fluxcd.io/v1 ----------------------------------------------------------


class _V1Chart(FileModel):
    git: Argument | None = None
    ref: Argument | None = None
    path: Text | None = None
    repository: Argument | None = None
    name: Argument | None = None
    version: Argument | None = None


class _V1KeyRef(FileModel):
    name: ObjectName
    namespace: ObjectName | None = None
    key: Text | None = None
    optional: bool = False


class _V1ExternalSource(FileModel):
    url: Text
    optional: bool = False


class _V1ChartFile(FileModel):
    path: Text
    optional: bool = False


class _V1ValuesFrom(FileModel):
    config_map_key_ref: _V1KeyRef | None = None
    secret_key_ref: _V1KeyRef | None = None
    external_source_ref: _V1ExternalSource | None = None
    chart_file_ref: _V1ChartFile | None = None


class _V1Rollback(FileModel):
    enable: bool = True


class _V1Spec(FileModel):
    release_name: Argument | None = None
    target_namespace: ObjectName | None = None
    chart: OrNull[_V1Chart] = Field(default_factory=_V1Chart)
    values: JsonObject | None = None
    values_from: list[_V1ValuesFrom] | None = None
    timeout: Seconds | None = None
    rollback: OrNull[_V1Rollback] = Field(default_factory=_V1Rollback)


class _V1Release(FileModel):
    metadata: ObjectMeta
    spec: OrNull[_V1Spec] = Field(default_factory=_V1Spec)


# -- Flux v2: helm.toolkit.fluxcd.io/v2 (and v2beta1, v2beta2) --------------------------


class _V2SourceRef(FileModel):
    kind: Literal["HelmRepository", "GitRepository", "Bucket"]
    name: ObjectName
    namespace: ObjectName | None = None


class _V2ChartSpec(FileModel):
    chart: Argument  # a chart name (to helm) or a path in a git source
    version: Argument | None = None
    source_ref: _V2SourceRef


class _V2Chart(FileModel):
    spec: _V2ChartSpec | None = None


class _V2ChartRef(FileModel):
    kind: Literal["OCIRepository", "HelmChart"]
    name: ObjectName
    namespace: ObjectName | None = None


class _V2ValuesFrom(FileModel):
    kind: Literal["ConfigMap", "Secret"]
    name: ObjectName
    values_key: Text | None = None
    target_path: Text | None = None
    optional: bool = False


class _V2Dependency(FileModel):
    name: ObjectName
    namespace: ObjectName | None = None


class _V2Remediation(FileModel):
    retries: Retries = 0
    strategy: Literal["rollback", "uninstall"] = "rollback"


class _V2Action(FileModel):
    remediation: OrNull[_V2Remediation] = Field(default_factory=_V2Remediation)


class _V2DriftDetection(FileModel):
    mode: DriftMode | None = None


class PatchTarget(FileModel):
    group: Text | None = None
    version: Text | None = None
    kind: Text | None = None
    name: Text | None = None
    namespace: Text | None = None
    label_selector: Text | None = None
    annotation_selector: Text | None = None


class Patch(FileModel):
    """A kustomize patch as Flux takes it: a strategic merge or JSON 6902 patch (YAML
    text), for the objects `target` selects."""

    patch: str
    target: PatchTarget | None = None


class Image(FileModel):
    name: Text
    new_name: Text | None = None
    new_tag: Text | None = None
    digest: Text | None = None


def kustomize_fields(patches: list[Patch] | None, images: list[Image] | None) -> dict[str, Any]:
    """`patches` and `images` as a kustomization.yaml holds them."""
    fields: dict[str, Any] = {}
    if patches:
        fields["patches"] = [p.model_dump(by_alias=True, exclude_none=True) for p in patches]
    if images:
        fields["images"] = [i.model_dump(by_alias=True, exclude_none=True) for i in images]
    return fields


class _V2Kustomize(FileModel):
    patches: list[Patch] | None = None
    images: list[Image] | None = None


class _V2PostRenderer(FileModel):
    kustomize: _V2Kustomize | None = None


class _V2Spec(FileModel):
    release_name: Argument | None = None
    target_namespace: ObjectName | None = None
    chart: _V2Chart | None = None
    chart_ref: _V2ChartRef | None = None
    values: JsonObject | None = None
    values_from: list[_V2ValuesFrom] | None = None
    depends_on: list[_V2Dependency] | None = None
    suspend: bool = False
    timeout: Duration | None = None
    install: OrNull[_V2Action] = Field(default_factory=_V2Action)
    upgrade: OrNull[_V2Action] = Field(default_factory=_V2Action)
    drift_detection: OrNull[_V2DriftDetection] = Field(default_factory=_V2DriftDetection)
    post_renderers: list[_V2PostRenderer] | None = None
    storage_namespace: ObjectName | None = None


class _V2Release(FileModel):
    metadata: ObjectMeta
    spec: OrNull[_V2Spec] = Field(default_factory=_V2Spec)


def parse_helmrelease(
    obj: dict[str, Any], *, default_namespace: str = "default"
) -> HelmReleaseSpec:
    """The release `obj` describes. HelmReleaseError names the first wrong field."""
    api_version = str(obj.get("apiVersion", ""))
    flux_v1 = api_version.startswith(FLUX_V1_GROUP + "/")
    try:
        if flux_v1:
            v1 = _V1Release.model_validate(obj)
            return _from_v1(api_version, v1, v1.metadata.namespace or default_namespace)
        v2 = _V2Release.model_validate(obj)
        return _from_v2(api_version, v2, v2.metadata.namespace or default_namespace)
    except ValidationError as error:
        raise HelmReleaseError(describe(error)) from None


def _automated(annotations: dict[str, str]) -> bool:
    return any(
        annotations.get(k, "").lower() == "true"
        for k in ("fluxcd.io/automated", "flux.weave.works/automated")
    )


def _drift(annotations: dict[str, str], spec_mode: DriftMode | None) -> DriftMode:
    # conveyor corrects drift by default; an annotation or Flux v2's field can say otherwise.
    mode = annotations.get("conveyor.dev/drift") or spec_mode or "enabled"
    if mode not in ("enabled", "warn", "disabled"):
        raise HelmReleaseError(
            f"metadata.annotations.conveyor.dev/drift: expected enabled, warn or disabled, "
            f"got {mode!r}"
        )
    return mode  # type: ignore[return-value]


def _from_v1(api_version: str, release: _V1Release, namespace: str) -> HelmReleaseSpec:
    name = release.metadata.name
    annotations = release.metadata.annotations or {}
    spec = release.spec
    chart = spec.chart
    parsed_chart: ChartFromGit | ChartFromRepository
    if chart.git:
        if not chart.path:
            raise HelmReleaseError("spec.chart.path is required")
        parsed_chart = ChartFromGit(url=chart.git, ref=chart.ref or "master", path=chart.path)
    elif chart.repository:
        if not chart.name:
            raise HelmReleaseError("spec.chart.name is required")
        parsed_chart = ChartFromRepository(
            url=chart.repository, name=chart.name, version=chart.version or None
        )
    else:
        raise HelmReleaseError("spec.chart needs either git+path or repository+name")
    values_from = []
    unread = []
    for index, entry in enumerate(spec.values_from or []):
        if entry.external_source_ref is not None:
            unread.append(f"spec.valuesFrom[{index}].externalSourceRef")
        if entry.chart_file_ref is not None:
            unread.append(f"spec.valuesFrom[{index}].chartFileRef")
        refs: tuple[tuple[_V1KeyRef | None, Literal["ConfigMap", "Secret"]], ...] = (
            (entry.config_map_key_ref, "ConfigMap"),
            (entry.secret_key_ref, "Secret"),
        )
        for ref, kind in refs:
            if ref is not None:
                values_from.append(
                    ValuesReference(
                        kind=kind,
                        name=ref.name,
                        namespace=ref.namespace or namespace,
                        key=ref.key or "values.yaml",
                        optional=ref.optional,
                    )
                )
    return HelmReleaseSpec(
        api_version=api_version,
        name=name,
        namespace=namespace,
        # Flux v1's default release name is <namespace>-<name>.
        release_name=spec.release_name or f"{namespace}-{name}",
        target_namespace=spec.target_namespace or namespace,
        chart=parsed_chart,
        values=spec.values or {},
        values_from=values_from,
        timeout_seconds=float(spec.timeout or 300),
        rollback_on_failure=spec.rollback.enable,
        drift=_drift(annotations, None),
        automated=_automated(annotations),
        unread_values_from=unread,
    )


def _from_v2(api_version: str, release: _V2Release, namespace: str) -> HelmReleaseSpec:
    name = release.metadata.name
    annotations = release.metadata.annotations or {}
    spec = release.spec
    parsed_chart: SourceRef
    if spec.chart_ref is not None:
        parsed_chart = SourceRef(
            kind=spec.chart_ref.kind,
            name=spec.chart_ref.name,
            namespace=spec.chart_ref.namespace or namespace,
        )
    elif spec.chart is not None and spec.chart.spec is not None:
        chart_spec = spec.chart.spec
        parsed_chart = SourceRef(
            kind=chart_spec.source_ref.kind,
            name=chart_spec.source_ref.name,
            namespace=chart_spec.source_ref.namespace or namespace,
            chart=chart_spec.chart,
            version=chart_spec.version or None,
        )
    else:
        raise HelmReleaseError("spec.chart.spec or spec.chartRef is required")
    values_from = [
        ValuesReference(
            kind=entry.kind,
            name=entry.name,
            namespace=namespace,
            key=entry.values_key or "values.yaml",
            target_path=entry.target_path or None,
            optional=entry.optional,
        )
        for entry in spec.values_from or []
    ]
    target = spec.target_namespace or namespace
    default_release = f"{target}-{name}" if spec.target_namespace else name
    upgrade = spec.upgrade.remediation
    return HelmReleaseSpec(
        api_version=api_version,
        name=name,
        namespace=namespace,
        release_name=spec.release_name or default_release,
        target_namespace=target,
        flux_storage_namespace=spec.storage_namespace or namespace,
        chart=parsed_chart,
        values=spec.values or {},
        values_from=values_from,
        depends_on=[d.name for d in spec.depends_on or []],
        suspend=spec.suspend,
        timeout_seconds=300.0 if spec.timeout is None else spec.timeout,
        install_retries=spec.install.remediation.retries,
        upgrade_retries=upgrade.retries,
        rollback_on_failure=upgrade.strategy == "rollback",
        drift=_drift(annotations, spec.drift_detection.mode),
        automated=_automated(annotations),
        post_renderers=[
            fields
            for renderer in spec.post_renderers or []
            if renderer.kustomize is not None
            and (fields := kustomize_fields(renderer.kustomize.patches, renderer.kustomize.images))
        ],
    )
