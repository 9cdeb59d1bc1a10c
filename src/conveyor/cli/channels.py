"""`conveyor release -f channels/<channel>.yaml` (and the channel side of `conveyor diff`):
cal-itp's invoke tasks as one command, on their channel files as they are."""

from __future__ import annotations

import asyncio
from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.cluster.client import ApiError
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.config.channel import Channel, ChannelRelease, load_channel
from conveyor.config.helmrelease import HelmReleaseError
from conveyor.config.project import ConfigError
from conveyor.promote.channels import (
    ChannelFiles,
    ReleaseFailed,
    channel_comment,
    channel_root,
    diff_channel,
    release_channel,
)
from conveyor.reconcile.plan import PlanDiff
from conveyor.reconcile.target import helm_cli, kube_client


class Driver(StrEnum):
    helm = "helm"
    kustomize = "kustomize"


ChannelFileOption = typer.Option(None, "-f", "--file", help="A channel file, channels/<name>.yaml.")
ChannelAppOption = typer.Option(None, "--app", help="Only the release with this name.")
DriverOption = typer.Option(None, "--driver", help="Only helm or only kustomize releases.")
RootOption = typer.Option(
    None, "--root", help="What the channel's paths are relative to (default: the git root)."
)
SecretsDirOption = typer.Option(
    None,
    "--secrets-dir",
    envvar="CONVEYOR_SECRETS_DIR",
    help="Where `secrets` and `secret_helm_values` are, as <name>.yaml.",
)


def open_channel(
    file: Path,
    *,
    app: str | None,
    driver: Driver | None,
    root: Path | None,
    secrets_dir: Path | None,
) -> tuple[Channel, list[ChannelRelease], ChannelFiles]:
    """The channel, its selected releases, and where their files are (ConfigError)."""
    channel = load_channel(file)
    releases = channel.select(app=app, driver=driver.value if driver else None)
    files = ChannelFiles(root=root or channel_root(channel, Path.cwd()), secrets_dir=secrets_dir)
    return channel, releases, files


def channel_diff(
    file: Path,
    *,
    app: str | None,
    driver: Driver | None,
    root: Path | None,
    secrets_dir: Path | None,
    kubeconfig: str | None,
    context: str | None,
) -> tuple[str, list[PlanDiff]]:
    """The channel's pull-request comment, and the plans it was made of."""

    async def run() -> tuple[str, list[PlanDiff]]:
        channel, releases, files = open_channel(
            file, app=app, driver=driver, root=root, secrets_dir=secrets_dir
        )
        async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
            helm = helm_cli(kubeconfig_path=kubeconfig, context=context)
            plans = await diff_channel(channel, releases, files=files, kube=kube, helm=helm)
            return channel_comment(channel, plans, cluster=kube.credentials.context), plans

    try:
        return asyncio.run(run())
    except (ConfigError, HelmReleaseError) as error:
        fail(escape(str(error)))
    except (KubeconfigError, ApiError, OSError) as error:
        fail(escape(str(error)), code=1)


def release(
    file: Path = typer.Option(..., "-f", "--file", help="A channel file, channels/<name>.yaml."),
    app: str | None = ChannelAppOption,
    driver: Driver | None = DriverOption,
    root: Path | None = RootOption,
    secrets_dir: Path | None = SecretsDirOption,
    kubeconfig: str | None = typer.Option(
        None,
        "--kubeconfig",
        help="kubeconfig file (default: the files $KUBECONFIG lists, merged as kubectl does).",
    ),
    context: str | None = typer.Option(None, "--context", help="kubeconfig context."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Deploy a channel's releases in file order (helm upgrade --install, or kustomize
    applied server-side). Stops at the first failure (exit 1); bad input exits 2."""

    async def run() -> list[dict[str, str]]:
        channel, releases, files = open_channel(
            file, app=app, driver=driver, root=root, secrets_dir=secrets_dir
        )
        async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
            outcomes = await release_channel(
                channel,
                releases,
                files=files,
                kube=kube,
                helm=helm_cli(kubeconfig_path=kubeconfig, context=context),
                progress=lambda m: err_console.print(escape(m), highlight=False),
            )
        return [o.to_dict() for o in outcomes]

    try:
        outcomes = asyncio.run(run())
    except (ConfigError, HelmReleaseError) as error:
        fail(escape(str(error)))
    except (ReleaseFailed, KubeconfigError, ApiError, OSError) as error:
        fail(escape(str(error)), code=1)
    if output is not OutputFormat.table:
        print_machine({"releases": outcomes}, output)
        return
    for outcome in outcomes:
        console.print(f"{outcome['name']}: {escape(outcome['detail'])}", highlight=False)
