"""The actions the engine takes for an app's state (reconcile/state.py), one per module.

Each action receives what it works with as values, an `ActionContext` (the cluster, helm,
the watch cache, the pass's revision, the write slots), the app's status and its plan
(reconcile/plan.py: what to apply and prune), and changes the cluster and the status,
nothing else. An action that fails raises
`AppFailed` with a typed reason; the engine then determines the app's state again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from conveyor.cluster.client import KubeClient
from conveyor.cluster.live import LiveCache
from conveyor.cluster.objects import Obj, ObjectRef, drift_paths
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.errors import ConveyorError
from conveyor.reconcile.plan import AppPlan, Desired, plan_app
from conveyor.reconcile.status import AppStatus, Reason
from conveyor.render.helm import HelmCLI
from conveyor.render.render import RenderedApp

# Renders app NAME as it was at REVISION: a plain app's last good objects, to roll back to.
RenderPast = Callable[[str, str], Awaitable[RenderedApp]]


class AppFailed(ConveyorError):
    """One attempt at an app failed; `reason` says how, the message why in one line,
    `details` what the tool or server said in full (if it said more)."""

    def __init__(self, reason: Reason, message: str, *, details: str | None = None) -> None:
        self.reason = reason
        self.details = details
        super().__init__(message)


class ReleaseLocked(AppFailed):
    """helm refused the upgrade: another operation left the release pending."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.UPGRADE_FAILED, message)


@dataclass
class DesiredObjects:
    """What each app should look like in the cluster (its objects and its release's), so
    that a watch event on one of them can be judged as drift of that app.

    While conveyor writes an app (`writing`), the watch events of its objects are its own
    writes, and the app's new desired state is not remembered yet: judged against the
    old one, each would look like drift and cost a pass (at 1200 apps, an update queued
    every app again). They are not judged; an edit made by someone in that window is
    still seen by the next full pass, which compares the watch cache itself."""

    by_app: dict[str, Desired] = field(default_factory=dict)
    owner: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    drifted: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    _writing: set[str] = field(default_factory=set)

    @contextlib.contextmanager
    def writing(self, app: str) -> Iterator[None]:
        """While conveyor writes the app's objects and until it remembers the result (an
        app is written by one action at a time)."""
        self._writing.add(app)
        try:
            yield
        finally:
            self._writing.discard(app)

    def remember(self, app: str, desired: Desired) -> None:
        self.by_app[app] = desired
        for ref, _ in desired:
            self.owner[ref.key()] = app

    def forget(self, app: str) -> None:
        self.by_app.pop(app, None)

    def on_change(self, ref: ObjectRef, obj: Obj | None) -> None:
        """A watched object changed: if it belongs to an app and drifted, queue the app."""
        app = self.owner.get(ref.key())
        if app is None or app in self._writing:
            return
        wanted = next((o for r, o in self.by_app.get(app, []) if r.key() == ref.key()), None)
        if wanted is None:
            return
        if obj is None or drift_paths(wanted, obj):
            self.drifted.put_nowait(app)


@dataclass
class ActionContext:
    kube: KubeClient
    helm: HelmCLI
    live: LiveCache
    identity: EnvironmentIdentity
    scope: str
    revision: str  # the pass's revision: what new content is applied as
    desired: DesiredObjects
    apply_slots: asyncio.Semaphore  # bounded writes: slow rollouts never hold up others
    helm_slots: asyncio.Semaphore
    prune: bool
    timeout: float  # health timeout for apps that do not set their own
    poll_interval: float
    render_past: RenderPast | None = None

    async def plan(self, app: RenderedApp, status: AppStatus) -> AppPlan:
        """The app's plan in this environment, from what `status` says was applied."""
        return await plan_app(
            self.kube, app, status, identity=self.identity, scope=self.scope, prune=self.prune
        )

    def set(
        self, status: AppStatus, reason: Reason, message: str, *, details: str | None = None
    ) -> None:
        """The app's new state. The revision moves with the state, not with every commit
        to the repo, so a commit that does not touch an app writes nothing for it. The
        message is one line; a longer one is kept whole in `details`, as is `details`."""
        status.attempted_revision = self.revision
        status.state = reason.state
        status.reason = reason
        status.set_message(message, details=details)
