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
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from conveyor.cluster.client import KubeClient
from conveyor.reconcile.engine import PassResult
from conveyor.reconcile.once import SourceFailure, reconcile_once
from conveyor.reconcile.status import StatusStore
from conveyor.reconcile.target import Target

log = logging.getLogger("conveyor.web")

Scope = Literal["app", "environment"]


class ActionError(Exception):
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


def default_registry() -> ActionRegistry:
    """The actions whose package code exists: reconcile now, suspend, resume."""
    registry = ActionRegistry()

    @registry.action(
        "reconcile",
        label="Reconcile now",
        scopes=("app", "environment"),
        description="One pass of `conveyor reconcile` for the environment (or one app).",
    )
    async def reconcile(context: ActionContext, request: ActionRequest) -> ActionResult:
        target = await context.target(request.environment)

        async def run() -> None:
            # reconcile_once runs git and helm as it does for the CLI; its own thread and
            # loop keep that work off the server's loop.
            result = await asyncio.to_thread(
                asyncio.run, reconcile_once(target, app=request.app, notify_grace=5.0)
            )
            log.info("reconcile of %s by %s: %s", request.subject, request.actor, _outcome(result))

        context.background(f"reconcile:{request.environment}", run())
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

    return registry


def _outcome(result: PassResult | SourceFailure) -> str:
    if isinstance(result, SourceFailure):
        return f"source failed: {result.message}"
    ready = sum(s.ready for s in result.statuses.values())
    return f"{ready}/{len(result.statuses)} Ready at {result.revision[:12]}"
