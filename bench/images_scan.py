"""Image scan benchmark: 200 repositories x 500 tags on a sandbox's real registry.

Populates the registry once (per repository one config blob and one manifest, tagged 500
times by PUT), writes 200 Flux v2 ImageRepository/ImagePolicy/setter files, then times
`conveyor.images.scan.scan` over them with bounded concurrency and sequentially (one
request at a time) in the same run. Goal: the concurrent scan under 10 s.

The registry answers from loopback in a few milliseconds, so the same scan is also run
through a proxy that holds each request 20 ms, as a registry across a network would.

    .venv/bin/python bench/images_scan.py [--sandbox bench-images] [--keep] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conveyor.images.push import push_async  # noqa: E402
from conveyor.images.registry import RegistrySettings  # noqa: E402
from conveyor.images.scan import ScanResult, scan  # noqa: E402
from conveyor.sandbox import Sandbox  # noqa: E402

REPOSITORIES = 200
TAGS = 500
PREFIX = "bench-scan"
GOAL_SECONDS = 10.0


def tag_names() -> list[str]:
    """300 semver tags and 200 `main-<sha>-<unix time>` tags per repository."""
    semver = [f"1.{i // 100}.{i % 100}" for i in range(300)]
    builds = [f"main-{i * 7919:07x}-{1700000000 + i * 60}" for i in range(200)]
    return semver + builds


async def populate(registry: str) -> int:
    """Push what is missing; returns how many repositories were (re)populated."""
    tags = tag_names()
    async with httpx.AsyncClient(
        base_url=f"http://{registry}",
        timeout=60,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    ) as client:
        limit = asyncio.Semaphore(8)

        async def one(index: int) -> int:
            repository = f"{PREFIX}/svc-{index:03d}"
            async with limit:
                listed = await client.get(f"/v2/{repository}/tags/list")
                if listed.status_code == 200 and len(listed.json().get("tags") or []) >= TAGS:
                    return 0
                await push_async(client, repository, tags, concurrency=8)
                return 1

        return sum(await asyncio.gather(*(one(i) for i in range(REPOSITORIES))))


def write_config(root: Path, registry: str) -> None:
    """Half the policies pick by semver range, half by the timestamp in the tag."""
    for index in range(REPOSITORIES):
        name = f"svc-{index:03d}"
        policy = (
            "  policy: {semver: {range: '^1.0.0'}}\n"
            if index % 2 == 0
            else "  filterTags: {pattern: '^main-[a-f0-9]+-(?P<ts>[0-9]+)$', extract: '$ts'}\n"
            "  policy: {numerical: {order: asc}}\n"
        )
        current = "1.0.0" if index % 2 == 0 else "main-0000000-1700000000"
        (root / f"{name}.yaml").write_text(
            "apiVersion: image.toolkit.fluxcd.io/v1beta2\nkind: ImageRepository\n"
            f"metadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  image: {registry}/{PREFIX}/{name}\n---\n"
            "apiVersion: image.toolkit.fluxcd.io/v1beta2\nkind: ImagePolicy\n"
            f"metadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  imageRepositoryRef: {{name: {name}}}\n{policy}---\n"
            "apiVersion: apps/v1\nkind: Deployment\n"
            f"metadata: {{name: {name}, namespace: bench}}\nspec:\n  template:\n    spec:\n"
            f"      containers:\n        - name: app\n"
            f'          image: {registry}/{PREFIX}/{name}:{current} # {{"$imagepolicy": '
            f'"bench:{name}"}}\n'
        )


def timed_scan(root: Path, concurrency: int) -> tuple[float, ScanResult]:
    started = time.perf_counter()
    result = scan(root, settings=RegistrySettings(concurrency=concurrency, timeout=60))
    return time.perf_counter() - started, result


def check(result: ScanResult) -> None:
    assert len(result.rows) == REPOSITORIES, len(result.rows)
    assert not result.failed, [r.outcome.error for r in result.rows if r.outcome.error][:3]
    latest = {r.outcome.latest for r in result.rows}
    assert latest == {"1.2.99", f"main-{199 * 7919:07x}-{1700000000 + 199 * 60}"}, latest
    assert all(r.outcome.tags == TAGS for r in result.rows)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _proxy(listen: int, target: str, delay: float) -> None:
    host, port = target.rsplit(":", 1)

    async def handle(client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pipe(client_in, server_out, delay), _pipe(server_in, client_out, 0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    await server.serve_forever()


def _run_proxy(listen: int, target: str, delay: float) -> None:
    asyncio.run(_proxy(listen, target, delay))


def latency_proxy(target: str, delay: float) -> tuple[str, multiprocessing.Process]:
    """A TCP proxy (own process) that holds every request `delay` seconds, the way a
    registry across a network answers late; yields `127.0.0.1:PORT`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = multiprocessing.Process(target=_run_proxy, args=(port, target, delay), daemon=True)
    process.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"127.0.0.1:{port}", process
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(frozen=True)
class Figure:
    seconds: float
    requests: int


