"""Test helpers for image automation: push images over the registry API, run tiny
loopback HTTP servers (token services, broken registries), make config repositories."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from conveyor.source.git import Author, Checkout, commit_and_push, run_git

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "images"
FIXTURE_REGISTRY = "000000000000.dkr.ecr.eu-west-1.amazonaws.com"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(created: str) -> tuple[bytes, bytes]:
    """A minimal OCI image: a config blob (with its build time) and a manifest."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    return config, manifest


async def push_async(
    client: httpx.AsyncClient,
    repository: str,
    tags: Sequence[str],
    *,
    created: str = "2024-01-01T00:00:00Z",
    concurrency: int = 16,
) -> None:
    """Upload one config blob and tag one manifest with every tag (PUT per tag)."""
    config, manifest = image_manifest(created)
    start = await client.post(f"/v2/{repository}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = start.headers["location"]
    location += ("&" if "?" in location else "?") + f"digest={_digest(config)}"
    done = await client.put(
        location, content=config, headers={"Content-Type": "application/octet-stream"}
    )
    assert done.status_code == 201, done.text
    limit = asyncio.Semaphore(concurrency)

    async def tag(name: str) -> None:
        async with limit:
            answer = await client.put(
                f"/v2/{repository}/manifests/{name}",
                content=manifest,
                headers={"Content-Type": OCI_MANIFEST},
            )
            assert answer.status_code == 201, answer.text

    await asyncio.gather(*(tag(t) for t in tags))


def push(
    registry: str,
    repository: str,
    tags: Sequence[str],
    *,
    created: str = "2024-01-01T00:00:00Z",
    headers: Mapping[str, str] | None = None,
) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(
            base_url=f"http://{registry}", timeout=30, headers=headers
        ) as client:
            await push_async(client, repository, tags, created=created)

    asyncio.run(run())


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
