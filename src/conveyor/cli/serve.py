"""`conveyor serve`: the web dashboard and the JSON API."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import typer

from conveyor.cli.output import LogFormatOption, check_listen, err_console, fail
from conveyor.reconcile.logs import LogFormat
from conveyor.reconcile.logs import configure as configure_logging
from conveyor.web.app import serve as run_server
from conveyor.web.auth import TokenFileError, load_tokens
from conveyor.web.dashboard import ServeOptions


def serve(
    listen: str = typer.Option("127.0.0.1:8080", "--listen", help="HOST:PORT to listen on."),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="Tokens allowed to act, one `TOKEN` or `NAME TOKEN` per line (without it the "
        "dashboard is read-only).",
    ),
    kubeconfig: str | None = typer.Option(
        None,
        "--kubeconfig",
        help="kubeconfig file (default: the files $KUBECONFIG lists, merged as kubectl does) "
        "for the environments whose cluster conveyor.yaml does not name.",
    ),
    context: str | None = typer.Option(
        None,
        "--context",
        help="kubeconfig context of the environments whose cluster conveyor.yaml does not name.",
    ),
    repo: str | None = typer.Option(
        None, "--repo", help="Config repository, for history, diffs and reconcile now."
    ),
    branch: str | None = typer.Option(None, "--branch", help="Branch of --repo."),
    log_format: LogFormat | None = LogFormatOption,
) -> None:
    """Dashboard and JSON API: the environments x apps matrix, app history, diffs against
    the cluster, gates, live updates, and token-protected actions. With --repo, each
    environment is read from (and acted on in) its own cluster, as conveyor.yaml names it."""
    tokens = None
    if token_file is not None:
        try:
            tokens = load_tokens(token_file)
        except TokenFileError as error:
            fail(str(error))
    check_listen(listen)
    configure_logging(log_format=log_format)
    logging.getLogger("conveyor.web").info("serving on http://%s", listen)
    if tokens is None:
        err_console.print("no --token-file: the dashboard is read-only")
    options = ServeOptions(
        listen=listen,
        tokens=tokens,
        kubeconfig=kubeconfig,
        context=context,
        repo=repo,
        branch=branch,
    )
    with contextlib.suppress(KeyboardInterrupt):
        run_server(options)
