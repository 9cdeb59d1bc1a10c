"""`conveyor publish`: fill the app's template and commit it to the config repo."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.markup import escape

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.cli.version import (
    AppOption,
    EventOption,
    ProfileOption,
    RefOption,
    SchemeOption,
    ShaOption,
    TimestampOption,
)
from conveyor.config.project import ConfigError
from conveyor.config.publish_profile import DEFAULT_PATH, Scheme, load_publish_profile
from conveyor.publish.defaults import SOURCE, TEMPLATES, cellenics_profile
from conveyor.publish.publisher import DEFAULT_MESSAGE, PublishError, plan, prepare, publish
from conveyor.publish.template import Setting, TemplateError
from conveyor.publish.version import Event, VersionError
from conveyor.source.git import (
    Author,
    GitError,
    PushRaceLost,
    RetryPolicy,
    default_branch,
    mask_url,
)


def publish_command(
    environments: list[str] = typer.Option(
        [],
        "--environment",
        "-e",
        help="Environment(s) of the profile to publish to; default: this build's (see "
        "`conveyor version`).",
    ),
    version: str | None = typer.Option(None, "--version", help="Override the build's version."),
    settings: list[str] = typer.Option(
        [],
        "--set",
        # Brackets are escaped: typer renders help as rich markup.
        help="KIND\\[/NAME]:FIELD.PATH=VALUE, applied last, e.g. "
        "HelmRelease:spec.values.replicaCount=3 or "
        "HelmRelease/ui:metadata.annotations\\[filter.fluxcd.io/chart-image]=glob:x-*. "
        "\\[key] quotes a key with dots; a number indexes a list; VALUE is YAML "
        "(3 is a number, '\"3\"' a string) and may use {app} {version} {ref_id} {sha}.",
    ),
    template_path: Path | None = typer.Option(
        None, "--template", help="Default: the profile's `template` (.flux.yaml)."
    ),
    profile_path: Path | None = ProfileOption,
    repo: str | None = typer.Option(
        None, "--repo", help="Config repo URL; default the profile's config-repo.url."
    ),
    branch: str | None = typer.Option(
        None, "--branch", help="Default: the profile's, else the config repo's HEAD branch."
    ),
    create_branch: bool = typer.Option(
        False, "--create-branch", help="Create --branch when the config repo lacks it."
    ),
    app_name: str | None = AppOption,
    scheme: Scheme | None = SchemeOption,
    ref: str | None = RefOption,
    sha: str | None = ShaOption,
    event: Event | None = EventOption,
    timestamp: bool = TimestampOption,
    message: str = typer.Option(
        DEFAULT_MESSAGE, "--message", "-m", help="Commit message; may use {source} {version}…"
    ),
    author_name: str = typer.Option(Author.name, "--author-name"),
    author_email: str = typer.Option(Author.email, "--author-email"),
    attempts: int = typer.Option(15, "--attempts", min=1, help="Pushes to try in a race."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the filled files; push nothing."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Fill the app's template for each environment and commit it to the config repo.

    The profile (.conveyor/publish.yaml) gives each environment's destination path,
    namespace, replicas, image filter or policy, chart ref and extra `values`/`set`;
    without one, Cellenics' rules are built in (README: "The publish profile").
    One commit per publish, none when nothing changed; a lost push race is retried.
    """
    try:
        if profile_path is None and not DEFAULT_PATH.is_file():
            template = next((t for t in TEMPLATES if Path(t).is_file()), TEMPLATES[0])
            profile, profile_source = cellenics_profile(os.environ, template=template), SOURCE
            err_console.print(f"no {DEFAULT_PATH}: publishing with {SOURCE}", highlight=False)
        else:
            profile_file = profile_path or DEFAULT_PATH
            profile, profile_source = load_publish_profile(profile_file), str(profile_file)
        build = plan(
            os.environ,
            profile=profile,
            app=app_name,
            scheme=scheme,
            ref=ref,
            sha=sha,
            event=event,
            timestamp=int(time.time()) if timestamp else None,
        )
        release = prepare(
            build,
            profile=profile,
            profile_source=profile_source,
            template_path=template_path or Path(profile.template),
            environments=environments or list(build.environments),
            version=version,
            settings=tuple(Setting.parse(s) for s in settings),
            message=message,
        )
        url = repo or (profile.config_repo.url if profile.config_repo else None)
        if not url and not dry_run:
            raise PublishError("no config repo: pass --repo or set config-repo.url in the profile")
    except (ConfigError, VersionError, PublishError, TemplateError) as error:
        fail(escape(str(error)))
    for warning in sorted({w for file in release.files for w in file.warnings}):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if not release.files:
        err_console.print(
            f"nothing to publish: a {build.context.event} of {escape(build.context.ref)} "
            "deploys to no environment"
        )
        return
    if dry_run:
        for file in release.files:
            typer.echo(f"# {file.path}\n{file.text}", nl=False)
        return
    started = time.monotonic()
    retries: list[int] = []

    def on_retry(attempt: int, delay: float) -> None:
        retries.append(attempt)
        err_console.print(f"push lost a race (attempt {attempt}); retrying in {delay:.1f}s")

    try:
        commit = publish(
            release,
            url=url or "",
            branch=branch
            or (profile.config_repo.branch if profile.config_repo else None)
            or default_branch(url or ""),
            author=Author(author_name, author_email),
            retry=RetryPolicy(attempts=attempts),
            on_retry=on_retry,
            create_branch=create_branch,
        )
    except PublishError as error:
        fail(escape(str(error)))
    except (GitError, PushRaceLost) as error:
        fail(escape(mask_url(str(error))), code=1)
    result = {
        "app": build.app,
        "version": release.version,
        "commit": commit,
        "changed": commit is not None,
        "files": {f.environment: f.path for f in release.files},
        "retries": len(retries),
        "seconds": round(time.monotonic() - started, 3),
    }
    if output is not OutputFormat.table:
        print_machine(result, output)
    elif commit is None:
        console.print("no changes", highlight=False)
    else:
        paths = ", ".join(escape(f.path) for f in release.files)
        console.print(
            f"published {build.app} {escape(release.version)} to {paths} in "
            f"{escape(mask_url(url or ''))} as {commit[:12]}",
            highlight=False,
        )
