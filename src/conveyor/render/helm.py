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
way is left pending, as after a crash, for the next holder to unlock. A helm run that is
cancelled instead (the agent stopping on SIGTERM, past its grace) is asked to stop as
Ctrl-C would ask it (SIGTERM): an upgrade or install in flight then marks its release
failed rather than leaving it pending; it is killed if it takes longer than
`HELM_STOP_GRACE` or than the lease still allows.
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

from conveyor.causes import CAUSE_LIMIT, DETAILS_LIMIT, LONG_QUOTE, UNMARSHAL, capped
from conveyor.cluster.client import WriteGuard
from conveyor.cluster.lease import NotLeaderError
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

# Seconds a cancelled helm run gets to stop by itself (helm upgrade/install record the
# release as failed on SIGTERM: one write), before it is killed.
HELM_STOP_GRACE = 5.0
_LOOPBACK = re.compile(r"^(oci://)?(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?(/|$)")


# How much of a failed command's output goes to the log; its cause alone goes to a
# status's message and the CLI's table, and DETAILS_LIMIT of it to a status's details
# and an Event.
LOGGED_OUTPUT = 16 * 1024


@dataclass(frozen=True)
class HelmCause:
    """Why a helm command failed, as one line (`text`), and what it names: the object and
    the field the API server refused (`kind`, `name`, `field`, e.g. `spec.replicas`),
    or the values key a template failed on (`values_key`, e.g. `image.tag`)."""

    text: str
    kind: str | None = None
    name: str | None = None
    field: str | None = None
    values_key: str | None = None


class HelmError(ConveyorError, RuntimeError):
    """`message` is the cause in one line; `output`, what helm said in full (capped,
    Secrets it quotes left out), when it said more."""

    def __init__(
        self,
        command: str,
        message: str,
        *,
        cause: HelmCause | None = None,
        output: str | None = None,
    ) -> None:
        self.command = command
        self.message = message
        self.cause = cause or HelmCause(message)
        self.output = output
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


_KLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_PREFIXES = re.compile(
    r"^(?:Error: |UPGRADE FAILED: |INSTALLATION FAILED: |failed to create resource: |"
    r"\d+ errors? occurred:\s*)+"
)
# An object helm or the API server quotes whole (a patch, the live object): kilobytes of
# escaped JSON in front of the cause.
_QUOTED_OBJECT = re.compile(r'(?:\w+: )?Invalid value: "(?:[^"\\]|\\.){200,}": ')
_PATCHED = re.compile(r'cannot patch "(?P<name>[^"]*)" with kind (?P<kind>\w+): ')
_UNDECODABLE = re.compile(r'(?P<kind>\w+) in version "[^"]*" cannot be handled as an? \w+: ')
_INVALID = re.compile(r'(?P<kind>\w+)(?:\.[\w.-]+)? "(?P<name>[^"]*)" is invalid: ')
_FIELD = re.compile(
    r"^(?P<kind>[A-Z]\w*)(?: (?P<name>[a-z0-9][\w.-]*))?: "
    r"(?:\[)?(?P<field>[A-Za-z]\w*(?:\[\d+\])?(?:\.\w+(?:\[\d+\])?)+): "
)
_TEMPLATE_VALUES = re.compile(r"^template: .*? at <[^>]*?\.Values\.(?P<key>[\w.]+)")


