"""Stage, unstage, extend and list sandboxes: each change one commit to the config repo.

Everything is read at the tip of the environment's branch and re-read on every push
attempt (`commit_and_push`), so two people staging at once both land: a default ID
taken meanwhile becomes the next free one, a chosen one is refused. Hooks run before
the commit; a failing one stops everything, and nothing is committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conveyor.cluster.client import KubeClient
from conveyor.config.helmrelease import parse_duration
from conveyor.config.project import Environment, Sandboxes
from conveyor.promote.pipeline import Workspace, environment
from conveyor.reconcile.status import StatusStore
from conveyor.render.discover import app_namespace, discover, sandbox_of
from conveyor.render.documents import RenderError
from conveyor.sandboxes.candidates import (
    Choice,
    SandboxError,
    check_id,
    default_id,
    parse_choices,
)
from conveyor.sandboxes.hooks import run_hooks
from conveyor.sandboxes.manifest import (
    ResolveCommit,
    Sandbox,
    Staging,
    build_sandbox,
    read_candidates,
    read_sandbox,
    read_sandboxes,
    with_expiry,
)
from conveyor.source.git import Author, RetryPolicy, change_trailer, commit_and_push, remote_commit


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def ttl_seconds(ttl: str) -> float:
    try:
        return parse_duration(ttl, default=0.0)
    except ValueError as error:
        raise SandboxError(f"--ttl {ttl!r}: {error}") from None


@dataclass
class StageRequest:
    specs: Sequence[str]
    user: str
    sandbox_id: str | None = None
    pin: Sequence[str] = ()
    no_pin: Sequence[str] = ()
    with_rds: bool = False
    ttl: str | None = None
    env: str | None = None
    auto: bool = False
    # An ID that may be replaced (auto mode restaging its own sandbox).
    replace: bool = False
    reason: str | None = None  # said in the commit (auto mode's)


@dataclass
class StageResult:
    sandbox_id: str
    env: str
    file: str
    text: str
    commit: str | None
    choices: list[Choice]
    pins: list[str]
    expires_at: str | None
    hook_output: list[str] = field(default_factory=list)
    url: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.sandbox_id,
            "env": self.env,
            "file": self.file,
            "commit": self.commit,
            "apps": {c.app: c.ref for c in self.choices},
            "pinned": self.pins,
            "expiresAt": self.expires_at,
            "url": self.url,
        }


def sandbox_environment(workspace: Workspace, env: str | None) -> tuple[Sandboxes, Environment]:
    """conveyor.yaml's `sandboxes:` and the environment sandboxes live in."""
    project = workspace.project()
    config = project.sandboxes
    return config, environment(project, env or config.env)


def decide_pins(choices: list[Choice], *, pin: Sequence[str], no_pin: Sequence[str]) -> set[str]:
    """Apps on the default branch are pinned, unless told otherwise."""
    apps = {c.app for c in choices}
    for app in (*pin, *no_pin):
        if app not in apps:
            raise SandboxError(f"--pin/--no-pin {app!r}: not an app of the sandbox")
    both = set(pin) & set(no_pin)
    if both:
        raise SandboxError(f"{', '.join(sorted(both))}: both --pin and --no-pin")
    pins = {c.app for c in choices if not c.named}
    return (pins | set(pin)) - set(no_pin)


