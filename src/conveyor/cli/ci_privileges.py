"""`conveyor ci-privileges render|apply`: CI roles from every app's `.ci.yaml`."""

from __future__ import annotations

from pathlib import Path

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich.markup import escape

from conveyor.cli.output import console, err_console, fail, write_file
from conveyor.publish.ci_privileges import (
    OIDC_HOST,
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
OidcOption = typer.Option(
    False,
    "--create-oidc-provider",
    help=f"Create GitHub's OIDC provider ({OIDC_HOST}) in the stack. Without it the roles "
    "trust the one the account must have already (an account has it once).",
)
ExcludeOption = typer.Option(
    [],
    "--exclude",
    help="A repository (NAME or OWNER/NAME) to leave out, e.g. an archived one, as "
    "Cellenics' rotate-ci skipped archived repositories. Repeatable.",
)


def _template(
    sources: list[str],
    owner: str | None,
    prefix: str,
    fmt: TemplateFormat,
    *,
    create_oidc_provider: bool,
    exclude: list[str],
) -> str:
    try:
        repositories = load_repositories(sources, owner=owner)
        template = render_template(
            repositories,
            role_prefix=prefix,
            create_oidc_provider=create_oidc_provider,
            exclude=exclude,
        )
        body = dump_template(template, fmt)
    except CiPrivilegesError as error:
        fail(escape(str(error)))
    _report_skipped(repositories, exclude)
    if not create_oidc_provider:
        err_console.print(
            f"the roles trust GitHub's OIDC provider ({OIDC_HOST}), which must exist in the "
            "account; --create-oidc-provider creates it with the stack",
            highlight=False,
        )
    return body


def _report_skipped(repositories: list[CiRepository], exclude: list[str]) -> None:
    for repo in repositories:
        where = escape(mask_url(repo.source))
        if {repo.name, f"{repo.owner}/{repo.name}"} & set(exclude):
            err_console.print(f"skipped {where}: excluded", highlight=False)
        elif not repo.policies:
            err_console.print(f"skipped {where}: no ci-policies", highlight=False)


@app.command()
def render(
    sources: list[str] = SourcesArgument,
    owner: str | None = OwnerOption,
    role_prefix: str = PrefixOption,
    fmt: TemplateFormat = FormatOption,
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
    create_oidc_provider: bool = OidcOption,
    exclude: list[str] = ExcludeOption,
) -> None:
    """Print the CloudFormation template of the CI roles."""
    body = _template(
        sources,
        owner,
        role_prefix,
        fmt,
        create_oidc_provider=create_oidc_provider,
        exclude=exclude,
    )
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
    create_oidc_provider: bool = OidcOption,
    exclude: list[str] = ExcludeOption,
) -> None:
    """Create or update the stack of CI roles; no change is success."""
    body = _template(
        sources,
        owner,
        role_prefix,
        fmt,
        create_oidc_provider=create_oidc_provider,
        exclude=exclude,
    )
    try:
        result = deploy(body, stack_name=stack_name, region=region, endpoint_url=endpoint_url)
    except (ClientError, BotoCoreError) as error:
        fail(escape(str(error)), code=1)
    console.print(f"stack {escape(stack_name)}: {result}", highlight=False)
