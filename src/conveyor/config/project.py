"""`conveyor.yaml` at the root of a config repo: environments, repository policy,
notification rules, and which gates judge a rollback or a configuration change.

The file is optional: without it, `--path` picks the folder to reconcile, and `--env
NAME` the folder `NAME/` or `releases/NAME/`, the layouts the teams keep. Environments
are listed in promotion order (dev → staging → production).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from conveyor.config.gates import Gate
from conveyor.config.helmrelease import parse_duration
from conveyor.config.userfile import ConfigError as ConfigError
from conveyor.config.userfile import load_document, read_text, validate
from conveyor.config.validation import ObjectName

FILE_NAME = "conveyor.yaml"
# Where an environment that no conveyor.yaml declares lives, in the order tried.
ENVIRONMENT_FOLDERS = ("{name}", "releases/{name}")

log = logging.getLogger("conveyor.config")
_ANNOUNCED: set[tuple[Path, str]] = set()


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Cluster(Model):
    context: str | None = None
    kubeconfig: str | None = None


class DecryptionSecret(Model):
    name: ObjectName
    namespace: ObjectName = "conveyor-system"


class Decryption(Model):
    """Where the age keys for this environment's SOPS-encrypted files are: the `*.agekey`
    entries of a Secret in its cluster, as a Flux Kustomization's `spec.decryption`."""

    provider: Literal["sops"] = "sops"
    secret_ref: DecryptionSecret = Field(alias="secretRef")


class Environment(Model):
    name: str
    path: str = Field(description="Folder of the config repo that this environment applies.")
    branch: str = Field(
        "main",
        description="Branch of the config repo; when unset, the repository's default branch "
        "(its HEAD) where the reader knows it (see `load_project`).",
    )
    cluster: Cluster = Field(default_factory=Cluster)
    gates: list[Gate] = Field(
        default_factory=list, description="Checked before a new version is applied here."
    )
    decryption: Decryption | None = Field(
        None, description="SOPS keys from the cluster (else the agent's own, see README)."
    )

    @field_validator("path")
    @classmethod
    def _inside_repo(cls, value: str) -> str:
        return safe_relative_path(value)


# Gates that judge a version by the previous environment: a rollback goes back to a
# version this environment ran, and a configuration change keeps its version, so
# neither can be judged by them.
PREVIOUS_ENVIRONMENT_GATES = ("soak", "healthy")


class ChangeGates(Model):
    """The gates (by type, or by a gate's `name`) of each environment that also judge
    one kind of change besides a new release; none unless listed."""

    gates: list[str] = Field(
        default_factory=list,
        description="Types (approval, http, queue-empty) or names of gates of the environment.",
    )

    @field_validator("gates")
    @classmethod
    def _not_about_versions(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry in PREVIOUS_ENVIRONMENT_GATES:
                raise ValueError(
                    f"{entry!r} judges a new version by the previous environment; it "
                    "cannot judge a change to a version this environment ran or keeps "
                    "(list approval, http, queue-empty, or a gate's name)"
                )
        return value

    def selects(self, gate: Gate) -> bool:
        return gate.type not in PREVIOUS_ENVIRONMENT_GATES and (
            gate.type in self.gates or (gate.name is not None and gate.name in self.gates)
        )


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


NotificationEvent = Literal[
    "applied", "failed", "drift-corrected", "waiting-for-gate", "promoted", "rolled-back"
]


SECRETS_DIR_ENV = "CONVEYOR_SECRETS_DIR"
SECRET_ENV_PREFIX = "CONVEYOR_"  # noqa: S105 (a name prefix, not a secret)


class Secret(Model):
    """A secret that stays out of git: a file or an environment variable of the agent.

    conveyor.yaml comes from git, so it may only name secrets meant for it: files inside
    `$CONVEYOR_SECRETS_DIR` (default /etc/conveyor/secrets) and variables named
    `CONVEYOR_*`, never the agent's own credentials.
    """

    file: str | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        if bool(self.file) == bool(self.env):
            raise ValueError("a secret needs exactly one of file, env")
        if self.env and not self.env.startswith(SECRET_ENV_PREFIX):
            raise ValueError(f"secret variables must be named {SECRET_ENV_PREFIX}*")
        return self

    def read(self) -> str:
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} (a secret) is not set")
            return value.strip()
        base = Path(os.environ.get(SECRETS_DIR_ENV, "/etc/conveyor/secrets")).resolve()
        path = (base / str(self.file)).resolve()
        if not path.is_relative_to(base):
            raise ConfigError(f"secret file {self.file} is outside {base} (${SECRETS_DIR_ENV})")
        try:
            return path.read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read secret file {path}: {error.strerror}") from None
        except UnicodeDecodeError:  # the loader's message would show a byte of the secret
            raise ConfigError(f"secret file {path} is not UTF-8 text") from None