def measure(registry: str, rounds: int, concurrency: int) -> tuple[Figure, Figure]:
    """Median concurrent and sequential scans of the 200 files pointing at `registry`."""
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as scratch:
        root = Path(scratch)
        write_config(root, registry)
        timed_scan(root, concurrency)  # warm the registry's caches for both runs
        concurrent, sequential = [], []
        for _ in range(rounds):
            for runs, level in ((concurrent, concurrency), (sequential, 1)):
                seconds, result = timed_scan(root, level)
                check(result)
                runs.append(Figure(seconds, result.requests))
    return (
        Figure(statistics.median(f.seconds for f in concurrent), concurrent[0].requests),
        Figure(statistics.median(f.seconds for f in sequential), sequential[0].requests),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="bench-images", help="sandbox whose registry to use")
    parser.add_argument("--keep", action="store_true", help="leave a sandbox we started up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()

    box = Sandbox(args.sandbox, progress=lambda m: print(f"[sandbox] {m}", file=sys.stderr))
    was_running = box.status().ready
    box.up()
    try:
        registry = box.registry()
        started = time.perf_counter()
        populated = asyncio.run(populate(registry))
        print(
            f"registry {registry}: {populated} repositories populated in "
            f"{time.perf_counter() - started:.1f}s ({REPOSITORIES} x {TAGS} tags in place)",
            file=sys.stderr,
        )
        direct = measure(registry, args.rounds, args.concurrency)
        proxy, process = latency_proxy(registry, args.latency_ms / 1000)
        try:
            remote = measure(proxy, args.rounds, args.concurrency)
        finally:
            process.terminate()
            process.join()
    finally:
        if not was_running and not args.keep:
            box.down()

    print("## Image scan\n")
    print(
        f"{REPOSITORIES} repositories x {TAGS} tags on the sandbox registry (distribution v3), "
        f"{REPOSITORIES} ImagePolicy files (half semver range, half numerical on a `$ts` "
        f"extract), whole `scan()` (discovery, listing, policies); median of {args.rounds}; "
        f"{os.cpu_count()} CPUs shared by the registry and the client.\n"
    )
    print("| registry | scan | time | requests | sequential / concurrent |")
    print("|---|---|---|---|---|")
    for label, (fast, slow) in (
        ("loopback", direct),
        (f"+{args.latency_ms:.0f} ms per request (proxy)", remote),
    ):
        ratio = slow.seconds / fast.seconds
        level = f"concurrency {args.concurrency}"
        print(f"| {label} | {level} | {fast.seconds:.2f} s | {fast.requests} | |")
        print(f"| {label} | sequential | {slow.seconds:.2f} s | {slow.requests} | {ratio:.1f}x |")
    verdict = "met" if direct[0].seconds < GOAL_SECONDS else "MISSED"
    print(f"\nGoal: under {GOAL_SECONDS:.0f} s with bounded concurrency: {verdict}.")


if __name__ == "__main__":
    main()
