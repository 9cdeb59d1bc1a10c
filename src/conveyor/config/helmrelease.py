"""HelmRelease objects as the teams write them: Flux v1 (`helm.fluxcd.io/v1`) and
Flux v2 (`helm.toolkit.fluxcd.io/v2`, also v2beta1/v2beta2), read into one model.

conveyor renders both with the real `helm`; this module only says *what* to install:
which chart from where, which values, in which namespace, with which remediation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FLUX_V1_GROUP = "helm.fluxcd.io"
FLUX_V2_GROUP = "helm.toolkit.fluxcd.io"
HELMRELEASE_GROUPS = (FLUX_V1_GROUP, FLUX_V2_GROUP)

DriftMode = Literal["enabled", "warn", "disabled"]


class HelmReleaseError(ValueError):
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

    @property
    def flux_v1(self) -> bool:
        return self.api_version.startswith(FLUX_V1_GROUP + "/")


def is_helmrelease(obj: dict[str, Any]) -> bool:
    api_version = str(obj.get("apiVersion", ""))
    return obj.get("kind") == "HelmRelease" and api_version.split("/")[0] in HELMRELEASE_GROUPS


def parse_duration(text: str | int | float | None, *, default: float) -> float:
    """Go durations as Flux writes them: `5m`, `1h30m`, `90s`, `300ms`."""
    if text is None or text == "":
        return default
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total, number = 0.0, ""
    rest = text.strip()
    while rest:
        if rest[0].isdigit() or rest[0] == ".":
            number += rest[0]
            rest = rest[1:]
            continue
        unit = "ms" if rest.startswith("ms") else rest[0]
        if unit not in units or not number:
            raise HelmReleaseError(f"invalid duration {text!r}")
        total += float(number) * units[unit]
        number, rest = "", rest[len(unit) :]
    if number:
        raise HelmReleaseError(f"invalid duration {text!r} (missing unit)")
    return total


def _required(mapping: dict[str, Any], key: str, where: str) -> Any:
    value = mapping.get(key)
    if value in (None, ""):
        raise HelmReleaseError(f"{where}.{key} is required")
    return value


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HelmReleaseError(f"{where} must be a mapping")
    return value


def parse_helmrelease(
    obj: dict[str, Any], *, default_namespace: str = "default"
) -> HelmReleaseSpec:
    metadata = _dict(obj.get("metadata"), "metadata")
    spec = _dict(obj.get("spec"), "spec")
    name = str(_required(metadata, "name", "metadata"))
    namespace = str(metadata.get("namespace") or default_namespace)
    annotations = _dict(metadata.get("annotations"), "metadata.annotations")
    if str(obj.get("apiVersion", "")).startswith(FLUX_V1_GROUP + "/"):
        return _parse_v1(obj, spec, name, namespace, annotations)
    return _parse_v2(obj, spec, name, namespace, annotations)


def _automated(annotations: dict[str, Any]) -> bool:
    return any(
        str(annotations.get(k, "")).lower() == "true"
        for k in ("fluxcd.io/automated", "flux.weave.works/automated")
    )


def _drift(annotations: dict[str, Any], spec_mode: str | None) -> DriftMode:
    # conveyor corrects drift by default; an annotation or Flux v2's field can say otherwise.
    mode = str(annotations.get("conveyor.dev/drift") or spec_mode or "enabled")
    if mode not in ("enabled", "warn", "disabled"):
        raise HelmReleaseError(f"drift mode must be enabled, warn or disabled, not {mode!r}")
    return mode  # type: ignore[return-value]


def _parse_v1(
    obj: dict[str, Any],
    spec: dict[str, Any],
    name: str,
    namespace: str,
    annotations: dict[str, Any],
) -> HelmReleaseSpec:
    chart = _dict(spec.get("chart"), "spec.chart")
    parsed_chart: ChartFromGit | ChartFromRepository
    if chart.get("git"):
        parsed_chart = ChartFromGit(
            url=str(chart["git"]),
            ref=str(chart.get("ref") or "master"),
            path=str(_required(chart, "path", "spec.chart")),
        )
    elif chart.get("repository"):
        parsed_chart = ChartFromRepository(
            url=str(chart["repository"]),
            name=str(_required(chart, "name", "spec.chart")),
            version=str(chart["version"]) if chart.get("version") else None,
        )
    else:
        raise HelmReleaseError("spec.chart needs either git+path or repository+name")
    values_from = []
    ref_kinds: tuple[tuple[str, Literal["ConfigMap", "Secret"]], ...] = (
        ("configMapKeyRef", "ConfigMap"),
        ("secretKeyRef", "Secret"),
    )
    for i, entry in enumerate(spec.get("valuesFrom") or []):
        for ref_key, kind in ref_kinds:
            if ref := entry.get(ref_key):
                values_from.append(
                    ValuesReference(
                        kind=kind,
                        name=str(_required(ref, "name", f"spec.valuesFrom[{i}].{ref_key}")),
                        namespace=str(ref.get("namespace") or namespace),
                        key=str(ref.get("key") or "values.yaml"),
                        optional=bool(ref.get("optional", False)),
                    )
                )
    target = str(spec.get("targetNamespace") or namespace)
    return HelmReleaseSpec(
        api_version=str(obj["apiVersion"]),
        name=name,
        namespace=namespace,
        # Flux v1's default release name is <namespace>-<name>.
        release_name=str(spec.get("releaseName") or f"{namespace}-{name}"),
        target_namespace=target,
        chart=parsed_chart,
        values=_dict(spec.get("values"), "spec.values"),
        values_from=values_from,
        timeout_seconds=float(spec.get("timeout") or 300),
        rollback_on_failure=bool(_dict(spec.get("rollback"), "spec.rollback").get("enable", True)),
        drift=_drift(annotations, None),
        automated=_automated(annotations),
    )


def _parse_v2(
    obj: dict[str, Any],
    spec: dict[str, Any],
    name: str,
    namespace: str,
    annotations: dict[str, Any],
) -> HelmReleaseSpec:
    parsed_chart: SourceRef
    if chart_ref := spec.get("chartRef"):
        parsed_chart = SourceRef(
            kind=str(_required(chart_ref, "kind", "spec.chartRef")),
            name=str(_required(chart_ref, "name", "spec.chartRef")),
            namespace=str(chart_ref.get("namespace") or namespace),
        )
    else:
        chart_spec = _dict(_dict(spec.get("chart"), "spec.chart").get("spec"), "spec.chart.spec")
        if not chart_spec:
            raise HelmReleaseError("spec.chart.spec or spec.chartRef is required")
        source = _dict(chart_spec.get("sourceRef"), "spec.chart.spec.sourceRef")
        parsed_chart = SourceRef(
            kind=str(_required(source, "kind", "spec.chart.spec.sourceRef")),
            name=str(_required(source, "name", "spec.chart.spec.sourceRef")),
            namespace=str(source.get("namespace") or namespace),
            chart=str(_required(chart_spec, "chart", "spec.chart.spec")),
            version=str(chart_spec["version"]) if chart_spec.get("version") else None,
        )
    values_from = []
    for i, entry in enumerate(spec.get("valuesFrom") or []):
        kind = entry.get("kind")
        if kind not in ("ConfigMap", "Secret"):
            raise HelmReleaseError(f"spec.valuesFrom[{i}].kind must be ConfigMap or Secret")
        values_from.append(
            ValuesReference(
                kind=kind,
                name=str(_required(entry, "name", f"spec.valuesFrom[{i}]")),
                namespace=namespace,
                key=str(entry.get("valuesKey") or "values.yaml"),
                target_path=entry.get("targetPath"),
                optional=bool(entry.get("optional", False)),
            )
        )
    target = str(spec.get("targetNamespace") or namespace)
    default_release = f"{target}-{name}" if spec.get("targetNamespace") else name
    install = _dict(spec.get("install"), "spec.install")
    upgrade = _dict(spec.get("upgrade"), "spec.upgrade")
    install_remediation = _dict(install.get("remediation"), "spec.install.remediation")
    upgrade_remediation = _dict(upgrade.get("remediation"), "spec.upgrade.remediation")
    drift_detection = _dict(spec.get("driftDetection"), "spec.driftDetection")
    depends_on = [str(_required(d, "name", "spec.dependsOn")) for d in spec.get("dependsOn") or []]
    return HelmReleaseSpec(
        api_version=str(obj["apiVersion"]),
        name=name,
        namespace=namespace,
        release_name=str(spec.get("releaseName") or default_release),
        target_namespace=target,
        chart=parsed_chart,
        values=_dict(spec.get("values"), "spec.values"),
        values_from=values_from,
        depends_on=depends_on,
        suspend=bool(spec.get("suspend", False)),
        timeout_seconds=parse_duration(spec.get("timeout"), default=300.0),
        install_retries=int(install_remediation.get("retries", 0)),
        upgrade_retries=int(upgrade_remediation.get("retries", 0)),
        rollback_on_failure=upgrade_remediation.get("strategy", "rollback") == "rollback",
        drift=_drift(annotations, drift_detection.get("mode")),
        automated=_automated(annotations),
    )
