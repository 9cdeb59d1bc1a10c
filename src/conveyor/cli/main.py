"""The root `conveyor` command: wires each command group's module into one app."""

from __future__ import annotations

import typer

from conveyor import __version__
from conveyor.cli import (
    candidates,
    channels,
    ci_privileges,
    gates,
    guard,
    images,
    install,
    promote,
    publish,
    reconcile,
    sandbox,
    serve,
    stage,
    version,
)

app = typer.Typer(
    name="conveyor",
    help="GitOps continuous delivery for Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold secrets
)
app.add_typer(sandbox.app, name="sandbox")
app.command()(reconcile.reconcile)
app.add_typer(reconcile.get_app, name="get")
app.command()(reconcile.suspend)
app.command()(reconcile.resume)
app.command()(reconcile.adopt)
app.command()(reconcile.diff)
app.command()(reconcile.agent)
app.command(name="version")(version.version)
app.command(name="publish")(publish.publish_command)
app.command()(guard.guard)
app.add_typer(ci_privileges.app, name="ci-privileges")
app.add_typer(images.app, name="images")
app.command()(serve.serve)
app.command(name="promote")(promote.promote_command)
app.command()(promote.rollback)
app.command()(promote.unpin)
app.add_typer(promote.hotfix_app, name="hotfix")
app.command()(promote.notes)
app.add_typer(gates.app, name="gate")
app.command()(gates.approve)
app.command()(channels.release)
app.add_typer(candidates.app, name="candidates")
app.command(name="stage")(stage.stage_command)
app.command(name="unstage")(stage.unstage_command)
app.command(name="bootstrap")(install.bootstrap_command)
app.command(name="uninstall")(install.uninstall_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"conveyor {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """GitOps continuous delivery for Kubernetes."""


def main() -> None:
    app()
