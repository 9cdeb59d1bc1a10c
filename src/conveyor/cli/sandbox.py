"""`conveyor sandbox up|env|status|down`: the local real cluster."""

from __future__ import annotations

import time
from collections.abc import Callable

import typer
from rich.markup import escape
from rich.table import Table

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.sandbox import Sandbox, SandboxError
from conveyor.sandbox.build import BuildError
from conveyor.sandbox.versions import GoToolchainError

app = typer.Typer(
    help="A real Kubernetes control plane on loopback, without Docker.", no_args_is_help=True
)

NameOption = typer.Option("default", "--name", "-n", help="Which sandbox (several can run).")


def _sandbox(name: str, *, progress: Callable[[str], None] | None = None) -> Sandbox:
    try:
        return Sandbox(name, progress=progress)
    except ValueError as error:
        fail(str(error))


@app.command()
def up(name: str = NameOption) -> None:
    """Start the sandbox NAME (or find it running); return once it is ready."""
    started = time.monotonic()
    with err_console.status(f"starting sandbox {name}") as spinner:
        sandbox = _sandbox(name, progress=lambda message: spinner.update(escape(message)))
        try:
            state = sandbox.up()
        except (GoToolchainError, BuildError, SandboxError) as error:
            fail(escape(str(error)))
    err_console.print(
        f"sandbox [bold]{name}[/] ready in {time.monotonic() - started:.1f}s "
        f"(apiserver 127.0.0.1:{state.ports['apiserver']}, "
        f"registry 127.0.0.1:{state.ports['registry']})\n"
        f'use it with: eval "$(conveyor sandbox env --name {name})"'
    )


@app.command()
def env(name: str = NameOption) -> None:
    """Print shell lines that point kubectl, helm and conveyor at the sandbox."""
    try:
        lines = _sandbox(name).env_lines()
    except SandboxError as error:
        fail(str(error))
    typer.echo("\n".join(lines))


@app.command()
def status(
    name: str = NameOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Each component, its pid and health; a dead one is shown with its log tail."""
    result = _sandbox(name).status()
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
    elif not result.exists:
        console.print(f"sandbox {name} is not running")
    else:
        table = Table(title=f"sandbox {name}")
        for column in ("component", "pid", "state", "RSS MiB", "detail"):
            table.add_column(column)
        for c in result.components:
            state = (
                "[green]healthy"
                if c.healthy
                else ("[yellow]unhealthy" if c.running else "[red]dead")
            )
            table.add_row(c.name, str(c.pid), state, f"{c.rss_bytes / 2**20:.0f}", escape(c.detail))
        console.print(table)
        console.print(
            f"total RSS {result.rss_bytes / 2**20:.0f} MiB; "
            f"kubeconfig {result.kubeconfig}; registry {result.registry}"
        )
        for c in result.components:
            if not c.running:
                console.print(f"[red]{c.name} is dead[/]; last lines of {c.log}:")
                console.print(escape(c.log_tail or ""), highlight=False)
    if result.exists and not result.ready:
        raise typer.Exit(1)
    if not result.exists:
        raise typer.Exit(3)


@app.command()
def down(name: str = NameOption) -> None:
    """Stop exactly the processes this sandbox started and remove its state."""
    stopped = _sandbox(name).down()
    err_console.print(f"sandbox {name}: stopped {', '.join(stopped) or 'nothing (not running)'}")
