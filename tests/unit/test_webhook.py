"""The webhook receiver against a hostile client: a real uvicorn listener on loopback,
spoken to through raw sockets so that the tests can be slow or greedy on purpose.
Every loop here is bounded in bytes and seconds."""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from conveyor.source.webhook import (
    DeliveryLog,
    GitWebhook,
    ListenerLimits,
    WebhookError,
    WebhookLimits,
    listener_config,
    load_secret,
)

SECRET = b"s3cret-for-the-hook"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Listener:
    port: int
    pushes: list[float]


@pytest.fixture
def listener() -> Iterator[Listener]:
    pushes: list[float] = []
    hook = GitWebhook(
        SECRET,
        on_push=lambda: pushes.append(time.monotonic()),
        limits=WebhookLimits(max_body_bytes=1 * MIB, body_timeout=1.0, replay_window=60),
    )
    app = Starlette(routes=[Route("/hooks/git", hook.receive, methods=["POST"])])
    port = free_port()
    limits = ListenerLimits(header_timeout=1.0, keep_alive=1, max_header_bytes=8 * 1024)
    config = listener_config(
        app, f"127.0.0.1:{port}", limits=limits, log_level="critical", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the listener did not start"
        time.sleep(0.02)
    yield Listener(port, pushes)
    server.should_exit = True
    thread.join(timeout=10)


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def head(length: int | None, *, extra: dict[str, str] | None = None) -> bytes:
    lines = ["POST /hooks/git HTTP/1.1", "Host: 127.0.0.1"]
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines.append(framing)
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, *, within: float = 5.0) -> bytes:
    """What the server sent until it closed or `within` passed."""
    data = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if ready:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
                break
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    with connect(port) as sock:
        sock.sendall(head(len(body), extra=headers) + body)
        response = read_response(sock)
    return status_of(response), json.loads(response.split(b"\r\n\r\n", 1)[1])


def stream_until_answered(sock: socket.socket, *, chunked: bool, limit: int) -> tuple[int, bytes]:
    """Send up to `limit` bytes of body in 64 KiB pieces, stopping once the server
    answers; returns the bytes sent and the answer."""
    piece = b"x" * 65536
    sent = 0
    while sent < limit:
        ready, _, _ = select.select([sock], [], [], 0)
        if ready:
            break
        try:
            sock.sendall(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    return sent, read_response(sock)


def test_a_signed_push_schedules_a_fetch_and_a_bad_signature_does_not(listener: Listener) -> None:
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    assert post(listener.port, body, {"X-Hub-Signature-256": sign(body)})[0] == 202
    assert post(listener.port, body, {"X-Hub-Signature-256": sign(b"other")})[0] == 401
    assert post(listener.port, body, {})[0] == 401
    assert len(listener.pushes) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_huge_unsigned_body_is_refused_at_the_cap_not_read_whole(
    listener: Listener, chunked: bool
) -> None:
    # Declared as 200 MB (or not declared at all, chunked): the server answers 413
    # once the cap (1 MiB here) is passed, long before the client could send it all.
    with connect(listener.port) as sock:
        sock.sendall(head(None if chunked else 200 * MIB))
        sent, response = stream_until_answered(sock, chunked=chunked, limit=200 * MIB)
    assert status_of(response) == 413, response[:200]
    assert sent < 40 * MIB  # the cap plus what the sockets' buffers took
    assert listener.pushes == []


def test_a_declared_length_over_the_cap_is_refused_before_any_body(listener: Listener) -> None:
    with connect(listener.port) as sock:
        sock.sendall(head(200 * MIB, extra={"X-Hub-Signature-256": sign(b"")}))
        response = read_response(sock)
    assert status_of(response) == 413
    assert b"exceeds 1048576 bytes" in response


def test_a_body_that_trickles_in_is_cut_off(listener: Listener) -> None:
    started = time.monotonic()
    with connect(listener.port) as sock:
        sock.sendall(head(1000))
        response = b""
        for _ in range(40):  # at most 40 bytes over 4 s; the body timeout is 1 s
            sock.sendall(b"x")
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready:
                response = read_response(sock)
                break
    assert status_of(response) == 408
    assert time.monotonic() - started < 3


def test_headers_sent_a_byte_at_a_time_are_cut_off(listener: Listener) -> None:
    started = time.monotonic()
    closed = False
    with connect(listener.port) as sock:
        for byte in (b"POST /hooks/git HTTP/1.1\r\nX-Slow: " + b"a" * 100)[:60]:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready and sock.recv(1024) == b"":
                closed = True
                break
    assert closed, "a request head sent over 6 s was still being read"
    assert time.monotonic() - started < 3  # the header timeout is 1 s


def test_a_connection_that_sends_nothing_is_closed(listener: Listener) -> None:
    started = time.monotonic()
    with connect(listener.port) as sock:
        ready, _, _ = select.select([sock], [], [], 5)
        assert ready and sock.recv(1024) == b""
    assert time.monotonic() - started < 3


def test_oversized_headers_are_refused(listener: Listener) -> None:
    with connect(listener.port) as sock:
        sock.sendall(head(2, extra={"X-Big": "a" * 20_000}) + b"{}")
        response = read_response(sock)
    assert status_of(response) in (400, 431)
    assert listener.pushes == []


def test_a_replayed_delivery_triggers_nothing(listener: Listener) -> None:
    body = b'{"ref":"refs/heads/main"}'
    headers = {"X-Hub-Signature-256": sign(body), "X-GitHub-Delivery": "72d3162e-cc78"}
    assert post(listener.port, body, headers)[0] == 202
    status, answer = post(listener.port, body, headers)
    assert status == 200 and "already received" in answer["status"]
    assert post(listener.port, body, {**headers, "X-GitHub-Delivery": "another"})[0] == 202
    assert len(listener.pushes) == 2


def test_the_delivery_log_forgets_after_its_window_and_stays_bounded() -> None:
    now = [0.0]
    log = DeliveryLog(window=10, capacity=3, clock=lambda: now[0])
    assert not log.replayed("a") and log.replayed("a")
    now[0] = 11.0
    assert not log.replayed("a")  # outside the window: a new delivery
    for name in "bcd":
        assert not log.replayed(name)
    assert not log.replayed("a")  # pushed out by capacity, not kept forever


def test_an_empty_secret_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "secret"
    empty.write_text("\n")
    with pytest.raises(WebhookError, match="is empty"):
        load_secret(empty)
    with pytest.raises(WebhookError, match="empty"):
        GitWebhook(b"", on_push=lambda: None)
    empty.write_text("key\n")
    assert load_secret(empty) == b"key"


def test_the_agent_refuses_to_start_with_an_empty_secret_file(tmp_path: Path) -> None:
    empty = tmp_path / "secret"
    empty.write_bytes(b"")
    started = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "conveyor", "agent", "--repo", str(tmp_path / "none.git")),
            *("--path", "envs/x", "--listen", f"127.0.0.1:{free_port()}"),
            *("--webhook-secret-file", str(empty)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"the webhook secret file {empty} is empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
