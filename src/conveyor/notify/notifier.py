"""Deliver notifications in the background, so a slow or dead receiver costs a reconcile
nothing but a deque append.

Deliveries wait in one bounded queue drained by a few workers. When it is full the
oldest delivery is dropped and counted (`conveyor_notifications_dropped_total`): fresh
news matters more than stale. Each delivery is retried on network errors, 429 and 5xx
with exponential backoff and jitter; other 4xx answers are final.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Counter

from conveyor.config.project import ConfigError, NotificationRule, load_project
from conveyor.notify.sinks import Notification, Request, build_request

log = logging.getLogger("conveyor.notify")


@dataclass(frozen=True)
class NotifierOptions:
    capacity: int = 1000
    workers: int = 4
    attempts: int = 6
    backoff: float = 0.5  # first retry delay; doubles, with jitter
    max_backoff: float = 30.0
    timeout: float = 10.0


@dataclass
class _Rule:
    rule: NotificationRule
    secrets: dict[str, str]


class Notifier:
    def __init__(
        self,
        rules: Sequence[NotificationRule] = (),
        *,
        options: NotifierOptions | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.options = options or NotifierOptions()
        self._rules: list[_Rule] = []
        self._queue: collections.deque[Request] = collections.deque()
        self._ready = asyncio.Event()
        self._busy = 0
        self._workers: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None
        self.undelivered = 0  # dropped or given up on so far; close() adds the unsent
        registry = registry or CollectorRegistry()
        self.sent = Counter(
            "conveyor_notifications_total",
            "Notification deliveries by sink and result",
            ["sink", "result"],
            registry=registry,
        )
        self.dropped = Counter(
            "conveyor_notifications_dropped_total",
            "Notifications dropped because the queue was full (oldest first)",
            registry=registry,
        )
        self.set_rules(rules)

    def set_rules(self, rules: Sequence[NotificationRule]) -> None:
        """Take new rules (conveyor.yaml changed); a rule whose secret cannot be read is
        skipped with an error, the others keep working."""
        loaded = []
        for rule in rules:
            try:
                loaded.append(_Rule(rule, _read_secrets(rule)))
            except ConfigError as error:
                log.error("notification rule skipped: %s", error)
        self._rules = loaded

    @property
    def has_rules(self) -> bool:
        """Whether anything is sent at all: lets a caller skip work done only for a note."""
        return bool(self._rules)

    @property
    def pending(self) -> int:
        return len(self._queue) + self._busy

    def publish(self, note: Notification) -> None:
        """Queue `note` for every matching rule. Never blocks, never raises."""
        for entry in self._rules:
            if not entry.rule.matches(note.event, note.environment):
                continue
            try:
                request = build_request(entry.rule, note, entry.secrets)
            except ValueError as error:
                log.debug("notification %s not sent: %s", note.event, error)
                continue
            if len(self._queue) >= self.options.capacity:
                dropped = self._queue.popleft()
                self.dropped.inc()
                self.undelivered += 1
                self.sent.labels(dropped.sink, "dropped").inc()
            self._queue.append(request)
            self._ready.set()

    async def start(self) -> None:
        if self._workers:
            return
        self._http = httpx.AsyncClient(timeout=self.options.timeout, follow_redirects=False)
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.options.workers)]

    async def close(self, *, grace: float = 0.0) -> int:
        """Wait up to `grace` seconds for queued deliveries, then stop. Returns how many
        notifications were never delivered (dropped, failed, or still unsent)."""
        deadline = time.monotonic() + grace
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.undelivered += self.pending
        if self.pending:
            log.warning("%d notifications not delivered before the end", self.pending)
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        return self.undelivered

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            request = self._queue.popleft()
            self._busy += 1
            try:
                await self._deliver(request)
            finally:
                self._busy -= 1

    async def _deliver(self, request: Request) -> None:
        if self._http is None:
            raise RuntimeError("Notifier.start() was not called")
        options = self.options
        for attempt in range(options.attempts):
            problem: str
            try:
                response = await self._http.post(
                    request.url, content=request.body, headers=request.headers
                )
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 300:
                    self.sent.labels(request.sink, "delivered").inc()
                    return
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    break
            if attempt + 1 < options.attempts:
                delay = min(options.max_backoff, options.backoff * 2**attempt)
                log.info("%s notification failed (%s); retrying", request.sink, problem)
                await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311
        log.warning("%s notification not delivered: %s", request.sink, problem)
        self.undelivered += 1
        self.sent.labels(request.sink, "failed").inc()


def _read_secrets(rule: NotificationRule) -> dict[str, str]:
    secrets = {}
    if rule.webhook is not None and rule.webhook.secret is not None:
        secrets["secret"] = rule.webhook.secret.read()
    if rule.slack is not None and rule.slack.url_from is not None:
        secrets["url"] = rule.slack.url_from.read()
    if rule.git_status is not None:
        secrets["token"] = rule.git_status.token.read()
    return secrets


def project_rules(repo_root: Path) -> list[NotificationRule]:
    """The rules of the checkout's conveyor.yaml; none (logged) when it is malformed."""
    try:
        return load_project(repo_root).notifications
    except ConfigError as error:
        log.error("notifications off for this revision: %s", error)
        return []
