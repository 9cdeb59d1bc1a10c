"""`conveyor version`: the version, environment and file of this CI build."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from conveyor.cli.output import OutputFormat, console, fail, print_machine, write_file
from conveyor.config.project import ConfigError
from conveyor.config.publish_profile import (
    DEFAULT_PATH,
    PublishProfile,
    Scheme,
    load_publish_profile,
)
from conveyor.publish.publisher import PublishError, destination, plan
from conveyor.publish.version import Event, VersionError

SchemeOption = typer.Option(
    None,
    "--scheme",
    help="short-sha: main → short SHA (dev), release → semver tag (staging). "
    "ref-id: push → <REF_ID>-<sha> (staging on master, and a staging candidate), "
    "pull request → <REF_ID>-<head sha> (candidate), release → semver tag (production). "
    "Default: the profile's, else ref-id.",
)
AppOption = typer.Option(
    None, "--app", help="App name; default the profile's, else the CI repository's name."
)
RefOption = typer.Option(
    None, "--ref", help="Git ref (refs/heads/master, refs/pull/12/merge, refs/tags/1.2.0)."
)
ShaOption = typer.Option(None, "--sha", help="Commit SHA (for a pull request: its head).")
EventOption = typer.Option(None, "--event", help="Default: from the CI system, else the ref.")
TimestampOption = typer.Option(
    False, "--timestamp", help="Append -<unix time> to a push's version (ref-id scheme)."
)
ProfileOption = typer.Option(
    None, "--profile", help=f"Publish profile; default {DEFAULT_PATH} when it exists."
)


def profile_or_default(path: Path | None) -> PublishProfile | None:
    """The profile at `path`, or at the default place if one is there, else None."""
    if path is None and not DEFAULT_PATH.is_file():
        return None
    return load_publish_profile(path or DEFAULT_PATH)


def version(
    scheme: Scheme | None = SchemeOption,
    app_name: str | None = AppOption,
    ref: str | None = RefOption,
    sha: str | None = ShaOption,
    event: Event | None = EventOption,
    timestamp: bool = TimestampOption,
    profile_path: Path | None = ProfileOption,
    github_output: bool = typer.Option(
        False, "--github-output", help="Append version=, environment=, file= to $GITHUB_OUTPUT."
    ),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Print this build's version, target environment and file in the config repo.

    Reads GitHub Actions (GITHUB_REF, GITHUB_SHA, GITHUB_EVENT_NAME), Codefresh
    (CF_SHORT_REVISION, CF_RELEASE_TAG, CF_BRANCH) or GitLab (CI_COMMIT_SHA,
    CI_COMMIT_TAG, CI_COMMIT_REF_NAME, CI_MERGE_REQUEST_IID) variables; flags win.
    """
    try:
        profile = profile_or_default(profile_path)
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
        files = [destination(build, e, profile=profile) for e in build.environments]
    except (ConfigError, VersionError, PublishError) as error:
        fail(escape(str(error)))
    result: dict[str, Any] = {
        "version": build.version,
        "environment": build.environments[0] if build.environments else "",
        "file": files[0] if files else "",
        "environments": [
            {"name": e, "file": f} for e, f in zip(build.environments, files, strict=True)
        ],
        "app": build.app,
        "ref": build.context.ref,
        "ref_id": build.context.ref_id,
        "sha": build.context.sha,
        "event": str(build.context.event),
        "ci": build.context.system,
    }
    if github_output:
        target = os.environ.get("GITHUB_OUTPUT")
        if not target:
            fail("--github-output: GITHUB_OUTPUT is not set")
        lines = [f"{key}={result[key]}\n" for key in ("version", "environment", "file")]
        lines.append(f"environments={' '.join(build.environments)}\n")
        lines.append(f"files={' '.join(files)}\n")
        write_file(
            Path(target), "".join(lines), what="--github-output ($GITHUB_OUTPUT)", append=True
        )
    if output is not OutputFormat.table:
        print_machine(result, output)
        return
    console.print(f"version      {escape(build.version)}", highlight=False)
    if not build.environments:
        console.print(f"environment  none ({build.context.event} of {escape(build.context.ref)})")
    for environment, file in zip(build.environments, files, strict=True):
        console.print(f"environment  {environment}\nfile         {escape(file)}", highlight=False)
