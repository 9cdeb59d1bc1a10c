"""Test helpers for image automation: tiny loopback HTTP servers (token services, broken
registries) and config repositories."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conveyor.source.git import Author, Checkout, commit_and_push, run_git

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "images"
FIXTURE_REGISTRY = "000000000000.dkr.ecr.eu-west-1.amazonaws.com"


@dataclass
class Request:
    method: str
    path: str
    headers: Mapping[str, str]


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | object = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Reply]


@contextmanager
def loopback_server(handler: Handler) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1; yields `127.0.0.1:PORT`."""

    class _Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            reply = handler(Request(self.command, self.path, dict(self.headers)))
            body = reply.body
            if not isinstance(body, bytes | str):
                body = json.dumps(body)
                reply.headers.setdefault("Content-Type", "application/json")
            data = body.encode() if isinstance(body, str) else body
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> str:
    """`127.0.0.1:PORT` where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def fixture_tree(destination: Path, registry: str) -> Path:
    """Copy the Cellenics-shaped fixture files, pointing their images at `registry`."""
    for source in sorted(FIXTURES.rglob("*.yaml")):
        target = destination / source.relative_to(FIXTURES)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            source.read_bytes().replace(FIXTURE_REGISTRY.encode(), registry.encode())
        )
    return destination


def config_repo(tmp_path: Path, registry: str) -> str:
    """A bare repository whose `main` holds the fixture files; returns its path."""
    bare = tmp_path / "config.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])
    seed = Checkout.open(str(bare), tmp_path / "seed")

    def add(root: Path) -> None:
        fixture_tree(root, registry)

    commit_and_push(seed, add, message="config", author=Author())
    shutil.rmtree(tmp_path / "seed")
    return str(bare)


def log(bare: str, branch: str = "main") -> list[str]:
    return run_git(["--git-dir", bare, "log", "--format=%s", branch]).splitlines()


def show(bare: str, path: str, branch: str = "main") -> bytes:
    return run_git(["--git-dir", bare, "show", f"{branch}:{path}"]).encode()
