"""Leader election on a coordination.k8s.io/v1 Lease, so that two agents reconciling one
environment never apply at the same time.

Every write carries the Lease's resourceVersion: when two agents race, the apiserver
accepts one and answers 409 to the other. Whether another holder's lease has run out is
judged as client-go judges it, by this process's monotonic clock from the moment it saw
the lease record last change, never by the holder's timestamps alone, so clock skew
between machines cannot hand the lease to two holders. A leader that cannot renew stops
calling itself leader once its last renewal is older than the lease duration, which is
before any contender may take over.

Writes are held to a stricter bound than leadership (`write_budget`): none is *sent* in
the last `write_margin` seconds of the lease, and each write carries the time left as
its deadline, so that a write held up in flight (an apiserver paused mid-request) is cut
off by its writer before the lease can pass to another holder, instead of landing after.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.lease_loop import CrossLoopEvent, LeaseLoop
from conveyor.cluster.objects import Obj
from conveyor.errors import ConveyorError

LEASE_API_VERSION = "coordination.k8s.io/v1"
RETRY_INTERVAL = 2.0  # seconds between a candidate's attempts to acquire
log = logging.getLogger(__name__)
T = TypeVar("T")


class LeaseNotAcquiredError(ConveyorError, RuntimeError):
    def __init__(self, namespace: str, name: str, holder: str | None) -> None:
        self.holder = holder
        super().__init__(f"lease {namespace}/{name} is held by {holder or 'another agent'}")


class NotLeaderError(ConveyorError):
    """A write was refused (or cut off) because this process no longer holds the Lease."""

    def __init__(self, namespace: str, name: str, identity: str) -> None:
        super().__init__(f"{identity} no longer holds lease {namespace}/{name}; write refused")


def _micro_time() -> str:
    """Now as a Kubernetes MicroTime: RFC 3339 with microseconds, in UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_transient(error: Exception) -> bool:
    if isinstance(error, ApiError):
        return error.status >= 500 or error.status == 429
    return isinstance(error, httpx.TransportError)


