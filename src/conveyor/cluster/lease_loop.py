"""An event loop of its own, in a thread, for an agent's Lease traffic.

An asyncio loop is fair only between steps: a pass over thousands of apps queues
thousands of ready steps, and a renewal whose timer fires behind them waits for all of
them. At 5,000 apps per process that was longer than the lease, and shards lost their
Leases mid-pass. On a loop of its own, the renewals (and a shard's reads of the live
set) wait only for Python's thread switch (milliseconds), however busy the agent's loop
is. The lease client is used on this loop only; what the agent's loop awaits from it
goes through `run`, and what it waits on is a `CrossLoopEvent`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LeaseLoop:
    """A thread running an event loop for coroutines sent with `run`."""

    def __init__(self, *, name: str = "conveyor-lease") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the lease loop and await its result on the caller's loop.
        Cancelling the caller cancels the coroutine there too."""
        if self._running_here():
            return await coroutine
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the loop (after what it runs is cancelled) and wait for the thread."""
        if self._loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _running_here(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False


class CrossLoopEvent:
    """An asyncio.Event that any thread may set or clear, awaited on any loop: the lease
    loop sets it (a Lease lost, the live shards changed), the agent's loop waits on it."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def is_set(self) -> bool:
        return self._flag.is_set()

    def set(self) -> None:
        with self._lock:
            self._flag.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)

    def clear(self) -> None:
        self._flag.clear()

    async def wait(self) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._flag.is_set():
                return True
            self._waiters.append((loop, future))
        try:
            await future
        finally:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))
        return True


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
