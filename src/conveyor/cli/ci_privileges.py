"""`conveyor ci-privileges render|apply`: CI roles from every app's `.ci.yaml`."""

from __future__ import annotations

from pathlib import Path

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich.markup import escape

from conveyor.cli.output import console, err_console, fail, write_file
from conveyor.publish.ci_privileges import (
    CiPrivilegesError,
    CiRepository,
    TemplateFormat,
    deploy,
    dump_template,
    load_repositories,
    render_template,
)
from conveyor.source.git import mask_url

app = typer.Typer(
    help="CI roles (one IAM role per app repository) from each repository's .ci.yaml.",
    no_args_is_help=True,
)

SourcesArgument = typer.Argument(..., help="App repositories: local checkouts or clone URLs.")
OwnerOption = typer.Option(
    None, "--github-owner", help="GitHub owner of sources whose URL does not name one."
)
PrefixOption = typer.Option("ci-", "--role-prefix", help="Role name = prefix + repository name.")
FormatOption = typer.Option(TemplateFormat.yaml, "--format", help="Template format.")


def _template(sources: list[str], owner: str | None, prefix: str, fmt: TemplateFormat) -> str:
    try:
        repositories = load_repositories(sources, owner=owner)
        body = dump_template(render_template(repositories, role_prefix=prefix), fmt)
    except CiPrivilegesError as error:
        fail(escape(str(error)))
    _report_skipped(repositories)
    return body


def _report_skipped(repositories: list[CiRepository]) -> None:
    for repo in repositories:
        if not repo.policies:
            err_console.print(
                f"skipped {escape(mask_url(repo.source))}: no ci-policies", highlight=False
            )


@app.command()
def render(
    sources: list[str] = SourcesArgument,
    owner: str | None = OwnerOption,
    role_prefix: str = PrefixOption,
    fmt: TemplateFormat = FormatOption,
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
) -> None:
    """Print the CloudFormation template of the CI roles."""
    body = _template(sources, owner, role_prefix, fmt)
    if out is None:
        typer.echo(body, nl=False)
    else:
        write_file(out, body, what="--out")


@app.command()
def apply(
    sources: list[str] = SourcesArgument,
    stack_name: str = typer.Option("conveyor-ci-roles", "--stack-name"),
    region: str | None = typer.Option(None, "--region", help="Default: AWS_REGION and co."),
    endpoint_url: str | None = typer.Option(
        None, "--endpoint-url", help="CloudFormation endpoint (a local emulator, a VPC endpoint)."
    ),
    owner: str | None = OwnerOption,
    role_prefix: str = PrefixOption,
    fmt: TemplateFormat = FormatOption,
) -> None:
    """Create or update the stack of CI roles; no change is success."""
    body = _template(sources, owner, role_prefix, fmt)
    try:
        result = deploy(body, stack_name=stack_name, region=region, endpoint_url=endpoint_url)
    except (ClientError, BotoCoreError) as error:
        fail(escape(str(error)), code=1)
    console.print(f"stack {escape(stack_name)}: {result}", highlight=False)
