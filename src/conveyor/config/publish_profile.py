"""`.conveyor/publish.yaml` in an app repo: how its template is filled per environment.

Cellenics kept these differences (namespace, replicas, image filter, IAM role) in each
app's CI script; here they are data, so `conveyor publish` is the same step everywhere.
String values may use `{app}`, `{environment}`, `{version}`, `{ref_id}`, `{sha}`,
`{short_sha}` and `{source}`, and `{NAME}` for a declared placeholder that is kept as
the literal NAME for a later step to fill (e.g. `STAGING_SANDBOX_ID`).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from conveyor.config.project import ConfigError, Model
from conveyor.config.userfile import load_document, read_text, validate

DEFAULT_PATH = Path(".conveyor/publish.yaml")

# One path segment: app and environment names end up in file paths of the config repo.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_FILTER_KINDS = ("semver:", "glob:", "regex:")


def check_name(value: str, *, what: str) -> str:
    """A name that is safe as one path segment (no `/`, no `..`, not absolute)."""
    if not _NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a plain name (letters, digits, . _ -)")
    return value


class Scheme(StrEnum):
    """How a build's version and environments follow from its git event."""

    short_sha = "short-sha"  # Unileaf: main → short SHA to dev, release → semver to staging
    ref_id = "ref-id"  # Cellenics: REF_ID-based tags, production/staging/staging-candidates


class ConfigRepo(Model):
    url: str
    branch: str = "main"


class EnvironmentProfile(Model):
    path: str | None = Field(
        None, description="Destination in the config repo; default from the scheme's layout."
    )
    namespace: str | None = None
    replicas: int | None = Field(None, ge=0)
    filter: str | None = Field(
        None, description="Flux v1 tag filter for every filter.fluxcd.io/<container> annotation."
    )
    policy: dict[str, Any] | None = Field(None, description="Flux v2 ImagePolicy spec.policy.")
    chart_ref: str | None = Field(None, alias="chart-ref")
    values: dict[str, Any] = Field(
        default_factory=dict, description="`path: value` under the HelmRelease's spec.values."
    )
    set: dict[str, Any] = Field(
        default_factory=dict, description="`Kind[/name]:path: value` into any document."
    )

    @field_validator("filter")
    @classmethod
    def _known_filter(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_FILTER_KINDS):
            raise ValueError(f"filter {value!r} must start with semver:, glob: or regex:")
        return value


class PublishProfile(Model):
    app: str | None = None
    template: str = ".flux.yaml"
    scheme: Scheme = Scheme.ref_id
    placeholders: list[str] = Field(default_factory=list)
    config_repo: ConfigRepo | None = Field(None, alias="config-repo")
    environments: dict[str, EnvironmentProfile] = Field(default_factory=dict)

    @field_validator("app")
    @classmethod
    def _app_name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, what="app")

    @field_validator("environments")
    @classmethod
    def _environment_names(
        cls, value: dict[str, EnvironmentProfile]
    ) -> dict[str, EnvironmentProfile]:
        for name in value:
            check_name(name, what="environment")
        return value

    @field_validator("placeholders")
    @classmethod
    def _placeholder_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"placeholder {name!r} must be a plain identifier")
        return value

    def environment(self, name: str, *, source: str) -> EnvironmentProfile:
        if name not in self.environments:
            known = ", ".join(self.environments) or "none"
            raise ConfigError(f"{source}: no environment {name!r} (known: {known})")
        return self.environments[name]


def load_publish_profile(path: Path) -> PublishProfile:
    """Read the profile; a missing or malformed file is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: publish profile not found")
    document = load_document(read_text(path), file=str(path))
    if document is None or not document.data:
        return PublishProfile()
    return validate(PublishProfile, document.data, file=str(path), node=document.node)
