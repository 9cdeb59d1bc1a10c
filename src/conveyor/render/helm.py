"""The real `helm` CLI, driven asynchronously: install/upgrade, status, rollback, pull.

Releases are real Helm releases, so `helm list/history/rollback` keep working for the
teams. Values are passed in a private temporary file (never on the command line, where
`ps` would show secrets), and errors are reported without echoing values. Release
names, namespaces, charts and versions come from files: each is checked by Helm's and
Kubernetes' rules (`conveyor.config.names`) before helm runs, option values are joined to
their flag (`--namespace=<ns>`) and positional arguments follow `--`, so that none of them
is ever read as an option (`--post-renderer=<program>` would run that program).

Commands that write to the cluster (upgrade, rollback, uninstall) ask the write guard
first, as KubeClient does, and are killed when the time it allowed runs out: a lease
holder that lost its lease must not go on writing through helm. A release cut off this
way is left pending, as after a crash, for the next holder to unlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.cluster.client import WriteGuard
from conveyor.config.names import (
    UnsafeValueError,
    chart_name,
    chart_version,
    helm_release_name,
    helm_repository_url,
    kubernetes_namespace,
    oci_reference,
)
from conveyor.errors import ConveyorError
from conveyor.render.documents import load_all
from conveyor.render.postrender import write_stages

log = logging.getLogger(__name__)

_LOOPBACK = re.compile(r"^(oci://)?(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?(/|$)")


class HelmError(ConveyorError, RuntimeError):
    def __init__(self, command: str, message: str) -> None:
        self.command = command
        self.message = message
        super().__init__(f"helm {command}: {message}")


def _release(command: str, release: str, namespace: str) -> list[str]:
    """`release` and `--namespace=<namespace>` once both are valid; HelmError otherwise."""
    try:
        helm_release_name(release)
        kubernetes_namespace(namespace)
    except UnsafeValueError as error:
        raise HelmError(command, str(error)) from None
    return [release, f"--namespace={namespace}"]


def _chart_source(chart: str, repo: str | None, version: str | None) -> None:
    """A chart to pull: a name in `repo`, or an OCI reference; HelmError otherwise."""
    try:
        if repo is None:
            oci_reference(chart)
        else:
            helm_repository_url(repo)
            chart_name(chart)
        if version:
            chart_version(version)
    except UnsafeValueError as error:
        raise HelmError("pull", str(error)) from None


def _local_chart(chart: str) -> str:
    """A chart on disk (resolved by us) as an absolute path: never read as an option,
    nor as `repo/name` in a repository the user configured."""
    return os.path.abspath(chart)


def plain_http(url: str) -> bool:
    """Loopback registries (the sandbox's) speak plain HTTP."""
    return bool(_LOOPBACK.match(url))


def _clean_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "; ".join(lines[-5:]) if lines else "(no output)"


@dataclass
class HelmCLI:
    binary: str = "helm"
    kubeconfig: str | None = None
    context: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    write_guard: WriteGuard | None = None

    def _global_args(self) -> list[str]:
        args = []
        if self.kubeconfig:
            args += ["--kubeconfig", self.kubeconfig]
        if self.context:
            args += ["--kube-context", self.context]
        return args

    async def run(
        self, *args: str, positional: Sequence[str] = (), kube: bool = True, writes: bool = False
    ) -> str:
        """`helm <args> -- <positional>`: `args` are the subcommand and our own options,
        `positional` the values (release, chart, path) that must never read as options.
        `writes`: the command changes the cluster, so the write guard is asked first and
        bounds how long it may run."""
        deadline = self.write_guard() if writes and self.write_guard is not None else None
        command = [self.binary, *args, *(self._global_args() if kube else []), "--", *positional]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.extra_env},
            start_new_session=True,  # its own process group: a kill reaches any child
        )
        try:
            async with asyncio.timeout(deadline):
                stdout, stderr = await process.communicate()
        except BaseException as interrupted:
            # Cut off (the lease ran out) or cancelled: helm must not write on its own.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            if isinstance(interrupted, TimeoutError) and self.write_guard is not None:
                self.write_guard()  # raises the guard's own error: the lease is gone
            raise
        if process.returncode != 0:
            raise HelmError(args[0], _clean_error(stderr.decode(errors="replace")))
        for warning in _warnings(stderr.decode(errors="replace")):
            log.warning("helm %s: %s", args[0], warning)
        return stdout.decode()

    async def status(self, release: str, namespace: str) -> dict[str, Any] | None:
        try:
            release, namespace_arg = _release("status", release, namespace)
            out = await self.run("status", namespace_arg, "-o", "json", positional=[release])
        except HelmError as error:
            if "not found" in error.message:
                return None
            raise
        result: dict[str, Any] = json.loads(out)
        return result

    async def history(self, release: str, namespace: str) -> list[dict[str, Any]]:
        try:
            release, namespace_arg = _release("history", release, namespace)
            out = await self.run(
                "history", namespace_arg, "-o", "json", "--max", "256", positional=[release]
            )
        except HelmError as error:
            if "not found" in error.message:
                return []
            raise
        result: list[dict[str, Any]] = json.loads(out)
        return result

    async def upgrade_install(
        self,
        release: str,
        namespace: str,
        chart: str,
        values: dict[str, Any],
        *,
        timeout: float,
        description: str | None = None,
        values_files: Sequence[Path] = (),
        labels: Mapping[str, str] | None = None,
        post_renderers: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """`values` first, then each of `values_files` in order (later ones win).
        `labels` go on the release's storage (`helm upgrade --labels`);
        `post_renderers` are a HelmRelease's kustomize post-renderers."""
        release, namespace_arg = _release("upgrade", release, namespace)
        chart = _local_chart(chart)
        with _values_file(values) as values_path, _post_renderer(post_renderers) as post:
            args = [
                *post,
                "upgrade",
                "--install",
                namespace_arg,
                "--create-namespace",
                "--values",
                str(values_path),
                *_values_args(values_files),
                "--reset-values",
                # Measured with helm 3.21 on k8s 1.36: helm's client-side check defers to
                # the server's field validation, which it does not request, so an unknown
                # field passes with a warning either way and type errors are refused by the
                # apiserver either way; the check only costs 0.13-0.39 s of CPU per call
                # (fetching and parsing OpenAPI). Warnings are logged below.
                "--disable-openapi-validation",
                "--history-max",
                "10",
                "--timeout",
                f"{int(timeout)}s",
                "-o",
                "json",
            ]
            if description:
                args.append(f"--description={description}")
            if labels:
                args.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
            out = await self.run(*args, positional=[release, chart], writes=True)
        result: dict[str, Any] = json.loads(out)
        return result

    async def template(
        self,
        release: str,
        namespace: str,
        chart: str,
        values: dict[str, Any],
        *,
        values_files: Sequence[Path] = (),
        post_renderers: Sequence[dict[str, Any]] = (),
    ) -> str:
        release, namespace_arg = _release("template", release, namespace)
        chart = _local_chart(chart)
        with _values_file(values) as values_path, _post_renderer(post_renderers) as post:
            return await self.run(
                "template",
                *post,
                namespace_arg,
                "--values",
                str(values_path),
                *_values_args(values_files),
                "--include-crds",
                positional=[release, chart],
                kube=False,
            )

    async def rollback(
        self, release: str, namespace: str, revision: int, *, timeout: float
    ) -> None:
        release, namespace_arg = _release("rollback", release, namespace)
        await self.run(
            "rollback",
            namespace_arg,
            "--timeout",
            f"{int(timeout)}s",
            "--history-max",
            "10",
            positional=[release, str(int(revision))],
            writes=True,
        )

    async def uninstall(self, release: str, namespace: str) -> None:
        release, namespace_arg = _release("uninstall", release, namespace)
        try:
            await self.run("uninstall", namespace_arg, positional=[release], writes=True)
        except HelmError as error:
            if "not found" not in error.message:
                raise

    async def manifest(self, release: str, namespace: str) -> str:
        release, namespace_arg = _release("get", release, namespace)
        return await self.run("get", "manifest", namespace_arg, positional=[release])

    async def pull(
        self, chart: str, *, destination: Path, version: str | None = None, repo: str | None = None
    ) -> Path:
        """Download a chart archive (`chart` in `repo`, or the OCI reference `chart`);
        returns the .tgz path."""
        _chart_source(chart, repo, version)
        destination.mkdir(parents=True, exist_ok=True)
        args = ["pull", f"--destination={destination}"]
        if version:
            args.append(f"--version={version}")
        if repo:
            args.append(f"--repo={repo}")
        if plain_http(chart) or (repo and plain_http(repo)):
            args.append("--plain-http")
        await self.run(*args, positional=[chart], kube=False)
        archives = sorted(destination.glob("*.tgz"))
        if len(archives) != 1:
            raise HelmError("pull", f"expected one chart archive in {destination}")
        return archives[0]

    async def dependency_build(self, chart_dir: Path) -> None:
        await self.run("dependency", "build", positional=[str(chart_dir)], kube=False)

    async def dependency_update(self, chart_dir: Path) -> None:
        """Fetch the chart's dependencies afresh (`helm dependency update`)."""
        await self.run("dependency", "update", positional=[str(chart_dir)], kube=False)


def _warnings(stderr: str) -> list[str]:
    """The apiserver's warnings that helm passes on (klog quotes them):
    `I1122 ... warnings.go:107] "Warning: unknown field \\"spec.replcas\\""`."""
    found = []
    for line in stderr.splitlines():
        if "Warning: " not in line:
            continue
        text = line.split("Warning: ", 1)[1]
        if '"Warning: ' in line:  # klog's quoted form: unquote it
            text = text.removesuffix('"').replace('\\"', '"')
        found.append(text)
    return found


def _values_args(files: Sequence[Path]) -> list[str]:
    return [f"--values={path}" for path in files]


@contextlib.contextmanager
def _values_file(values: dict[str, Any]) -> Iterator[Path]:
    """Values in a 0600 file in a private directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="conveyor-values-") as directory:
        path = Path(directory) / "values.yaml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            # JSON is YAML to helm, and far quicker to write than PyYAML's emitter. Dates
            # that YAML parsed become the strings helm itself would have seen.
            json.dump(values, handle, default=str)
        yield path


@contextlib.contextmanager
def _post_renderer(renderers: Sequence[dict[str, Any]]) -> Iterator[list[str]]:
    """helm's options running conveyor's own post-renderer (render/postrender.py) over
    a folder of kustomizations written here; none when there are no `renderers`."""
    if not renderers:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="conveyor-postrenderers-") as folder:
        write_stages(Path(folder), list(renderers))
        yield [
            f"--post-renderer={sys.executable}",
            "--post-renderer-args=-m",
            "--post-renderer-args=conveyor.render.postrender",
            f"--post-renderer-args={folder}",
        ]


def parse_manifest(manifest: str) -> list[dict[str, Any]]:
    """Objects of a release manifest (`---`-separated, with `# Source:` comments)."""
    return [o for o in load_all(manifest) if isinstance(o, dict) and o.get("kind")]