def helm_cause(stderr: str) -> HelmCause:
    """The cause of a failed helm command, from its stderr, as a person wants to read it:
    `Deployment api: spec.replicas: cannot unmarshal string into int32` rather than
    helm's `Error: UPGRADE FAILED: cannot patch "api" with kind Deployment: ...` and the
    object quoted whole; a template's `template: chart/templates/x.yaml:12:3: ...` kept."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not _KLOG.match(line) and not line.startswith("WARNING:")]
    first_error = next((i for i, line in enumerate(lines) if line.startswith("Error: ")), None)
    if first_error is None:
        return HelmCause("; ".join(lines[-5:]) if lines else "(no output)")
    # The error line, and the items of a list of errors that it announces.
    listed = [line for line in lines[first_error + 1 :] if line.startswith("* ")]
    parts = [_PREFIXES.sub("", line).removeprefix("* ") for line in [lines[first_error], *listed]]
    text = "; ".join(part for part in parts if part)
    kind = name = None
    if found := _PATCHED.search(text) or _INVALID.search(text) or _UNDECODABLE.search(text):
        kind, name = found["kind"], found.groupdict().get("name") or None
    for pattern in (_PATCHED, _UNDECODABLE, _INVALID):
        text = pattern.sub("", text)
    text = _QUOTED_OBJECT.sub("", text)
    text = re.sub(r'\s*"" is invalid: ', "", text).strip()
    text = UNMARSHAL.sub(r"\g<field>: cannot unmarshal \g<got> into \g<want>", text)
    text = LONG_QUOTE.sub('"..."', text)
    if kind is not None:
        text = f"{kind} {name}: {text}" if name else f"{kind}: {text}"
    if len(text) > CAUSE_LIMIT:
        text = text[: CAUSE_LIMIT - 3] + "..."
    field = _FIELD.match(text)
    values = _TEMPLATE_VALUES.match(text)
    return HelmCause(
        text,
        kind=kind,
        name=name,
        field=field["field"] if field else None,
        values_key=values["key"] if values else None,
    )


def _logged_output(stderr: str, limit: int = LOGGED_OUTPUT) -> str:
    """A failed command's output for the log: capped, and any Secret that helm quotes in
    it whole (a patch of one, the live object) left out."""

    def masked(quoted: re.Match[str]) -> str:
        try:
            obj = json.loads(json.loads(quoted[0]))
        except (ValueError, TypeError):
            return quoted[0]
        secret = isinstance(obj, dict) and obj.get("kind") == "Secret"
        return '"(a Secret, not shown)"' if secret else quoted[0]

    return capped(LONG_QUOTE.sub(masked, stderr.strip()), limit)


@dataclass
class HelmCLI:
    binary: str = "helm"
    kubeconfig: str | None = None
    context: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    write_guard: WriteGuard | None = None
    # An agent confined to its namespaces may not create one: its releases' namespaces
    # exist already, and helm's create would be refused even for those.
    create_namespace: bool = True
    # Put on every release revision this CLI writes, beside the caller's (a shard's name).
    labels: dict[str, str] = field(default_factory=dict)

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
        again each time the budget it gave runs out: a renewed lease extends the run (an
        upgrade may wait on hooks longer than one lease), a lost one ends it at once."""
        guard = self.write_guard if writes else None
        budget = guard() if guard is not None else None
        command = [self.binary, *args, *(self._global_args() if kube else []), "--", *positional]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.extra_env},
            start_new_session=True,  # its own process group: a kill reaches any child
        )
        finished = asyncio.ensure_future(process.communicate())
        try:
            while not (await asyncio.wait({finished}, timeout=budget))[0]:
                budget = guard() if guard is not None else None  # raises once the lease is gone
            stdout, stderr = finished.result()
        except BaseException as interrupted:
            cancelled = isinstance(interrupted, asyncio.CancelledError)
            await self._stop(process, grace=self._stop_grace() if cancelled else 0.0)
            finished.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await finished
            raise
        if process.returncode != 0:
            output = stderr.decode(errors="replace")
            cause = helm_cause(output)
            if writes:  # a failed change is looked into; a read's "not found" is expected
                subject = f" {positional[0]}" if positional else ""
                log.info("helm %s%s failed: %s", args[0], subject, _logged_output(output))
            full = _logged_output(output, DETAILS_LIMIT)
            raise HelmError(args[0], cause.text, cause=cause, output=full)
        for warning in _warnings(stderr.decode(errors="replace")):
            log.warning("helm %s: %s", args[0], warning)
        return stdout.decode()

    def _stop_grace(self) -> float:
        """How long a cancelled run may take to stop by itself: HELM_STOP_GRACE, and no
        longer than the lease allows writing (helm's last write is marking the release
        failed); 0 once the lease is gone, as for a run cut off by it."""
        if self.write_guard is None:
            return HELM_STOP_GRACE
        try:
            return min(HELM_STOP_GRACE, self.write_guard())
        except NotLeaderError:  # helm must not write on its own
            return 0.0

    @staticmethod
    async def _stop(process: asyncio.subprocess.Process, *, grace: float) -> None:
        """Stop helm's process group: SIGTERM and up to `grace` seconds to exit, then
        SIGKILL (at once when `grace` is 0)."""
        if grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

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
                *(["--create-namespace"] if self.create_namespace else []),
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
            labels = {**(labels or {}), **self.labels}
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
