"""`conveyor.yaml` at the root of a config repo: environments, and repository policy.

The file is optional: without it, `--path` picks the folder to reconcile. Environments
are listed in promotion order (dev → staging → production).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conveyor.config.gates import Gate

FILE_NAME = "conveyor.yaml"


class ConfigError(ValueError):
    """conveyor.yaml is missing something or malformed; the message names the file."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Cluster(Model):
    context: str | None = None
    kubeconfig: str | None = None


class Environment(Model):
    name: str
    path: str = Field(description="Folder of the config repo that this environment applies.")
    branch: str = "main"
    cluster: Cluster = Field(default_factory=Cluster)
    gates: list[Gate] = Field(
        default_factory=list, description="Checked before a new version is applied here."
    )

    @field_validator("path")
    @classmethod
    def _inside_repo(cls, value: str) -> str:
        return safe_relative_path(value)


class Guard(Model):
    """Who may change which files: `conveyor guard` checks pull requests and pushes."""

    protected: list[str] = Field(
        default_factory=lambda: ["**"], description="Globs of files only `identities` change."
    )
    allow: list[str] = Field(
        default_factory=lambda: ["**/*.md"],
        description="Globs anyone may change even inside `protected` (documentation).",
    )
    identities: list[str] = Field(
        default_factory=list, description="Names, emails or globs of the allowed identities."
    )
    readme: str = Field("README.md", description="Where a rejected pull request is pointed.")


class Project(Model):
    environments: list[Environment] = Field(default_factory=list)
    guard: Guard = Field(default_factory=Guard)

    def environment(self, name: str) -> Environment:
        for env in self.environments:
            if env.name == name:
                return env
        known = ", ".join(e.name for e in self.environments) or "none"
        raise ConfigError(f"{FILE_NAME}: unknown environment {name!r} (known: {known})")

    def previous(self, env: Environment) -> Environment | None:
        """The environment before `env` in promotion order, if any."""
        index = next(i for i, e in enumerate(self.environments) if e.name == env.name)
        return self.environments[index - 1] if index > 0 else None

    @field_validator("environments")
    @classmethod
    def _unique_names(cls, value: list[Environment]) -> list[Environment]:
        names = [e.name for e in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"environment names must be unique: {', '.join(duplicates)}")
        for env in value:
            for gate in env.gates:
                other = getattr(gate, "environment", None)
                if other is not None and other not in names:
                    raise ValueError(
                        f"{env.name}: gate {gate.label} names unknown environment {other!r}"
                    )
        return value


def safe_relative_path(value: str) -> str:
    """A path inside the repository: relative, no `..`, normalized to posix form."""
    path = PurePosixPath(value.strip())
    if path.is_absolute() or ".." in path.parts or str(path).startswith("~"):
        raise ValueError(f"path {value!r} must stay inside the repository")
    return str(path)


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field, for messages that must fit on one line."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())


def parse_project(text: str, *, source: str) -> Project:
    """Parse conveyor.yaml text; `source` names it in errors (a path, or `rev:path`)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from None
    try:
        return Project.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe_validation_error(error)}") from None


def load_project(repo_root: Path) -> Project:
    """Read conveyor.yaml from a checkout; an absent file gives an empty project."""
    path = repo_root / FILE_NAME
    if not path.exists():
        return Project()
    return parse_project(path.read_text(), source=str(path))