class WebhookSink(Model):
    """Generic JSON webhook, signed like GitHub's: `X-Conveyor-Signature-256: sha256=<hmac>`."""

    url: str
    secret: Secret | None = None


class SlackSink(Model):
    """A Slack-compatible incoming webhook: `{"text": ...}`. The URL itself is the secret."""

    url: str | None = None
    url_from: Secret | None = Field(None, alias="url-from")


class GitStatusSink(Model):
    """GitHub-compatible commit statuses: `POST {api}/repos/{repository}/statuses/{sha}`."""

    api: str = Field("https://api.github.com", description="Base URL of the API.")
    repository: str = Field(description="owner/name of the config repository.")
    token: Secret
    context: str = Field("conveyor/{environment}", description="Status context template.")


class NotificationRule(Model):
    events: list[NotificationEvent] = Field(
        default_factory=lambda: list(get_args(NotificationEvent)),
        description="Which events to send (all when not given).",
    )
    environments: list[str] = Field(
        default_factory=list, description="Only these environments (all when empty)."
    )
    webhook: WebhookSink | None = None
    slack: SlackSink | None = None
    git_status: GitStatusSink | None = Field(None, alias="git-status")

    @model_validator(mode="after")
    def _one_sink(self) -> NotificationRule:
        sinks = [s for s in (self.webhook, self.slack, self.git_status) if s is not None]
        if len(sinks) != 1:
            raise ValueError("a notification rule needs exactly one of webhook, slack, git-status")
        if self.slack is not None and bool(self.slack.url) == bool(self.slack.url_from):
            raise ValueError("slack needs exactly one of url, url-from")
        return self

    def matches(self, event: str, environment: str) -> bool:
        return event in self.events and (not self.environments or environment in self.environments)


class SandboxPlaceholders(Model):
    """The markers CI leaves in a candidate for `conveyor stage` to fill."""

    sandbox_id: str = Field("STAGING_SANDBOX_ID", alias="sandbox-id")
    rds_id: str = Field(
        "STAGING_RDS_SANDBOX_ID",
        alias="rds-id",
        description="Filled with the sandbox's ID with --with-rds, else `rds-default`.",
    )
    chart_ref: str = Field("STAGING_CHART_REF", alias="chart-ref")


class SandboxHooks(Model):
    """Commands run for what a sandbox needs outside Kubernetes (a database, a topic), each
    an argument list (never a shell line), with `SANDBOX_ID` in its environment."""

    create: list[list[str]] = Field(default_factory=list)
    delete: list[list[str]] = Field(default_factory=list)
    timeout: float = Field(600.0, gt=0, description="Seconds each command may take.")

    @field_validator("create", "delete")
    @classmethod
    def _commands(cls, value: list[list[str]]) -> list[list[str]]:
        for command in value:
            if not command or not command[0]:
                raise ValueError("a hook is a non-empty list: the program, then its arguments")
        return value


SANDBOX_ID_MAX = 26
SANDBOX_ID_PATTERN = r"^[a-z0-9][-a-z0-9]*[a-z0-9]$"


class Sandboxes(Model):
    """Staging sandboxes (`conveyor stage`): where the candidates CI writes are, which
    apps a sandbox holds, and the markers to fill. The defaults are Cellenics' own."""

    env: str = Field("staging", description="The environment sandboxes live in.")
    candidates: str = Field(
        "staging-candidates", description="Folder of `<app>/<REF_ID>.yaml` candidates."
    )
    apps: list[ObjectName] = Field(default_factory=lambda: ["ui", "api", "worker", "pipeline"])
    default_branch: str = Field(
        "master", alias="default-branch", description="An app not named comes from here."
    )
    placeholders: SandboxPlaceholders = Field(default_factory=SandboxPlaceholders)
    rds_default: str = Field("default", alias="rds-default")
    namespace: str = Field("{app}-{id}", description="Where an app of a sandbox runs.")
    ttl: str | None = Field(None, description="Default lifetime (`72h`); none: no expiry.")
    auto: bool = Field(
        False, description="The agent stages a sandbox per pull-request candidate itself."
    )
    url: str | None = Field(
        None, description="The sandbox's address, `{id}` filled: https://ui-{id}.staging.example"
    )
    hooks: SandboxHooks = Field(default_factory=SandboxHooks)

    @field_validator("candidates")
    @classmethod
    def _inside_repo(cls, value: str) -> str:
        return safe_relative_path(value)

    @field_validator("ttl")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value, default=0.0)  # HelmReleaseError is a ValueError
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace_template(cls, value: str) -> str:
        if "{id}" not in value:
            raise ValueError("the namespace template must hold {id}: sandboxes need their own")
        try:
            value.format(app="app", id="id")
        except (KeyError, IndexError, ValueError):
            raise ValueError("the namespace template may use only {app} and {id}") from None
        return value


