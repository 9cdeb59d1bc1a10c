"""Which version a CI build publishes, and to which environments: the teams' tag rules.

Cellenics and Unileaf derive the image tag and the target environment from the git event
that started the build, in shell steps written again for each CI system. Here GitHub
Actions, Codefresh and GitLab variables become one `BuildContext`, and a `Scheme` turns
it into a `Build`: the version and the environments it publishes to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from conveyor.config.publish_profile import Scheme
from conveyor.config.userfile import UserFileError, load_json, read_text
from conveyor.errors import ConveyorError

_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
_VARIABLE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")

CANDIDATES = "staging-candidates"
DEFAULT_LAYOUT = "{environment}/{app}.yaml"
CANDIDATE_LAYOUT = "staging-candidates/{app}/{ref_id}.yaml"


class VersionError(ConveyorError, ValueError):
    """The build context is incomplete or contradictory; the message says what to pass."""


class Event(StrEnum):
    push = "push"
    pull_request = "pull_request"
    release = "release"


@dataclass(frozen=True)
class BuildContext:
    """What the CI system says about the build: the git ref, commit and event."""

    ref: str
    sha: str
    event: Event
    system: str
    repository: str | None = None
    commit_url: str | None = None

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.ref.startswith("refs/tags/") else None

    @property
    def ref_id(self) -> str:
        return ref_id(self.ref)


def ref_id(ref: str) -> str:
    """Cellenics' REF_ID: the git ref with `/` replaced by `-` (`refs-pull-42-merge`)."""
    return ref.replace("/", "-")


def _event_of_ref(ref: str) -> Event:
    if ref.startswith("refs/tags/"):
        return Event.release
    if ref.startswith(("refs/pull/", "refs/merge-requests/")):
        return Event.pull_request
    return Event.push


def _github(env: Mapping[str, str]) -> BuildContext:
    name = env.get("GITHUB_EVENT_NAME", "push")
    event = {
        "pull_request": Event.pull_request,
        "pull_request_target": Event.pull_request,
        "release": Event.release,
    }.get(name, Event.push)
    sha = env.get("GITHUB_SHA", "")
    if event is Event.pull_request:
        # GITHUB_SHA is the merge commit; Cellenics tags pull requests with the head commit.
        sha = _pull_request_head(env.get("GITHUB_EVENT_PATH")) or sha
    repository = env.get("GITHUB_REPOSITORY")
    server = env.get("GITHUB_SERVER_URL", "https://github.com")
    return BuildContext(
        ref=env.get("GITHUB_REF", ""),
        sha=sha,
        event=event,
        system="github",
        repository=repository.rsplit("/", 1)[-1] if repository else None,
        commit_url=f"{server}/{repository}/commit/{sha}" if repository and sha else None,
    )


def _pull_request_head(event_path: str | None) -> str | None:
    if not event_path or not Path(event_path).is_file():
        return None
    try:
        payload = load_json(read_text(Path(event_path)), file=event_path)
        head = payload["pull_request"]["head"]["sha"]
    except (UserFileError, KeyError, TypeError):
        return None
    return head if isinstance(head, str) else None


def _codefresh(env: Mapping[str, str]) -> BuildContext:
    sha = env.get("CF_REVISION") or env.get("CF_SHORT_REVISION", "")
    if env.get("CF_RELEASE_TAG"):
        ref, event = f"refs/tags/{env['CF_RELEASE_TAG']}", Event.release
    elif env.get("CF_PULL_REQUEST_NUMBER"):
        ref, event = f"refs/pull/{env['CF_PULL_REQUEST_NUMBER']}/merge", Event.pull_request
    else:
        ref, event = f"refs/heads/{env.get('CF_BRANCH', '')}", Event.push
    return BuildContext(
        ref=ref,
        sha=sha,
        event=event,
        system="codefresh",
        repository=env.get("CF_REPO_NAME"),
        commit_url=env.get("CF_COMMIT_URL"),
    )


def _gitlab(env: Mapping[str, str]) -> BuildContext:
    sha = env.get("CI_COMMIT_SHA", "")
    if env.get("CI_COMMIT_TAG"):
        ref, event = f"refs/tags/{env['CI_COMMIT_TAG']}", Event.release
    elif env.get("CI_PIPELINE_SOURCE") == "merge_request_event":
        ref = f"refs/merge-requests/{env.get('CI_MERGE_REQUEST_IID', '')}/head"
        event = Event.pull_request
    else:
        ref, event = f"refs/heads/{env.get('CI_COMMIT_REF_NAME', '')}", Event.push
    project_url = env.get("CI_PROJECT_URL")
    return BuildContext(
        ref=ref,
        sha=sha,
        event=event,
        system="gitlab",
        repository=env.get("CI_PROJECT_NAME"),
        commit_url=f"{project_url}/-/commit/{sha}" if project_url and sha else None,
    )


