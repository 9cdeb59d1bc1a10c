"""The lease loop: renewals go on while the agent's own loop is busy for longer than the
lease, and what the agent awaits there (results, cancellation, events) crosses threads.
On the real sandbox, every agent and shard in tests/cluster renews this way."""

from __future__ import annotations

import asyncio
import threading
import time

from conveyor.cluster.lease import LeaderElector
from conveyor.cluster.lease_loop import CrossLoopEvent, LeaseLoop
from tests.unit.test_one_writer import LeaseApi


def elector(api: LeaseApi, runner: LeaseLoop | None) -> LeaderElector:
    return LeaderElector(
        api,  # type: ignore[arg-type]
        namespace="conveyor-system",
        name="conveyor-staging",
        identity="agent-a",
        lease_duration=1.5,
        renew_interval=0.3,
        runner=runner,
    )


async def leader_after_a_busy_loop(candidate: LeaderElector, *, busy: float) -> bool:
    """Acquire, renew in the background, then hold this loop for `busy` seconds without
    yielding (as a pass's steps over thousands of apps do); still leader afterwards?"""
    assert await candidate.acquire(timeout=0)
    renewals = asyncio.create_task(candidate.run_renewals())
    await asyncio.sleep(0)  # the renewal task starts
    time.sleep(busy)
    leader = candidate.is_leader
    renewals.cancel()
    await asyncio.gather(renewals, return_exceptions=True)
    return leader


def test_renewals_on_the_lease_loop_outlast_a_busy_agent_loop() -> None:
    runner = LeaseLoop()
    try:
        api = LeaseApi()
        assert asyncio.run(leader_after_a_busy_loop(elector(api, runner), busy=2.5))
        assert api.version >= 5  # the create and renewals every 0.3 s meanwhile
    finally:
        runner.close()


def test_renewals_on_the_agents_loop_lose_the_lease_when_it_is_busy() -> None:
    """The failure the lease loop exists for (without it, the test above fails so)."""
    api = LeaseApi()
    assert not asyncio.run(leader_after_a_busy_loop(elector(api, None), busy=2.5))
    assert api.version == 1  # only the create: no renewal got a turn


def test_run_returns_results_and_cancelling_the_caller_cancels_the_coroutine() -> None:
    runner = LeaseLoop()
    cancelled = threading.Event()

    async def where() -> str:
        return threading.current_thread().name

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    async def main() -> str:
        name = await runner.run(where())
        task = asyncio.create_task(runner.run(forever()))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return name

    try:
        assert asyncio.run(main()) == "conveyor-lease"
        assert cancelled.wait(timeout=5)
    finally:
        runner.close()


def test_an_event_set_on_another_thread_wakes_its_waiter() -> None:
    event = CrossLoopEvent()

    async def main() -> float:
        started = time.monotonic()
        threading.Timer(0.2, event.set).start()
        await asyncio.wait_for(event.wait(), timeout=5)
        return time.monotonic() - started

    assert 0.15 < asyncio.run(main()) < 5
    assert event.is_set()
    event.clear()
    assert not event.is_set()


def test_work_under_hold_that_holds_the_loop_from_its_start_keeps_the_lease() -> None:
    """`hold` hands the renewals to the lease loop before the work under it starts (a
    one-pass reconcile renders before it first yields)."""

    async def leader_after_blocking_at_once(candidate: LeaderElector) -> bool:
        async with candidate.hold(timeout=0):
            time.sleep(2.5)
            return candidate.is_leader

    runner = LeaseLoop()
    try:
        assert asyncio.run(leader_after_blocking_at_once(elector(LeaseApi(), runner)))
    finally:
        runner.close()
