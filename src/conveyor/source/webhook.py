"""The git webhook receiver, and the limits of every HTTP listener conveyor opens.

`/hooks/git` is the one endpoint meant to face the internet (GitHub delivers to it), so
it assumes a hostile network: the body is read as a stream up to a cap (an unsigned
200 MB body is refused after the cap, not read whole), slowly as well as largely sent
requests are cut off, a signature made with an empty key cannot exist because an empty
secret is refused when the agent starts, and a signed delivery replayed within the
window triggers nothing. The receiver lives in `source/` because a push notification is
a source event: all it does is ask for a fetch.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from conveyor.config.userfile import UserFileError, load_json
from conveyor.errors import ConveyorError

SIGNATURE_HEADER = "X-Hub-Signature-256"
DELIVERY_HEADER = "X-GitHub-Delivery"


class WebhookError(ConveyorError):
    """A webhook secret that cannot be used."""


def load_secret(path: Path) -> bytes:
    """The HMAC key: the file's bytes without surrounding whitespace (the trailing
    newline editors add). An empty key is refused: anyone can sign with it."""
    try:
        secret = path.read_bytes().strip()
    except OSError as error:
        raise WebhookError(
            f"cannot read the webhook secret file {path}: {error.strerror}"
        ) from None
    if not secret:
        raise WebhookError(
            f"the webhook secret file {path} is empty: anyone could sign a delivery with "
            "an empty key; write a random secret into it (e.g. `openssl rand -hex 32`)"
        )
    return secret


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """GitHub's X-Hub-Signature-256: `sha256=` + hex HMAC of the raw body."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header.removeprefix("sha256="))


class DeliveryLog:
    """Delivery IDs seen within the last `window` seconds. Only signed deliveries are
    recorded, so nobody without the key can fill it; `capacity` bounds its memory all
    the same (the oldest IDs go first)."""

    def __init__(
        self,
        *,
        window: float,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def replayed(self, delivery: str) -> bool:
        """Whether `delivery` was seen within the window; records it when not."""
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now - self.window:
            self._seen.popitem(last=False)
        if delivery in self._seen:
            return True
        self._seen[delivery] = now
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return False


class _BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class WebhookLimits:
    # GitHub caps its payloads at 25 MB; a push event is a few KB to a few hundred.
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 10.0  # for the whole body, however slowly it trickles in
    replay_window: float = 3600.0


class GitWebhook:
    """POST /hooks/git: a signed delivery calls `on_push` (which schedules a fetch)."""

    def __init__(
        self,
        secret: bytes | None,
        *,
        on_push: Callable[[], None],
        tracked_branch: Callable[[], str | None] = lambda: None,
        limits: WebhookLimits | None = None,
    ) -> None:
        """`tracked_branch`: the branch the agent follows, once known; a signed push to
        another branch is answered and ignored."""
        if secret is not None and not secret:
            raise WebhookError("the webhook secret is empty: anyone could sign with it")
        self.secret = secret
        self.on_push = on_push
        self.tracked_branch = tracked_branch
        self.limits = limits or WebhookLimits()
        self.deliveries = DeliveryLog(window=self.limits.replay_window)

    async def receive(self, request: Request) -> Response:
        if self.secret is None:
            return _error(
                404, "no webhook secret configured: start the agent with --webhook-secret-file"
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return self._too_large()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                body = await self._read_body(request)
        except _BodyTooLarge:
            return self._too_large()
        except TimeoutError:
            return _error(408, f"the body took longer than {self.limits.body_timeout:g}s")
        except ClientDisconnect:
            return _error(400, "the client went away before its body ended")
        if not verify_signature(self.secret, body, request.headers.get(SIGNATURE_HEADER)):
            return _error(401, "invalid or missing signature")
        delivery = request.headers.get(DELIVERY_HEADER)
        if delivery and self.deliveries.replayed(delivery):
            return JSONResponse({"status": f"delivery {delivery} already received; ignored"})
        branch, tracked = pushed_branch(body), self.tracked_branch()
        if branch is not None and tracked is not None and branch != tracked:
            return JSONResponse({"status": f"ignored: a push to {branch}, not {tracked}"})
        self.on_push()
        return JSONResponse({"status": "reconcile scheduled"}, status_code=202)

    async def _read_body(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self) -> Response:
        return _error(413, f"the body exceeds {self.limits.max_body_bytes} bytes")


def pushed_branch(body: bytes) -> str | None:
    """The branch a push event names (`"ref": "refs/heads/<branch>"`, as GitHub, Gitea and
    GitLab send it); None for any other body (a ping, a tag, a form-encoded payload), which
    triggers a fetch as before. The body is read by the bounded loader: it is input."""
    try:
        event = load_json(body, file="webhook body")
    except UserFileError:
        return None
    ref = event.get("ref") if isinstance(event, dict) else None
    if isinstance(ref, str) and ref.startswith("refs/heads/"):
        return ref.removeprefix("refs/heads/")
    return None


def _error(status: int, message: str) -> Response:
    # Connection: close, so a client that is still sending is not read any further.
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


# -- the listeners' limits ---------------------------------------------------------------


@dataclass(frozen=True)
class ListenerLimits:
    """Limits of a listening socket against slow or greedy clients."""

    header_timeout: float = 10.0  # from the connection (or its next request) to the headers' end
    keep_alive: int = 5  # seconds: an idle kept-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # request line and headers together
    concurrency: int | None = None  # connections at once; past it, 503


class _HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head: uvicorn times out only
    idle kept-alive connections, so a client sending its headers a byte at a time would
    hold a connection forever."""

    header_timeout = ListenerLimits.header_timeout
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # a kept-alive connection begins its next request
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _HeaderSizeLimit:
    """431 for a request head larger than the limit. h11's own limit caps only what it
    buffers while a head is incomplete; a head that arrives in one read passes it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope["raw_path"]) + len(scope["query_string"])
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                response = _error(431, f"the request head exceeds {self.max_bytes} bytes")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def listener_config(
    app: ASGIApp, listen: str, *, limits: ListenerLimits | None = None, **options: Any
) -> uvicorn.Config:
    """A uvicorn configuration for HOST:PORT with `limits` enforced; `options` are
    uvicorn's own (log level, lifespan...)."""
    limits = limits or ListenerLimits()
    host, _, port = listen.rpartition(":")
    protocol = type(
        "HeaderDeadlineProtocol",
        (_HeaderDeadlineProtocol,),
        {"header_timeout": limits.header_timeout},
    )
    return uvicorn.Config(
        _HeaderSizeLimit(app, max_bytes=limits.max_header_bytes),
        host=host or "127.0.0.1",
        port=int(port),
        http=protocol,
        timeout_keep_alive=limits.keep_alive,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=limits.concurrency,
        **options,
    )
