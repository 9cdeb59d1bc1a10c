"""The CI side's one step: fill the app's template per environment, commit it to the config repo.

Cellenics did this with a clone, `yq` edits, a copy and a push loop in every app's CI.
Here every file is rendered and checked before the config repo is touched (bad input
writes nothing), then all of a build's files land in one commit through
`commit_and_push`, which re-applies them on the latest head when another pipeline won
the race, so twenty pipelines publishing at once each land exactly once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.config.project import safe_relative_path
from conveyor.config.publish_profile import PublishProfile, Scheme, check_name
from conveyor.config.userfile import read_text
from conveyor.errors import ConveyorError, one_line
from conveyor.publish.template import MARKER, Setting, Template
from conveyor.publish.version import (
    Build,
    Event,
    default_layout,
    detect_context,
    expand,
    plan_build,
)
from conveyor.source.git import Author, Checkout, RetryPolicy, commit_and_push, mask_url

DEFAULT_MESSAGE = "Update from {source}"


class PublishError(ConveyorError, ValueError):
    """The request cannot be published as asked (a destination outside the repo, …)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))  # it may quote the template's kinds and keys


@dataclass(frozen=True)
class Rendered:
    """One filled file, ready to be written into the config repo."""

    environment: str
    path: str
    text: str
    warnings: tuple[str, ...] = ()


def plan(
    env: Mapping[str, str],
    *,
    profile: PublishProfile | None,
    app: str | None = None,
    scheme: Scheme | None = None,
    ref: str | None = None,
    sha: str | None = None,
    event: Event | None = None,
    timestamp: int | None = None,
) -> Build:
    """This build's version and environments, from CI variables, flags and the profile."""
    context = detect_context(env, ref=ref, sha=sha, event=event)
    name = app or (profile.app if profile else None) or context.repository
    if not name:
        raise PublishError("cannot tell the app's name; pass --app or set `app` in the profile")
    try:
        check_name(name, what="app")
    except ValueError as error:
        raise PublishError(str(error)) from None
    chosen = scheme or (profile.scheme if profile else Scheme.ref_id)
    return plan_build(context, chosen, app=name, timestamp=timestamp)


def destination(build: Build, environment: str, *, profile: PublishProfile | None) -> str:
    """The file of `environment` in the config repo; refused if it would leave the repo."""
    settings = profile.environments.get(environment) if profile else None
    layout = settings.path if settings and settings.path else default_layout(environment)
    path = expand(layout, build.variables(environment), placeholders=[])
    try:
        return safe_relative_path(path)
    except ValueError as error:
        raise PublishError(f"destination of {environment}: {error}") from None


def _expand_all(value: Any, variables: Mapping[str, str], placeholders: list[str]) -> Any:
    if isinstance(value, str):
        return expand(value, variables, placeholders=placeholders)
    if isinstance(value, dict):
        return {k: _expand_all(v, variables, placeholders) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_all(v, variables, placeholders) for v in value]
    return value


def render(
    build: Build,
    environment: str,
    *,
    profile: PublishProfile,
    profile_source: str,
    template_text: str,
    template_source: str,
    version: str | None = None,
    settings: tuple[Setting, ...] = (),
) -> Rendered:
    """Fill the template for one environment: profile shortcuts, then `values`, then `set`,
    then `settings` (from `--set`), each overriding the one before."""
    chosen = profile.environment(environment, source=profile_source)
    variables = build.variables(environment)
    if version is not None:
        variables["version"] = version

    def fill(value: Any) -> Any:
        return _expand_all(value, variables, profile.placeholders)

    template = Template(template_text, source=template_source)
    template.fill_shortcuts(
        version=variables["version"],
        namespace=fill(chosen.namespace),
        replicas=chosen.replicas,
        tag_filter=fill(chosen.filter),
        policy=fill(chosen.policy),
        chart_ref=fill(chosen.chart_ref),
    )
    for path, value in chosen.values.items():
        template.assign(Setting.from_target(f"HelmRelease:spec.values.{path}", fill(value)))
    for target, value in chosen.set.items():
        template.assign(Setting.from_target(target, fill(value)))
    for setting in settings:
        template.assign(Setting(setting.document, setting.path, fill(setting.value)))
    leftovers = template.leftover_markers()
    if leftovers:
        raise PublishError(
            f"{template_source}: FILLED_IN_BY_CI left for {environment} in "
            f"{', '.join(leftovers)}; fill it in {profile_source} or with --set"
        )
    lookalikes = template.lookalike_markers(known=profile.placeholders)
    return Rendered(
        environment=environment,
        path=destination(build, environment, profile=profile),
        text=template.render(),
        warnings=tuple(
            f"{template_source}: {found} looks like a placeholder, but nothing fills it "
            f"(only {MARKER} and the profile's placeholders are filled)"
            for found in lookalikes
        ),
    )


@dataclass(frozen=True)
class Release:
    """What one publish writes: the filled files and the commit message."""

    version: str
    files: tuple[Rendered, ...]
    message: str


def prepare(
    build: Build,
    *,
    profile: PublishProfile,
    profile_source: str,
    template_path: Path,
    environments: list[str],
    version: str | None = None,
    settings: tuple[Setting, ...] = (),
    message: str = DEFAULT_MESSAGE,
) -> Release:
    """Render every environment's file and the message, touching nothing yet."""
    if environments and not template_path.is_file():
        raise PublishError(f"{template_path}: template not found")
    template_text = read_text(template_path) if environments else ""
    files = tuple(
        render(
            build,
            environment,
            profile=profile,
            profile_source=profile_source,
            template_text=template_text,
            template_source=str(template_path),
            version=version,
            settings=settings,
        )
        for environment in environments
    )
    variables = build.variables(environments[0] if environments else "")
    if version is not None:
        variables["version"] = version
    return Release(
        version=variables["version"],
        files=files,
        message=expand(message, variables, placeholders=[]),
    )


def publish(
    release: Release,
    *,
    url: str,
    branch: str,
    author: Author,
    retry: RetryPolicy,
    on_retry: Callable[[int, float], None] | None = None,
    create_branch: bool = False,
) -> str | None:
    """Write every file in one commit on `branch` of `url`; None when nothing changed.
    A branch that does not exist is refused unless `create_branch`: a typo in CI must not
    publish to a branch no agent reads."""

    def write(root: Path) -> None:
        for file in release.files:
            target = root / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file.text)

    with tempfile.TemporaryDirectory(prefix="conveyor-publish-") as workdir:
        checkout = Checkout.open(url, Path(workdir), branch=branch)
        if checkout.head() is None and not create_branch:
            raise PublishError(
                f"branch {branch!r} does not exist in {mask_url(url)}; "
                "pass --create-branch to create it"
            )
        return commit_and_push(
            checkout, write, message=release.message, author=author, retry=retry, on_retry=on_retry
        )