class Project(Model):
    environments: list[Environment] = Field(default_factory=list)
    sandboxes: Sandboxes = Field(default_factory=Sandboxes)
    guard: Guard = Field(default_factory=Guard)
    notifications: list[NotificationRule] = Field(default_factory=list)
    rollback: ChangeGates = Field(
        default_factory=ChangeGates,
        description="Gates that judge going back to a version the environment ran.",
    )
    config_change: ChangeGates = Field(
        default_factory=ChangeGates,
        alias="config-change",
        description="Gates that judge a change that keeps every app's release identity.",
    )

    # Set by `load_project`: the checkout, for environments that no conveyor.yaml declares.
    _root: Path | None = PrivateAttr(None)
    _default_branch: str | None = PrivateAttr(None)

    def environment(self, name: str) -> Environment:
        for env in self.environments:
            if env.name == name:
                return env
        if not self.environments and self._root is not None:
            return self._folder_environment(name, self._root)
        known = ", ".join(e.name for e in self.environments) or "none"
        raise ConfigError(f"{FILE_NAME}: unknown environment {name!r} (known: {known})")

    def _folder_environment(self, name: str, root: Path) -> Environment:
        """Without declared environments, NAME is a folder of the repository, as the
        README's layouts have it; which one was chosen is logged (a warning, so that a
        command line shows it)."""
        tried = [layout.format(name=name) for layout in ENVIRONMENT_FOLDERS]
        plain = bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
        for folder in tried:
            if plain and (root / folder).is_dir():
                if (root, name) not in _ANNOUNCED:  # once, though a command reads it often
                    _ANNOUNCED.add((root, name))
                    log.warning(
                        "environment %r: no %s declares it; using the folder %s/",
                        name,
                        FILE_NAME,
                        folder,
                    )
                branch = {"branch": self._default_branch} if self._default_branch else {}
                return Environment(name=name, path=folder, **branch)
        raise ConfigError(
            f"unknown environment {name!r}: no {FILE_NAME} declares environments, and the "
            f"repository has no folder {' or '.join(f + '/' for f in tried)}"
        )

    def previous(self, env: Environment) -> Environment | None:
        """The environment before `env` in promotion order, if any."""
        names = [e.name for e in self.environments]
        index = names.index(env.name) if env.name in names else 0  # a folder: no order
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

    @field_validator("rollback", "config_change")
    @classmethod
    def _known_gates(cls, value: ChangeGates, info: ValidationInfo) -> ChangeGates:
        """Every entry names a gate type or a gate of some environment: a typo must not
        leave a rollback unguarded."""
        known = {"approval", "http", "queue-empty"}
        environments = info.data.get("environments") or []
        known |= {g.name for e in environments for g in e.gates if g.name}
        unknown = [entry for entry in value.gates if entry not in known]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is neither a gate type (approval, http, queue-empty) nor "
                "the name of a gate of an environment"
            )
        return value


def safe_relative_path(value: str) -> str:
    """A path inside the repository: relative, no `..`, normalized to posix form."""
    path = PurePosixPath(value.strip())
    if path.is_absolute() or ".." in path.parts or str(path).startswith("~"):
        raise ValueError(f"path {value!r} must stay inside the repository")
    return str(path)


def parse_project(text: str | bytes, *, source: str) -> Project:
    """Parse conveyor.yaml text; `source` names it in errors (a path, or `rev:path`)."""
    document = load_document(text, file=source)
    if document is None or not document.data:
        return Project()
    return validate(Project, document.data, file=source, node=document.node)


def load_project(repo_root: Path, *, default_branch: str | None = None) -> Project:
    """Read conveyor.yaml from a checkout; an absent file gives an empty project. With
    `default_branch` (the repository's HEAD), an environment that names no branch lives
    there, so that master-based repositories need not say so."""
    path = repo_root / FILE_NAME
    # Named as in the repository: the checkout may be conveyor's cache or a temporary
    # clone, which the person who wrote the file has never seen.
    project = Project()
    if path.exists():
        project = parse_project(read_text(path, file=FILE_NAME), source=FILE_NAME)
    project._root, project._default_branch = repo_root, default_branch
    if default_branch is not None:
        for env in project.environments:
            if "branch" not in env.model_fields_set:
                env.branch = default_branch
    return project
