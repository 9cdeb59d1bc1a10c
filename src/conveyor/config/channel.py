"""cal-itp release channels, read as they are: `channels/<channel>.yaml` is invoke config
whose `calitp` key lists the channel's releases, run in file order.

    calitp:
      channel: test
      releases:
        - name: metabase
          driver: helm
          namespace: metabase-test
          helm_name: metabase-test
          helm_chart: kubernetes/apps/charts/metabase
          helm_values: [kubernetes/apps/values/metabase-test.yaml]
        - name: archiver
          driver: kustomize
          kustomize_dir: kubernetes/apps/overlays/archiver-test

Paths are relative to the root of the git repository (invoke found it from `git_repo`,
default the current directory). `secrets` and `secret_helm_values` name secrets the team
keeps outside git; conveyor reads them from a secrets directory as `<name>.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conveyor.config.project import ConfigError, safe_relative_path
from conveyor.config.userfile import load_document, read_text, validate


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChannelRelease(_Model):
    name: str
    driver: Literal["helm", "kustomize"]
    secrets: list[str] = Field(default_factory=list)
    namespace: str | None = None
    helm_name: str | None = None
    helm_chart: str | None = None
    helm_values: list[str] = Field(default_factory=list)
    secret_helm_values: list[str] = Field(default_factory=list)
    timeout: str | None = None
    kustomize_dir: str | None = None

    @field_validator("helm_values", mode="before")
    @classmethod
    def _colon_separated(cls, value: Any) -> Any:
        # The first invoke.yaml wrote several values files as one `a.yaml:b.yaml` string.
        return value.split(":") if isinstance(value, str) else value

    @field_validator("helm_chart", "kustomize_dir")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        return safe_relative_path(value) if value is not None else None

    @field_validator("helm_values")
    @classmethod
    def _all_inside(cls, value: list[str]) -> list[str]:
        return [safe_relative_path(v) for v in value]

    @model_validator(mode="after")
    def _driver_fields(self) -> ChannelRelease:
        needed = (
            ("namespace", "helm_name", "helm_chart")
            if self.driver == "helm"
            else ("kustomize_dir",)
        )
        missing = [f for f in needed if not getattr(self, f)]
        if missing:
            raise ValueError(f"a {self.driver} release needs {', '.join(missing)}")
        return self


class Channel(_Model):
    channel: str
    releases: list[ChannelRelease]
    git_repo: str | None = Field(None, description="Where the repository is, from the cwd.")

    def select(self, *, app: str | None = None, driver: str | None = None) -> list[ChannelRelease]:
        """Releases in file order, filtered as `--app` and `--driver` do."""
        if app is not None and app not in {r.name for r in self.releases}:
            known = ", ".join(r.name for r in self.releases)
            raise ConfigError(f"channel {self.channel} has no release {app!r} (has: {known})")
        return [
            r
            for r in self.releases
            if (app is None or r.name == app) and (driver is None or r.driver == driver)
        ]


def load_channel(path: Path) -> Channel:
    """Read a channel file; ConfigError (naming the file and line) when it is not one."""
    source = str(path)
    document = load_document(read_text(path), file=source)
    raw = document.data if document is not None else None
    section = raw.get("calitp") if isinstance(raw, dict) else None
    if document is None or not isinstance(section, dict):
        raise ConfigError(f"{path}: no `calitp:` section (channel, releases)")
    return validate(Channel, section, file=source, node=document.node, at=("calitp",))