class LeaderElector:
    """One candidate for one Lease. Use `acquire` then `run_renewals`, or `hold`."""

    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_interval: float = 5.0,
        retry_interval: float | None = None,
        write_margin: float | None = None,
        labels: dict[str, str] | None = None,
        runner: LeaseLoop | None = None,
    ) -> None:
        """`runner`: the loop this candidate's traffic and renewals run on (the agent's
        lease loop); `client` is then used on that loop only."""
        if not 0 < renew_interval < lease_duration:
            raise ValueError("renew_interval must be positive and shorter than lease_duration")
        # How often a candidate that is not leader tries again: client-go's RetryPeriod
        # (2 s), so a standby takes a released Lease within about that, not a renewal
        # interval later; never slower than renewing.
        if retry_interval is None:
            retry_interval = min(RETRY_INTERVAL, renew_interval)
        if retry_interval <= 0:
            raise ValueError("retry_interval must be positive")
        self.retry_interval = retry_interval
        # Time for a write the apiserver is already processing to be committed before the
        # lease runs out: a second is ample on a live apiserver, and never more than half
        # a renew interval, so a healthy leader always has room to write between renewals.
        self.write_margin = min(1.0, renew_interval / 2) if write_margin is None else write_margin
        if not 0 <= self.write_margin < lease_duration - renew_interval:
            raise ValueError("write_margin must leave room to write between renewals")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval
        self.labels = dict(labels or {})  # on the Lease, so that a set of them can be listed
        # Put on the Lease with each acquire and renewal (a shard's load): no extra write.
        self.annotations: dict[str, str] = {}
        self.runner = runner
        self.lost = CrossLoopEvent()
        """Set when this candidate stops being leader: lease lost, expired or released."""
        self._renewed_at: float | None = None  # monotonic time the last successful write was sent
        self._observed_spec: Obj | None = None
        self._observed_at = 0.0  # monotonic time _observed_spec was first seen

    @property
    def is_leader(self) -> bool:
        """True while the last successful acquire or renew is younger than the lease."""
        return self._validity_left() > 0

    @property
    def may_write(self) -> bool:
        """True while a write sent now would land well before the lease could expire."""
        return self._validity_left() > self.write_margin

    def write_budget(self) -> float:
        """Seconds a write sent now may take (its deadline); raises NotLeaderError once
        the lease is lost or within `write_margin` of running out. The write guard that
        KubeClient and HelmCLI call before every write."""
        budget = self._validity_left() - self.write_margin
        if budget <= 0:
            raise NotLeaderError(self.namespace, self.name, self.identity)
        return budget

    @property
    def holder(self) -> str | None:
        """The holder as last seen on the Lease (None when free or never read)."""
        return (self._observed_spec or {}).get("holderIdentity") or None

    def holder_expires_in(self) -> float:
        """Seconds until another holder's lease runs out as this candidate judges it (from
        when it saw the record last change); 0 when free or ours."""
        spec = self._observed_spec or {}
        if not self._held_by_another(spec):
            return 0.0
        duration = int(spec.get("leaseDurationSeconds") or math.ceil(self.lease_duration))
        return max(self._observed_at + duration - time.monotonic(), 0.0)

    def holder_renewed_ago(self) -> float | None:
        """Seconds since the holder's last renewal by its own timestamp (None if unknown):
        a hint of whether the holder is alive, for messages and for choosing whether to
        ask it; who may write is decided by `holder_expires_in`, which skew cannot fool."""
        renew_time = (self._observed_spec or {}).get("renewTime")
        if not renew_time:
            return None
        renewed = datetime.fromisoformat(str(renew_time).replace("Z", "+00:00"))
        return (datetime.now(UTC) - renewed).total_seconds()

    def holder_renews(self) -> bool:
        """Whether the holder renewed within its lease duration, by its own timestamp: a
        hint of whether it is alive, for choosing whether to ask it; who may write is
        decided by `holder_expires_in`, which clock skew cannot fool."""
        renewed = self.holder_renewed_ago()
        duration = int((self._observed_spec or {}).get("leaseDurationSeconds") or 0)
        return renewed is not None and renewed < duration

    async def on_runner(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await `coroutine` on this candidate's runner (here when it has none)."""
        return await (coroutine if self.runner is None else self.runner.run(coroutine))

    async def observe(self) -> str | None:
        """Read the Lease without writing: its holder while live by this candidate's
        judgement (another one's, not yet expired), else None."""
        return await self.on_runner(self._observe_lease())

    async def _observe_lease(self) -> str | None:
        lease = await self._read()
        spec = (lease or {}).get("spec") or {}
        self._observe(spec)
        return str(spec["holderIdentity"]) if self._held_by_another(spec) else None

    async def acquire(self, *, timeout: float | None = None) -> bool:
        """Become leader: create the Lease, take over an expired or released one, or renew
        our own. Retries every `retry_interval` until `timeout` (None: until acquired; 0:
        one attempt). Returns whether this candidate is now leader."""
        return await self.on_runner(self._acquire(timeout))

    async def _acquire(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if await self._try_acquire_or_renew():
                    self.lost.clear()
                    return True
            except (ApiError, httpx.TransportError) as error:
                if not _is_transient(error):
                    raise
                log.warning("lease %s/%s: acquire failed: %s", self.namespace, self.name, error)
            pause = self.retry_interval
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    return False
            await asyncio.sleep(pause)

    async def renew(self) -> bool:
        """Extend the lease while leader. False when not leader or the renewal failed; a
        failed renewal leaves `is_leader` to run out, a lease taken by another ends it."""
        return await self.on_runner(self._renew())

    async def _renew(self) -> bool:
        if not self.is_leader:
            return False
        try:
            return await self._try_acquire_or_renew()
        except (ApiError, httpx.HTTPError) as error:
            log.warning("lease %s/%s: renew failed: %s", self.namespace, self.name, error)
            return False

    async def release(self) -> None:
        """Stop being leader and clear holderIdentity, so a successor need not wait for the
        lease to run out. A failed release is logged: the lease then simply expires."""
        await self.on_runner(self._release())

    async def _release(self) -> None:
        was_holding = self._renewed_at is not None
        self._renewed_at = None
        self.lost.set()
        if not was_holding:
            return
        try:
            lease = await self._read()
            if lease is None or lease.get("spec", {}).get("holderIdentity") != self.identity:
                return
            spec = dict(lease["spec"])
            spec.pop("holderIdentity")
            spec["leaseDurationSeconds"] = 1
            spec["renewTime"] = _micro_time()
            lease["spec"] = spec
            await self.client.request("PUT", await self._path(), json_body=lease)
        except (ApiError, httpx.HTTPError) as error:
            log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, error)

    async def run_renewals(self) -> None:
        """Renew every `renew_interval` while leader; set `lost` and return once not."""
        await self.on_runner(self._run_renewals())

    async def _run_renewals(self) -> None:
        while (left := self._validity_left()) > 0:
            pause = min(self.renew_interval, left)
            slept_from = time.monotonic()
            await asyncio.sleep(pause)
            late = time.monotonic() - slept_from - pause
            left = self._validity_left()
            if late > self.write_margin:
                # The loop this runs on was held up (on the agent's own loop: by a pass's
                # steps; on the lease loop: by the process holding the GIL).
                log.warning(
                    "lease %s/%s: renewal %.1fs late; %.1fs of the lease left",
                    self.namespace,
                    self.name,
                    late,
                    left,
                )
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    await self._renew()
            except TimeoutError:
                log.warning("lease %s/%s: renew timed out", self.namespace, self.name)
        self.lost.set()

    @asynccontextmanager
    async def hold(self, *, timeout: float | None = None) -> AsyncIterator[CrossLoopEvent]:
        """Acquire (or raise LeaseNotAcquiredError), renew in the background, release on
        exit. Yields `lost`: work done under the lease must stop once it is set."""
        if not await self.acquire(timeout=timeout):
            raise LeaseNotAcquiredError(self.namespace, self.name, self.holder)
        renewals = asyncio.create_task(self.run_renewals())
        # One turn of this loop so the task hands the renewals to the runner now: work
        # under the lease that holds this loop from the start would otherwise delay
        # them until it yields, lease loop or not.
        await asyncio.sleep(0)
        try:
            yield self.lost
        finally:
            renewals.cancel()
            await asyncio.wait([renewals])
            await self.release()

    # -- one round of the protocol ---------------------------------------------------

    def _validity_left(self) -> float:
        """Seconds this candidate may still act as leader (0 when it is not leader)."""
        if self._renewed_at is None:
            return 0.0
        return max(self._renewed_at + self.lease_duration - time.monotonic(), 0.0)

    async def _path(self) -> str:
        resource = await self.client.resource(LEASE_API_VERSION, "Lease")
        return resource.path(namespace=self.namespace, name=self.name)

    async def _read(self) -> Obj | None:
        try:
            return await self.client.request("GET", await self._path())
        except ApiError as error:
            if error.not_found:
                return None
            raise

    def _observe(self, spec: Obj) -> None:
        if spec != self._observed_spec:
            self._observed_spec = dict(spec)
            self._observed_at = time.monotonic()

    def _held_by_another(self, spec: Obj) -> bool:
        holder = spec.get("holderIdentity")
        if not holder or holder == self.identity:
            return False
        duration = int(spec.get("leaseDurationSeconds") or math.ceil(self.lease_duration))
        return time.monotonic() < self._observed_at + duration

    def _next_spec(self, spec: Obj | None) -> Obj:
        now = _micro_time()
        ours = spec is not None and spec.get("holderIdentity") == self.identity
        transitions = int((spec or {}).get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.lease_duration),
            "acquireTime": (spec or {}).get("acquireTime", now) if ours else now,
            "renewTime": now,
            "leaseTransitions": transitions if ours or spec is None else transitions + 1,
        }

    def _stamp(self, lease: Obj) -> None:
        metadata = lease["metadata"]
        if self.labels:
            metadata["labels"] = {**(metadata.get("labels") or {}), **self.labels}
        if self.annotations:
            metadata["annotations"] = {**(metadata.get("annotations") or {}), **self.annotations}

    async def _try_acquire_or_renew(self) -> bool:
        sent_at = time.monotonic()
        lease = await self._read()
        if lease is None:
            method = "POST"
            path = (await self._path()).rpartition("/")[0]
            lease = {
                "apiVersion": LEASE_API_VERSION,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._next_spec(None),
            }
            self._stamp(lease)
        else:
            spec = lease.get("spec") or {}
            self._observe(spec)
            if self._held_by_another(spec):
                if self._renewed_at is not None:
                    self._renewed_at = None
                    self.lost.set()
                return False
            method = "PUT"
            path = await self._path()
            lease["spec"] = self._next_spec(spec)  # metadata keeps the resourceVersion read
            self._stamp(lease)
        try:
            written = await self.client.request(method, path, json_body=lease)
        except ApiError as error:
            if error.conflict:  # another candidate wrote first (409 on create and update)
                return False
            raise
        self._observe(written.get("spec") or {})
        self._renewed_at = sent_at
        return True