def detect_context(
    env: Mapping[str, str],
    *,
    ref: str | None = None,
    sha: str | None = None,
    event: Event | None = None,
) -> BuildContext:
    """The build context from the CI system's variables; `ref`, `sha`, `event` override."""
    if env.get("GITHUB_ACTIONS") == "true" or "GITHUB_REF" in env:
        found = _github(env)
    elif any(k in env for k in ("CF_BUILD_ID", "CF_REVISION", "CF_SHORT_REVISION")):
        found = _codefresh(env)
    elif env.get("GITLAB_CI") == "true" or "CI_COMMIT_SHA" in env:
        found = _gitlab(env)
    else:
        found = BuildContext(ref="", sha="", event=Event.push, system="flags")
    final_ref = ref or found.ref
    final_sha = sha or found.sha
    if not final_ref or final_ref.endswith("/") or not final_sha:
        raise VersionError(
            f"no git ref and commit from {found.system} variables; pass --ref and --sha"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{7,64}", final_sha):
        raise VersionError(f"commit {final_sha!r} is not a hexadecimal SHA")
    if ref and event is None:
        event = _event_of_ref(ref)
    return BuildContext(
        ref=final_ref,
        sha=final_sha.lower(),
        event=event or found.event,
        system=found.system if not (ref and sha) else "flags",
        repository=found.repository,
        commit_url=found.commit_url if not sha else None,
    )


@dataclass(frozen=True)
class Build:
    context: BuildContext
    app: str
    version: str
    environments: tuple[str, ...]

    def variables(self, environment: str) -> dict[str, str]:
        """What `{name}` in profile values, paths and messages stands for."""
        return {
            "app": self.app,
            "environment": environment,
            "version": self.version,
            "ref_id": self.context.ref_id,
            "sha": self.context.sha,
            "short_sha": self.context.sha[:7],
            "source": self.context.commit_url or self.context.sha,
        }


def image_tag(version: str) -> str:
    """The image tag of a release: its git tag without a leading `v` when the rest is
    semver (`v1.4.3` → `1.4.3`, as docker/metadata-action's semver tags have it); any
    other version is its own tag. Publish, promote, gate check and approve all use this,
    so `--version v1.4.3` and `--version 1.4.3` mean the same release."""
    return version[1:] if version.startswith("v") and _SEMVER.match(version) else version


def _release_version(context: BuildContext) -> str:
    tag = context.tag
    if tag is None or not _SEMVER.match(tag):
        raise VersionError(f"release ref {context.ref!r} is not a semver tag (like 1.4.0)")
    return image_tag(tag)


def plan_build(
    context: BuildContext,
    scheme: Scheme,
    *,
    app: str,
    main_branches: tuple[str, ...] = ("main", "master"),
    timestamp: int | None = None,
) -> Build:
    """Apply the scheme's rules: the version and the environments of this build."""
    on_main = context.event is Event.push and context.branch in main_branches
    environments: list[str] = []
    if scheme is Scheme.short_sha:
        if context.event is Event.release:
            version = _release_version(context)
            environments.append("staging")
        else:
            version = context.sha[:7]
            if on_main:
                environments.append("dev")
    elif context.event is Event.release:
        version = _release_version(context)
        environments.append("production")
    else:
        version = f"{context.ref_id}-{context.sha}"
        if context.event is Event.push and timestamp is not None:
            version = f"{version}-{timestamp}"
        if on_main:
            environments.append("staging")
        environments.append(CANDIDATES)
    return Build(context=context, app=app, version=version, environments=tuple(environments))


def default_layout(environment: str) -> str:
    """Where an environment's file goes unless the profile says otherwise (Cellenics)."""
    return CANDIDATE_LAYOUT if environment == CANDIDATES else DEFAULT_LAYOUT


def expand(text: str, variables: Mapping[str, str], *, placeholders: list[str]) -> str:
    """Replace `{name}` by its variable; a declared placeholder stays as its bare name.

    `{{` and `}}` stand for literal braces. An unknown name is a VersionError, so a typo
    in a profile never reaches the config repo.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)[0]
        if name in variables:
            return variables[name]
        if name in placeholders:
            return name
        known = ", ".join([*variables, *placeholders])
        raise VersionError(f"unknown variable {{{name}}} in {text!r} (known: {known})")

    return _VARIABLE.sub(replace, text)
