"""What the dashboard and the API can do, as a registry of actions.

Each action is one async function that calls the same package code as its CLI command;
registering it gives it a button on the pages, an API endpoint, an audit line and an
Event naming who did it. Promotion, approval, rollback and gate checks plug in the same
way, e.g.:

    @registry.action("approve", label="Approve", when=lambda s: s.state == WAITING_FOR_GATE)
    async def approve(context: ActionContext, request: ActionRequest) -> ActionResult:
        ...  # conveyor.promote's approve, as `conveyor approve` calls it
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from conveyor.cluster.client import KubeClient
from conveyor.config.project import ConfigError
from conveyor.errors import ConveyorError
from conveyor.promote.approvals import approve_in_repo
from conveyor.promote.gates import cluster_client
from conveyor.promote.pipeline import PromotionError, Workspace
from conveyor.promote.promotion import PromotionRequest, promote
from conveyor.promote.rollback import rollback_in_repo
from conveyor.promote.versions import VersionError
from conveyor.reconcile.engine import PassResult
from conveyor.reconcile.once import SourceFailure, reconcile_once
from conveyor.reconcile.requests import one_pass_identity
from conveyor.reconcile.status import StatusStore
from conveyor.reconcile.target import Target
from conveyor.render.helm import HelmCLI
from conveyor.sandboxes.candidates import SandboxError
from conveyor.sandboxes.stage import extend, unstage
from conveyor.source.git import Author, GitError, PushRaceLost, mask_url

log = logging.getLogger("conveyor.web")

# A "sandbox" action acts on one staging sandbox of an environment, named by its `id`
# parameter (the Sandboxes page's buttons), not on the whole environment.
Scope = Literal["app", "environment", "sandbox"]


class ActionError(ConveyorError):
    """The action cannot run; `status_code` says why (404 unknown, 409 busy...)."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        super().__init__(message)


@dataclass(frozen=True)
class ActionRequest:
    environment: str
    app: str | None  # None: the whole environment
    actor: str
    reason: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"{self.environment}/{self.app}" if self.app else self.environment


@dataclass(frozen=True)
class ActionResult:
    message: str
    accepted: bool = False  # True: started in the background (HTTP 202)


