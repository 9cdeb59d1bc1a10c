"""`conveyor bootstrap` and `conveyor uninstall`: conveyor in its own cluster (the work is
in conveyor.install)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import typer
from rich.markup import escape

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.cli.reconcile import ContextOption, KubeconfigOption
from conveyor.cluster.client import ApiError
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.config.names import UnsafeValueError, kubernetes_namespace
from conveyor.config.project import ConfigError
from conveyor.install.bootstrap import (
    BootstrapError,
    BootstrapRequest,
    DeployKey,
    bootstrap,
    deploy_key_help,
    ssh_url,
    uninstall,
)
from conveyor.reconcile.status import NAMESPACE
from conveyor.render.helm import HelmError
from conveyor.source.git import GitError, mask_url

FAILURES = (
    BootstrapError,
    GitError,
    ConfigError,
    KubeconfigError,
    ApiError,
    HelmError,
    UnsafeValueError,
    OSError,
)


def _progress(message: str) -> None:
    err_console.print(escape(message), highlight=False, soft_wrap=True)


def bootstrap_command(
    repo: str = typer.Option(
        ..., "--repo", help="Config repository URL (as the agent fetches it)."
    ),
    env: str = typer.Option(..., "--env", help="The environment this cluster runs."),
    path: str | None = typer.Option(
        None,
        "--path",
        help="The environment's folder (default: conveyor.yaml's for --env, else --env).",
    ),
    branch: str | None = typer.Option(None, "--branch", help="Branch (default: the repo's HEAD)."),
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    ssh_key: Path | None = typer.Option(
        None, "--ssh-key", help="Deploy key (private) for the agent's git over ssh."
    ),
    known_hosts: Path | None = typer.Option(
        None, "--known-hosts", help="The git host's keys, with --ssh-key (ssh-keyscan HOST)."
    ),
    image: str | None = typer.Option(
        None, "--image", help="conveyor's image, REPOSITORY[:TAG] (make image prints `pushed:`)."
    ),
    namespaces: list[str] = typer.Option(
        [],
        "--namespace",
        help="Namespaced mode: the agent may touch only this namespace (repeat it) and its "
        "own; default: cluster-wide.",
    ),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the agent."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Install conveyor into conveyor-system, commit its own HelmRelease into the config
    repo (so upgrades go through git) and wait until the agent is Ready. Running it again
    changes nothing."""
    if ssh_key is None and ssh_url(repo):
        fail(escape(deploy_key_help(mask_url(repo))))
    if ssh_key is not None and known_hosts is None:
        fail("--ssh-key needs --known-hosts FILE (ssh-keyscan HOST > FILE)")
    for namespace in namespaces:
        try:
            kubernetes_namespace(namespace, what="--namespace")
        except UnsafeValueError as error:
            fail(str(error))
    request = BootstrapRequest(
        repo=repo,
        env=env,
        path=path,
        branch=branch,
        kubeconfig=kubeconfig,
        context=context,
        deploy_key=DeployKey(ssh_key, known_hosts) if ssh_key and known_hosts else None,
        image=image,
        namespaces=tuple(namespaces),
        timeout=timeout,
    )
    try:
        result = asyncio.run(bootstrap(request, progress=_progress))
    except FAILURES as error:
        fail(escape(mask_url(str(error))))
    if output is not OutputFormat.table:
        print_machine(dataclasses.asdict(result), output)
        return
    times = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in result.seconds.items())
    console.print(
        f"conveyor is Ready in {NAMESPACE}: {escape(result.holder)} leads {result.scope}\n"
        f"  git: {result.commit[:12] if result.commit else 'unchanged'} ({result.folder})\n"
        f"  helm: revision {result.helm_revision}"
        f"{'' if result.installed_revision else ' (not changed by bootstrap)'}\n"
        f"  times: {times}",
        highlight=False,
    )


def uninstall_command(
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    purge: bool = typer.Option(
        False,
        "--purge",
        help="Also delete the ConveyorApp statuses, their CRD and conveyor-system.",
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the agents."),
) -> None:
    """Remove conveyor from the cluster; the apps keep running. Its statuses stay (for a
    later bootstrap) unless --purge. The config repo is not touched."""
    try:
        result = asyncio.run(
            uninstall(
                kubeconfig=kubeconfig,
                context=context,
                purge=purge,
                timeout=timeout,
                progress=_progress,
            )
        )
    except FAILURES as error:
        fail(escape(str(error)))
    kept = (
        f"; left to their live holders: {', '.join(result.kept_leases)}"
        if result.kept_leases
        else ""
    )
    statuses = (
        f"{result.statuses} statuses and the CRD deleted"
        if purge
        else "statuses and CRD kept (--purge deletes them)"
    )
    console.print(
        f"conveyor uninstalled: leases deleted: {', '.join(result.leases) or 'none'}{kept}; "
        f"deploy key {'deleted' if result.secret else 'absent'}; {statuses}; apps untouched",
        highlight=False,
    )
