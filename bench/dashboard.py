"""Dashboard benchmark: the pipeline page (and the matrix, its peer) for 60 apps x 12
environments, and how fast a status change reaches an open server-sent event stream.

Builds the config repo of tests/cluster/scale.py (12 environments x 60 apps, Cellenics
tags, an approval gate at the end), writes its 732 ConveyorApp statuses directly with
`StatusStore.save` on a sandbox, starts a real `conveyor serve --repo`, waits until it
has read every version from git, then measures
- the pipeline page (`/?env=...`) and the matrix page (`/matrix?env=...`): server time
  from `Server-Timing`, median of a warm run (goal for the pipeline: under 100 ms);
- a status change (a `StatusStore.save`) until its cells arrive on `/stream`, median
  (goal: under 1 s).
One cluster: the statuses of all 12 environments live on one sandbox.
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
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.cluster.scale import APPS, ENVIRONMENTS, HELD, Fleet  # noqa: E402

from conveyor.cluster import kubeconfig  # noqa: E402
from conveyor.cluster.client import KubeClient  # noqa: E402
from conveyor.reconcile.status import READY, STALLED, AppStatus, StatusStore  # noqa: E402
from conveyor.sandbox import Sandbox  # noqa: E402

PAGE_GOAL_MS = 100.0
EVENT_GOAL_S = 1.0
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Dashboard"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(box: Sandbox, tmp: Path, repo: str) -> tuple[subprocess.Popen[bytes], str]:
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
            "--repo",
            repo,
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


def wait_for_versions(url: str, query: str, *, timeout: float = 600) -> float:
    """Seconds until the pipeline shows the version its last environment's gate holds:
    the last of git's versions the server reads."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        page = httpx.get(f"{url}/?{query}", timeout=30).text
        if f'name="version" value="{HELD}"' in page:
            return time.monotonic() - started
        time.sleep(1)
    raise SystemExit("the server did not read the versions from git")


def page_times(
    url: str, page: str, requests: int, *, afresh: bool = False
) -> tuple[list[float], list[float], int]:
    """Server and client milliseconds of warm page loads, and the cells shown. `afresh`:
    each request names one more (unknown) environment, so that the server renders the
    page again as after a change, rather than serving what it rendered."""
    server, client = [], []
    cells = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(5):  # warm up
            http.get(page)
        for index in range(requests):
            started = time.perf_counter()
            response = http.get(f"{page}&env=none-{index}" if afresh else page)
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
                status.state = STALLED if index % 2 == 0 else READY
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


def row(name: str, values: list[float], goal: str = "") -> str:
    """A table row of milliseconds."""
    p90 = statistics.quantiles(values, n=10)[-1]
    return (
        f"| {name} | {statistics.median(values):.1f} ms | {p90:.1f} ms | {max(values):.1f} ms "
        f"| {len(values)} | {goal} |\n"
    )


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
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        fleet = Fleet(Path(tmp), f"bench-dash-{uuid.uuid4().hex[:4]}")
        query = "env=" + ",".join(fleet.names)
        try:
            started = time.perf_counter()
            fleet.save(box.kubeconfig)
            saved = time.perf_counter() - started
            print(f"{len(fleet.statuses)} statuses saved in {saved:.1f}s", file=sys.stderr)
            process, url = start_serve(box, Path(tmp), fleet.repo.url)
            try:
                read = wait_for_versions(url, query)
                print(f"versions read from git in {read:.1f}s", file=sys.stderr)
                pipeline, pipeline_client, cells = page_times(url, f"/?{query}", args.requests)
                afresh, _, _ = page_times(url, f"/?{query}", args.requests, afresh=True)
                matrix, matrix_client, _ = page_times(url, f"/matrix?{query}", args.requests)
                latencies = event_latencies(url, box.kubeconfig, fleet.statuses, args.events)
            finally:
                process.terminate()
                process.wait(timeout=15)
        finally:
            fleet.delete(box.kubeconfig)
            if not was_running and not args.keep:
                box.down()

    page_ms = statistics.median(pipeline)
    event_ms = [latency * 1000 for latency in latencies]
    page_ok = "met" if page_ms < PAGE_GOAL_MS else "MISSED"
    event_ok = "met" if statistics.median(event_ms) < EVENT_GOAL_S * 1000 else "MISSED"
    afresh_ratio = statistics.median(afresh) / statistics.median(matrix)
    text = (
        f"{SECTION}\n\n"
        f"`bench/dashboard.py`: {APPS} apps x {ENVIRONMENTS} environments ({cells} cells) "
        "from a real config repo (tests/cluster/scale.py: Cellenics-long tags, an approval "
        "gate at the end), their ConveyorApp statuses written on one sandbox (one cluster), "
        f"one real `conveyor serve --repo`; {os.cpu_count()} CPUs shared by the apiserver, "
        "etcd, the server, the client and whatever else ran (load average "
        f"{os.getloadavg()[0]:.0f} at the end). Measured once the server had read every "
        f"version from git, {read:.0f} s after it started (an export and a read of each "
        "of the 13 folder trees, in the background; pages meanwhile show the tags running).\n\n"
        "| measure | median | p90 | max | runs | goal |\n"
        "|---|---|---|---|---|---|\n"
        + row(
            "pipeline page, server time (Server-Timing)",
            pipeline,
            f"< {PAGE_GOAL_MS:.0f} ms: {page_ok}",
        )
        + row("pipeline page, client round trip", pipeline_client)
        + row("pipeline page rendered afresh (as after a change), server time", afresh)
        + row("matrix page (the peer), server time", matrix)
        + row("matrix page, client round trip", matrix_client)
        + row(
            "status change (save) to its cells on an open SSE stream",
            event_ms,
            f"< {EVENT_GOAL_S:.0f} s: {event_ok}",
        )
        + f"\nA pipeline page is rendered once per change (of a status, of git's head, of "
        "the versions known) and served as rendered until the next (per filter and "
        f"session). Rendered afresh it costs {afresh_ratio:.2f}x the matrix page, its peer: "
        "the same cells plus what waits in each (the previous environment's version, the "
        "gate, git's version at the head). Both are built from the server's watched "
        "snapshot and the versions already read (no API call and no git per page); the "
        "SSE latency includes the apiserver write, the watch event and the rendering of "
        "the app's matrix cell and pipeline row.\n"
    )
    write_results(text)
    print(text)


if __name__ == "__main__":
    main()