class ActionContext(Protocol):
    """What an action may use; the dashboard provides it."""

    @property
    def kube(self) -> KubeClient: ...

    async def target(self, environment: str) -> Target:
        """The config repo target of an environment (raises ActionError when unknown)."""
        ...

    def background(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` after the response; ActionError(409) if `key` is still running."""
        ...


Handler = Callable[[ActionContext, ActionRequest], Awaitable[ActionResult]]
Available = Callable[[Any], bool]  # given an AppStatus: show the action for it?


@dataclass(frozen=True)
class Action:
    name: str
    label: str
    handler: Handler
    scopes: tuple[Scope, ...] = ("app",)
    when: Available = lambda _status: True
    description: str = ""
    confirm: str | None = None  # a question the page asks first


class ActionRegistry:
    def __init__(self) -> None:
        self._actions: dict[str, Action] = {}

    def register(self, action: Action) -> Action:
        if action.name in self._actions:
            raise ValueError(f"action {action.name!r} is registered twice")
        self._actions[action.name] = action
        return action

    def action(
        self,
        name: str,
        *,
        label: str,
        scopes: tuple[Scope, ...] = ("app",),
        when: Available = lambda _status: True,
        description: str = "",
        confirm: str | None = None,
    ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self.register(
                Action(
                    name,
                    label,
                    handler,
                    scopes=scopes,
                    when=when,
                    description=description or (handler.__doc__ or "").strip(),
                    confirm=confirm,
                )
            )
            return handler

        return decorate

    def get(self, name: str) -> Action | None:
        return self._actions.get(name)

    def __iter__(self) -> Iterator[Action]:
        return iter(self._actions.values())

    def for_app(self, status: Any) -> list[Action]:
        return [a for a in self if "app" in a.scopes and a.when(status)]

    def for_environment(self) -> list[Action]:
        return [a for a in self if "environment" in a.scopes]

    def for_sandbox(self) -> list[Action]:
        return [a for a in self if "sandbox" in a.scopes]


def default_registry() -> ActionRegistry:
    """Every action: reconcile now, suspend, resume, promote, approve, roll back, and
    extend or remove a staging sandbox."""
    registry = ActionRegistry()

    @registry.action(
        "reconcile",
        label="Reconcile now",
        scopes=("app", "environment"),
        description="One pass of `conveyor reconcile` for the environment (or one app).",
    )
    async def reconcile(context: ActionContext, request: ActionRequest) -> ActionResult:
        target = await context.target(request.environment)

        def run() -> str:
            # reconcile_once runs git and helm as it does for the CLI (asking the agent
            # that holds the lease, if one does); its own thread and loop keep that work
            # off the server's loop.
            return _outcome(asyncio.run(_reconcile(target, request, notify_grace=5.0)))

        context.background(f"reconcile:{request.environment}", _logged(request, "reconcile", run))
        return ActionResult(f"reconcile of {request.subject} started", accepted=True)

    @registry.action(
        "suspend",
        label="Suspend",
        when=lambda status: not status.suspended,
        description="Stop reconciling the app; its objects stay as they are.",
        confirm="Suspend reconciliation of this app?",
    )
    async def suspend(context: ActionContext, request: ActionRequest) -> ActionResult:
        await StatusStore(context.kube).set_suspended(request.environment, str(request.app), True)
        return ActionResult(f"{request.subject} suspended")

    @registry.action(
        "resume",
        label="Resume",
        when=lambda status: bool(status.suspended),
        description="Reconcile the app again from the next pass.",
    )
    async def resume(context: ActionContext, request: ActionRequest) -> ActionResult:
        await StatusStore(context.kube).set_suspended(request.environment, str(request.app), False)
        return ActionResult(f"{request.subject} resumed")

    @registry.action(
        "promote",
        label="Promote here",
        scopes=("app", "environment"),
        description="Copy release versions from the previous environment (param `from`, or "
        "an exact `version`) once this environment's gates pass, then apply them.",
        confirm="Promote into this environment (its gates are checked first)?",
    )
    async def promote_here(context: ActionContext, request: ActionRequest) -> ActionResult:
        target = await context.target(request.environment)
        promotion = PromotionRequest(
            repo=target.repo,
            target=request.environment,
            source=request.params.get("from"),
            app=request.app,
            version=request.params.get("version"),
        )

        def promote_and_apply() -> str:
            with tempfile.TemporaryDirectory(prefix="conveyor-promote-") as workdir:
                result = asyncio.run(
                    promote(
                        promotion,
                        workspace=Workspace(target.repo, Path(workdir)),
                        author=_author(request),
                        kube=cluster_client,
                        helm=HelmCLI(),
                    )
                )
            if not result.commit:
                return "nothing to promote"
            return f"committed {result.commit[:12]}; " + _outcome(
                asyncio.run(_reconcile(target, request))
            )

        context.background(
            f"promote:{request.environment}", _logged(request, "promotion", promote_and_apply)
        )
        return ActionResult(f"promotion into {request.subject} started", accepted=True)

    @registry.action(
        "approve",
        label="Approve",
        scopes=("app", "environment"),
        description="Record an approval of `version` for this environment, in git.",
    )
    async def approve(context: ActionContext, request: ActionRequest) -> ActionResult:
        version = request.params.get("version")
        if not version:
            raise ActionError(422, "approve needs a `version` parameter")
        target = await context.target(request.environment)

        def record() -> str | None:
            with tempfile.TemporaryDirectory(prefix="conveyor-approve-") as workdir:
                return approve_in_repo(
                    target.repo,
                    Path(workdir),
                    env=request.environment,
                    version=version,
                    by=request.actor,
                    author=_author(request),
                )[1]

        try:
            commit = await asyncio.to_thread(record)
        except (PromotionError, ConfigError, VersionError) as error:
            raise ActionError(422, str(error)) from None
        if commit is None:
            return ActionResult(f"{request.actor} had approved {version} already")
        return ActionResult(f"approved {version} for {request.environment} ({commit[:12]})")

    @registry.action(
        "rollback",
        label="Roll back",
        description="Commit the app's previous version (or param `to`) and apply it.",
        confirm="Roll this app back to its previous version?",
    )
    async def rollback(context: ActionContext, request: ActionRequest) -> ActionResult:
        target = await context.target(request.environment)

        def roll_back_and_apply() -> str:
            with tempfile.TemporaryDirectory(prefix="conveyor-rollback-") as workdir:
                result = rollback_in_repo(
                    target.repo,
                    Path(workdir),
                    env=request.environment,
                    app=str(request.app),
                    to=request.params.get("to"),
                    author=_author(request),
                )
            return f"restored {result.plan.version}; " + _outcome(
                asyncio.run(_reconcile(target, request))
            )

        context.background(
            f"rollback:{request.subject}", _logged(request, "rollback", roll_back_and_apply)
        )
        return ActionResult(f"rollback of {request.subject} started", accepted=True)

    @registry.action(
        "extend-sandbox",
        label="Extend",
        scopes=("sandbox",),
        description="Expire the sandbox `id` only `ttl` (24h unless given) from now: a commit.",
    )
    async def extend_sandbox(context: ActionContext, request: ActionRequest) -> ActionResult:
        sandbox_id, target = _sandbox_id(request), await context.target(request.environment)
        ttl = request.params.get("ttl") or "24h"

        def run() -> str | None:
            with tempfile.TemporaryDirectory(prefix="conveyor-stage-") as workdir:
                workspace = Workspace(target.repo, Path(workdir))
                return extend(workspace, sandbox_id, ttl, author=_author(request))

        expires = await _sandbox_work(run)
        return ActionResult(f"sandbox {sandbox_id} expires {expires}")

    @registry.action(
        "unstage",
        label="Unstage",
        scopes=("sandbox",),
        description="Remove the sandbox `id` (a commit); the agent prunes what it ran. The "
        "delete hooks are not run from the dashboard: run `conveyor unstage` for those.",
        confirm="Remove this sandbox and everything it runs?",
    )
    async def unstage_sandbox(context: ActionContext, request: ActionRequest) -> ActionResult:
        sandbox_id, target = _sandbox_id(request), await context.target(request.environment)

        def run() -> str | None:
            with tempfile.TemporaryDirectory(prefix="conveyor-stage-") as workdir:
                workspace = Workspace(target.repo, Path(workdir))
                reason = request.reason or f"by {request.actor} from the dashboard"
                result = unstage(
                    workspace, [sandbox_id], author=_author(request), reason=reason, hooks=False
                )
                return result.commit

        commit = await _sandbox_work(run)
        return ActionResult(f"sandbox {sandbox_id} unstaged ({(commit or '')[:12]})")

    return registry


def _sandbox_id(request: ActionRequest) -> str:
    sandbox_id = request.params.get("id")
    if not sandbox_id:
        raise ActionError(422, "name the sandbox: an `id` parameter")
    return sandbox_id


async def _sandbox_work(work: Callable[[], str | None]) -> str | None:
    try:
        return await asyncio.to_thread(work)
    except (SandboxError, PromotionError, ConfigError) as error:
        raise ActionError(422, str(error)) from None
    except (GitError, PushRaceLost) as error:
        raise ActionError(502, mask_url(str(error))) from None


async def _reconcile(
    target: Target, request: ActionRequest, *, notify_grace: float = 10.0
) -> PassResult | SourceFailure:
    """A pass for the dashboard, by the environment's one writer (the agent, asked)."""
    return await reconcile_once(
        target,
        app=request.app,
        notify_grace=notify_grace,
        identity=one_pass_identity("dashboard"),
    )


def _author(request: ActionRequest) -> Author:
    return Author(name=f"{request.actor} (dashboard)", email="conveyor@localhost")


async def _logged(request: ActionRequest, what: str, work: Callable[[], str]) -> None:
    """Run blocking git/helm work off the server's loop; its outcome goes to the log."""
    try:
        outcome = await asyncio.to_thread(work)
    except Exception as error:
        log.error(
            "%s of %s by %s failed: %s", what, request.subject, request.actor, mask_url(str(error))
        )
        return
    log.info("%s of %s by %s: %s", what, request.subject, request.actor, outcome)


def _outcome(result: PassResult | SourceFailure) -> str:
    if isinstance(result, SourceFailure):
        return f"source failed: {result.message}"
    ready = sum(s.ready for s in result.statuses.values())
    outcome = f"{ready}/{len(result.statuses)} Ready at {result.revision[:12]}"
    if result.shards:
        outcome += f" by {len(result.shards)} shard(s)"
    if result.gone_shards:
        outcome += f"; died before answering: {', '.join(result.gone_shards)}"
    return outcome