def taken_names(root: Path, env: Environment, config: Sandboxes) -> tuple[set[str], set[str]]:
    """IDs a new sandbox may not have (existing sandboxes, files of the folder), and the
    namespaces other apps of the environment use."""
    folder = root / env.path
    files = {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    namespaces: set[str] = set()
    try:
        tree = discover(root, env.path)
    except RenderError:
        tree = None
    for app in tree.apps if tree else []:
        namespace = app_namespace(app)
        if namespace and not sandbox_of(app.helm_release or app.kustomization):
            namespaces.add(namespace)
    return files | {s.id for s in read_sandboxes(root, env.path)}, namespaces


def _checked_id(
    sandbox_id: str, choices: list[Choice], config: Sandboxes, taken: set[str], used: set[str]
) -> str:
    check_id(sandbox_id)
    if sandbox_id in taken:
        raise SandboxError(
            f"sandbox ID {sandbox_id!r} is taken: a sandbox or file of that name exists; "
            "choose another with --id"
        )
    if sandbox_id == config.rds_default:
        raise SandboxError(f"sandbox ID {sandbox_id!r} names the shared environment's namespaces")
    for choice in choices:
        namespace = config.namespace.format(app=choice.app, id=sandbox_id)
        if namespace in used:
            raise SandboxError(
                f"sandbox ID {sandbox_id!r}: namespace {namespace} belongs to another app "
                "of the environment"
            )
    return sandbox_id


def stage(
    workspace: Workspace,
    request: StageRequest,
    *,
    author: Author | None = None,
    dry_run: bool = False,
    resolve: ResolveCommit = remote_commit,
    retry: RetryPolicy | None = None,
    hooks: bool = True,
) -> StageResult:
    """`conveyor stage`: one commit adding `<env folder>/<id>.yaml` (none with `dry_run`:
    the file is in the result)."""
    config, env = sandbox_environment(workspace, request.env)
    checkout = workspace.checkout(env.branch)
    choices = parse_choices(request.specs, config)
    pins = decide_pins(choices, pin=request.pin, no_pin=request.no_pin)
    # An automatic sandbox lives as long as its candidate: expiring it would only have
    # the next pass stage it again.
    ttl = request.ttl or (None if request.auto else config.ttl)
    seconds = ttl_seconds(ttl) if ttl else None
    resolved: dict[tuple[str, str], str | None] = {}

    def cached(url: str, ref: str) -> str | None:
        # ls-remote once per chart ref, whatever the number of push attempts.
        if (url, ref) not in resolved:
            resolved[(url, ref)] = resolve(url, ref)
        return resolved[(url, ref)]

    def build(root: Path) -> StageResult:
        texts = read_candidates(root, choices, config)
        taken, used = taken_names(root, env, config)
        if request.replace and request.sandbox_id:
            taken.discard(request.sandbox_id)
        if request.sandbox_id:
            sandbox_id = _checked_id(request.sandbox_id, choices, config, taken, used)
        else:
            sandbox_id = _checked_id(
                default_id(request.user, choices, taken=taken), choices, config, taken, used
            )
        moment = now()
        expires = timestamp(moment + timedelta(seconds=seconds)) if seconds else None
        staging = Staging(
            sandbox_id=sandbox_id,
            pins=frozenset(pins),
            with_rds=request.with_rds,
            staged_by=request.user,
            staged_at=timestamp(moment),
            expires_at=expires,
            auto=request.auto,
        )
        text = build_sandbox(texts, choices, staging, config=config, resolve=cached)
        return StageResult(
            sandbox_id=sandbox_id,
            env=env.name,
            file=f"{env.path}/{sandbox_id}.yaml",
            text=text,
            commit=None,
            choices=choices,
            pins=sorted(pins),
            expires_at=expires,
            url=config.url.format(id=sandbox_id) if config.url else None,
        )

    if dry_run:
        return build(checkout.path)
    state: dict[str, StageResult] = {}
    hooked: list[str] = []

    def change(root: Path) -> None:
        result = build(root)
        if hooks and (not hooked or hooked[-1] != result.sandbox_id):
            if hooked and not request.sandbox_id:
                # Our default ID was taken by a concurrent stage: its resources go.
                run_hooks(config.hooks, "delete", hooked[-1])
            result.hook_output = run_hooks(config.hooks, "create", result.sandbox_id)
            hooked.append(result.sandbox_id)
        (root / result.file).write_text(result.text)
        state["result"] = result

    def message() -> str:
        result = state["result"]
        apps = ", ".join(f"{c.app} {c.ref_id}" for c in result.choices)
        pinned = f" (pinned: {', '.join(result.pins)})" if result.pins else ""
        verb = "Restage" if request.replace else "Stage"
        who = "conveyor (auto)" if request.auto else request.user
        return (
            f"{verb} sandbox {result.sandbox_id}: {apps}{pinned}\n\n"
            f"Staged by {who}"
            + (f" ({request.reason})" if request.reason else "")
            + (f", expires {result.expires_at}" if result.expires_at else "")
            + f".\n\n{change_trailer('stage')}\nConveyor-Request: {request_id}"
        )

    # Two identical requests in the same second would make byte-identical commits (same
    # tree, parent, author, time): the second push would "land" as the first's, and both
    # would claim one ID. A trailer of this run's own keeps every attempt's commit apart.
    request_id = uuid.uuid4().hex[:12]
    commit = commit_and_push(
        checkout, change, message=message, author=author or Author(name=request.user), retry=retry
    )
    result = state["result"]
    result.commit = commit
    return result


@dataclass
class UnstageResult:
    ids: list[str]
    commit: str | None
    env: str

    def to_dict(self) -> dict[str, object]:
        return {"ids": self.ids, "commit": self.commit, "env": self.env}


def _sandbox_files(root: Path, env: Environment, ids: Sequence[str]) -> list[Sandbox]:
    found = {s.id: s for s in read_sandboxes(root, env.path)}
    missing = [i for i in ids if i not in found]
    if missing:
        known = ", ".join(sorted(found)) or "none"
        raise SandboxError(f"no sandbox {', '.join(missing)} in {env.name} (sandboxes: {known})")
    return [found[i] for i in ids]


def unstage(
    workspace: Workspace,
    ids: Sequence[str],
    *,
    env: str | None = None,
    author: Author | None = None,
    reason: str | None = None,
    hooks: bool = True,
    retry: RetryPolicy | None = None,
) -> UnstageResult:
    """`conveyor unstage`: one commit removing the sandboxes' files (the agent then
    prunes their objects, releases and namespaces). The delete hooks run first."""
    if not ids:
        raise SandboxError("name the sandboxes to remove")
    config, environment_ = sandbox_environment(workspace, env)
    checkout = workspace.checkout(environment_.branch)
    sandboxes = _sandbox_files(checkout.path, environment_, ids)
    if hooks:
        for sandbox in sandboxes:
            run_hooks(config.hooks, "delete", sandbox.id)

    def change(root: Path) -> None:
        for sandbox in read_sandboxes(root, environment_.path):
            if sandbox.id in ids:
                (root / sandbox.file).unlink()

    why = f" ({reason})" if reason else ""
    commit = commit_and_push(
        checkout,
        change,
        message=f"Unstage sandbox {', '.join(ids)}{why}\n\n{change_trailer('unstage')}",
        author=author or Author(),
        retry=retry,
    )
    return UnstageResult(list(ids), commit, environment_.name)


def extend(
    workspace: Workspace,
    sandbox_id: str,
    ttl: str,
    *,
    env: str | None = None,
    author: Author | None = None,
) -> str | None:
    """A sandbox's expiry set to `ttl` from now, in one commit; its new expiry."""
    seconds = ttl_seconds(ttl)
    _, environment_ = sandbox_environment(workspace, env)
    checkout = workspace.checkout(environment_.branch)
    (sandbox,) = _sandbox_files(checkout.path, environment_, [sandbox_id])
    expires = timestamp(now() + timedelta(seconds=seconds))

    def change(root: Path) -> None:
        current = read_sandbox(root, sandbox.file)
        if current is None:
            raise SandboxError(f"sandbox {sandbox_id} was removed meanwhile")
        path = root / sandbox.file
        path.write_text(with_expiry(path.read_text(), expires, source=sandbox.file))

    commit_and_push(
        checkout,
        change,
        message=f"Extend sandbox {sandbox_id} until {expires}\n\n{change_trailer('stage')}",
        author=author or Author(),
    )
    return expires


def list_sandboxes(
    workspace: Workspace, *, env: str | None = None
) -> tuple[Environment, list[Sandbox]]:
    _, environment_ = sandbox_environment(workspace, env)
    return environment_, read_sandboxes(workspace.env_root(environment_), environment_.path)


NOT_DEPLOYED = "NotDeployed"


async def cluster_states(kube: KubeClient, sandboxes: list[Sandbox]) -> None:
    """Each app's state as the agent reported it (its ConveyorApp, found by release)."""
    statuses = {s.release: s for s in await StatusStore(kube).list_all() if s.release}
    for sandbox in sandboxes:
        for app in sandbox.apps:
            status = statuses.get(f"{app.namespace}/{app.release}")
            app.state = status.state if status else NOT_DEPLOYED
            app.message = status.message if status else "no status yet: the agent has not run it"
