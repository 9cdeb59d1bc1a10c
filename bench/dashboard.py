"""Dashboard benchmark: the matrix page for 50 apps x 3 environments, and how fast a
status change reaches an open server-sent event stream.

Creates 150 ConveyorApp status objects directly with `StatusStore.save` in three scratch
environments on a sandbox, starts a real `conveyor serve`, then measures
- the matrix page (`/?env=...` for the scratch environments): server time from its
  `Server-Timing` header, median of a warm run (goal: under 300 ms);
- a status change (a `StatusStore.save`) until its cell arrives on `/stream`, median
  (goal: under 1 s).
The figures go to bench/RESULTS.md under "## Dashboard" (other sections are kept).

    .venv/bin/python bench/dashboard.py [--sandbox bench] [--keep] [--requests 30] [--events 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conveyor.cluster import kubeconfig  # noqa: E402
from conveyor.cluster.client import KubeClient  # noqa: E402
from conveyor.reconcile.status import READY, SOURCE_KIND, AppStatus, StatusStore  # noqa: E402
from conveyor.sandbox import Sandbox  # noqa: E402

APPS = 50
ENVIRONMENTS = ("dev", "staging", "production")
PAGE_GOAL_MS = 300.0
EVENT_GOAL_S = 1.0
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Dashboard"


def statuses(prefix: str) -> list[AppStatus]:
    found = []
    for env_index, env in enumerate(ENVIRONMENTS):
        scope = f"{prefix}-{env}"
        revision = f"{env_index + 1:x}" * 40
        found.append(
            AppStatus(
                scope=scope,
                app="",
                kind=SOURCE_KIND,
                state=READY,
                reason="Fetched",
                message="bench@main",
                attempted_revision=revision,
            )
        )
        for index in range(APPS):
            found.append(
                AppStatus(
                    scope=scope,
                    app=f"svc-{index:02d}",
                    state=READY,
                    reason="ReconciliationSucceeded",
                    message=f"applied revision {revision[:12]}",
                    attempted_revision=revision,
                    last_applied_time="2026-01-01T00:00:00Z",
                    last_applied_revision=revision,
                )
            )
    return found


async def save_all(kube: KubeClient, items: list[AppStatus]) -> StatusStore:
    store = StatusStore(kube)
    await store.install()
    await store.list_all()
    limit = asyncio.Semaphore(16)

    async def one(status: AppStatus) -> None:
        async with limit:
            await store.save(status)

    await asyncio.gather(*(one(s) for s in items))
    return store


async def delete_all(kube: KubeClient, items: list[AppStatus]) -> None:
    store = StatusStore(kube)
    await asyncio.gather(*(store.delete(s) for s in items))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(box: Sandbox, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    tokens = tmp / "tokens"
    tokens.write_text(f"bench {secrets.token_urlsafe(24)}\n")
    tokens.chmod(0o600)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(tokens),
            "--kubeconfig",
            str(box.kubeconfig),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "serve.log").open("w"),
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).json()["status"] == "ok":
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"serve did not start:\n{(tmp / 'serve.log').read_text()}")


def page_times(url: str, query: str, requests: int) -> tuple[list[float], list[float], int]:
    """Server and client milliseconds of warm matrix page loads, and the cells shown."""
    server, client = [], []
    cells = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(5):  # warm up
            http.get(f"/?{query}")
        for _ in range(requests):
            started = time.perf_counter()
            response = http.get(f"/?{query}")
            client.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            timing = re.search(r"dur=([0-9.]+)", response.headers["server-timing"])
            assert timing is not None
            server.append(float(timing.group(1)))
            cells = response.text.count('class="cell state-')
    return server, client, cells


def event_latencies(url: str, kube_path: Path, items: list[AppStatus], events: int) -> list[float]:
    arrived: dict[str, float] = {}
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{url}/stream", timeout=60) as response:
            ready.set()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    html = "".join(data.get("html", {}).values())
                    marker = re.search(r"bench-mark-([0-9a-f]+)", html)
                    if marker:
                        arrived.setdefault(marker.group(1), time.perf_counter())
                        if len(arrived) >= events:
                            return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.5)
    latencies = []

    async def changes() -> None:
        async with KubeClient(kubeconfig.load(kube_path)) as kube:
            store = StatusStore(kube)
            await store.list_all()
            apps = [s for s in items if s.app]
            for index in range(events):
                status = apps[(index * 7) % len(apps)]
                mark = uuid.uuid4().hex[:8]
                status.state = "Stalled" if index % 2 == 0 else READY
                status.message = f"bench-mark-{mark}"
                started = time.perf_counter()
                await store.save(status)
                deadline = time.monotonic() + 10
                while mark not in arrived and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                if mark not in arrived:
                    raise SystemExit(f"status change {mark} never reached the stream")
                latencies.append(arrived[mark] - started)
                await asyncio.sleep(0.1)

    asyncio.run(changes())
    thread.join(timeout=5)
    return latencies


def write_results(text: str) -> None:
    """Replace the Dashboard section of RESULTS.md (or add it), keeping the others."""
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(existing):
        updated = pattern.sub(lambda _m: text, existing)
    else:
        updated = existing.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="bench", help="sandbox to run against")
    parser.add_argument("--keep", action="store_true", help="leave a sandbox we started up")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--events", type=int, default=15)
    args = parser.parse_args()

    box = Sandbox(args.sandbox, progress=lambda m: print(f"[sandbox] {m}", file=sys.stderr))
    was_running = box.status().ready
    box.up()
    prefix = f"bench-dash-{uuid.uuid4().hex[:6]}"
    items = statuses(prefix)
    query = "&".join(f"env={prefix}-{e}" for e in ENVIRONMENTS)

    async def with_kube(work: str) -> None:
        async with KubeClient(kubeconfig.load(box.kubeconfig), max_connections=32) as kube:
            if work == "create":
                await save_all(kube, items)
            else:
                await delete_all(kube, items)

    try:
        started = time.perf_counter()
        asyncio.run(with_kube("create"))
        print(
            f"{len(items)} statuses saved in {time.perf_counter() - started:.1f}s", file=sys.stderr
        )
        with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
            process, url = start_serve(box, Path(tmp))
            try:
                server, client, cells = page_times(url, query, args.requests)
                latencies = event_latencies(url, box.kubeconfig, items, args.events)
            finally:
                process.terminate()
                process.wait(timeout=15)
    finally:
        asyncio.run(with_kube("delete"))
        if not was_running and not args.keep:
            box.down()

    page_ms = statistics.median(server)
    event_s = statistics.median(latencies)
    page_ok = "met" if page_ms < PAGE_GOAL_MS else "MISSED"
    event_ok = "met" if event_s < EVENT_GOAL_S else "MISSED"
    text = (
        f"{SECTION}\n\n"
        f"`bench/dashboard.py`: {APPS} apps x {len(ENVIRONMENTS)} environments "
        f"({cells} matrix cells) as ConveyorApp status objects on a sandbox, one real "
        f"`conveyor serve`; {os.cpu_count()} CPUs shared by the apiserver, etcd, the server "
        "and the client.\n\n"
        "| measure | median | p90 | max | runs | goal |\n"
        "|---|---|---|---|---|---|\n"
        f"| matrix page, server time (Server-Timing) | {page_ms:.1f} ms | "
        f"{statistics.quantiles(server, n=10)[-1]:.1f} ms | {max(server):.1f} ms | "
        f"{len(server)} warm | < {PAGE_GOAL_MS:.0f} ms: {page_ok} |\n"
        f"| matrix page, client round trip | {statistics.median(client):.1f} ms | "
        f"{statistics.quantiles(client, n=10)[-1]:.1f} ms | {max(client):.1f} ms | "
        f"{len(client)} warm | |\n"
        f"| status change (save) to its cell on an open SSE stream | "
        f"{event_s * 1000:.0f} ms | {statistics.quantiles(latencies, n=10)[-1] * 1000:.0f} ms | "
        f"{max(latencies) * 1000:.0f} ms | {len(latencies)} | < {EVENT_GOAL_S:.0f} s: "
        f"{event_ok} |\n\n"
        "The matrix is served from the server's watched snapshot (no API call per page); "
        "the SSE latency includes the apiserver write, the watch event and the cell's "
        "rendering.\n"
    )
    write_results(text)
    print(text)


if __name__ == "__main__":
    main()
