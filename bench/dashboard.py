"""Dashboard benchmark: the pipeline page (and the matrix, its peer) for 60 apps x 12
environments over two clusters, and how fast a status change in either cluster reaches
an open page.

Builds the config repo of tests/cluster/scale.py (12 environments x 60 apps, Cellenics
tags, an approval gate at the end), its environments split in promotion order over the
sandboxes (the first six in the first, each by its `cluster.context`), writes their 732
ConveyorApp statuses directly with `StatusStore.save` in each environment's cluster,
starts a real `conveyor serve --repo` with $KUBECONFIG naming every sandbox (as a
person's would), waits until it has read every version from git, then measures
- the pipeline page (`/?env=...`) and the matrix page (`/matrix?env=...`): server time
  from `Server-Timing`, median of a warm run (goal for the pipeline: under 100 ms);
- a status change (a `StatusStore.save`) in each cluster, measured separately, until
  its cells arrive on `/stream`, and until the pipeline page open in Chromium shows it
  (Playwright; `--no-browser` leaves it out) (goal: within 1 s).
The figures go to bench/RESULTS.md, a subsection of "## Dashboard" per number of
clusters (other sections and subsections are kept).

    .venv/bin/python bench/dashboard.py [--sandboxes bench bench2] [--keep] [--requests 30]
        [--events 15] [--no-browser]
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
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.cluster.scale import APPS, ENVIRONMENTS, HELD, Fleet  # noqa: E402
from tests.cluster.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from conveyor.cluster import kubeconfig  # noqa: E402
from conveyor.cluster.client import KubeClient  # noqa: E402
from conveyor.reconcile.status import READY, STALLED, AppStatus, StatusStore  # noqa: E402
from conveyor.sandbox import Sandbox  # noqa: E402

PAGE_GOAL_MS = 100.0
EVENT_GOAL_S = 1.0
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Dashboard"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(
    tmp: Path, repo: str, *, kubeconfigs: list[Path]
) -> tuple[subprocess.Popen[bytes], str]:
    """`conveyor serve` with $KUBECONFIG naming every cluster: conveyor.yaml picks each
    environment's by its context."""
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
            "--repo",
            repo,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "serve.log").open("w"),
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "KUBECONFIG": os.pathsep.join(str(path) for path in kubeconfigs),
        },
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


def wait_for_clusters(url: str, query: str, clusters: int, *, timeout: float = 60) -> None:
    """Until the server reads every cluster, each reachable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        matrix = httpx.get(f"{url}/api/v1/matrix?{query}", timeout=30).json()
        reachable = {e["cluster"] for e in matrix["environments"] if e["reachable"]}
        if len(reachable) == clusters:
            return
        time.sleep(0.5)
    raise SystemExit(f"the server did not reach the {clusters} clusters")


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


class StatusWriter:
    """Statuses saved to one cluster by a client on a loop of its own thread: the
    measuring thread is Playwright's (its sync API owns that thread's loop) or waits for
    a stream."""

    def __init__(self, kubeconfig_path: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def open_store() -> tuple[KubeClient, StatusStore]:
            kube = KubeClient(kubeconfig.load(kubeconfig_path))
            store = StatusStore(kube)
            await store.list_all()
            return kube, store

        self._kube, self._store = self._run(open_store())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def change(self, status: AppStatus, *, stalled: bool, mark: str) -> None:
        """Save `status` in another state, with `mark` in its message."""
        status.state = STALLED if stalled else READY
        status.message = f"bench-mark-{mark}"
        self._run(self._store.save(status))

    def close(self) -> None:
        self._run(self._kube.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def changed_apps(items: list[AppStatus], events: int) -> list[AppStatus]:
    """`events` app statuses spread over a cluster's environments and apps."""
    apps = [s for s in items if s.app]
    return [apps[(index * 37) % len(apps)] for index in range(events)]


def stream_latencies(url: str, writer: StatusWriter, items: list[AppStatus]) -> list[float]:
    """Seconds from each save until its cells arrive on an open `/stream`."""
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
                        if len(arrived) >= len(items):
                            return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.5)
    latencies = []
    for index, status in enumerate(items):
        mark = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        writer.change(status, stalled=index % 2 == 0, mark=mark)
        deadline = time.monotonic() + 10
        while mark not in arrived and time.monotonic() < deadline:
            time.sleep(0.002)
        if mark not in arrived:
            raise SystemExit(f"status change {mark} never reached the stream")
        latencies.append(arrived[mark] - started)
        time.sleep(0.1)
    thread.join(timeout=5)
    return latencies


# Notes the time (the wall clock, as Python's) at which the watched cell first shows the
# watched marker, whichever way it came: its cell swapped in from the stream or the
# pipeline's table fetched again.
WATCH_CELLS = """() => {
  window.benchArrived = {};
  window.benchWatch = null;
  new MutationObserver(function () {
    const watch = window.benchWatch;
    if (!watch || watch.mark in window.benchArrived) return;
    const badge = document.querySelector('[id="' + watch.id + '"] .badge');
    if (badge && badge.title.includes(watch.mark)) window.benchArrived[watch.mark] = Date.now();
  }).observe(document.body, { subtree: true, childList: true, attributes: true });
}"""


def poll(tab: Page, expression: str, arg: object, *, timeout: float = 10) -> Any:
    """The first true value of `expression(arg)` in the page. Not Playwright's
    wait_for_function: its predicate is a string evaluated in the page, which the
    dashboard's Content-Security-Policy refuses (and should)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = tab.evaluate(expression, arg)
        if found:
            return found
        time.sleep(0.005)
    raise SystemExit(f"the page never showed {expression} ({arg})")


def browser_latencies(
    url: str, query: str, changes: list[tuple[StatusWriter, list[AppStatus]]]
) -> list[list[float]]:
    """Per cluster, seconds from each save until the pipeline page open in Chromium shows
    it (the badge of the app's cell in its environment carries the new message)."""
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing: `make browser` installs it (or --no-browser)")
    found = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(f"{url}/?{query}")
        poll(tab, "() => document.documentElement.dataset.stream === 'connected'", None)
        tab.evaluate(WATCH_CELLS)
        for writer, items in changes:
            latencies = []
            for index, status in enumerate(items):
                mark = uuid.uuid4().hex[:8]
                watch = {"id": f"pipe-{status.scope}.{status.app}", "mark": mark}
                tab.evaluate("watch => { window.benchWatch = watch; }", watch)
                started = time.time()
                writer.change(status, stalled=index % 2 == 0, mark=mark)
                arrived = poll(tab, "mark => window.benchArrived[mark]", mark)
                latencies.append(float(arrived) / 1000 - started)
                time.sleep(0.1)
            found.append(latencies)
        browser.close()
    return found


def write_results(heading: str, text: str) -> None:
    """Replace the subsection `heading` names (its first words, up to the date) of the
    Dashboard section of RESULTS.md, or add it at the section's end; keep the rest."""
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in existing:
        existing = existing.rstrip("\n") + f"\n\n{SECTION}\n"
    stem = heading.partition(" (")[0]
    subsection = re.compile(
        rf"^{re.escape(stem)} \(.*?\n(?=^#{{2,3}} |\Z)", re.MULTILINE | re.DOTALL
    )
    block = text.rstrip("\n") + "\n\n"
    if subsection.search(existing):
        updated = subsection.sub(lambda _m: block, existing)
    else:
        section = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
        updated = section.sub(lambda m: m.group(0).rstrip("\n") + "\n\n" + block, existing)
    RESULTS.write_text(updated.rstrip("\n") + "\n")


def row(name: str, values: list[float], goal: str = "") -> str:
    """A table row of milliseconds."""
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1]
    return (
        f"| {name} | {statistics.median(values):.1f} ms | {p90:.1f} ms | {max(values):.1f} ms "
        f"| {len(values)} | {goal} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sandboxes",
        nargs="+",
        default=["bench", "bench2"],
        help="the sandboxes (clusters) to split the environments over, started if down",
    )
    parser.add_argument("--keep", action="store_true", help="leave sandboxes we started up")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--events", type=int, default=15, help="status changes per cluster")
    parser.add_argument(
        "--no-browser", action="store_true", help="measure the stream only, not Chromium"
    )
    args = parser.parse_args()

    def progress(name: str) -> Callable[[str], None]:
        return lambda message: print(f"[sandbox {name}] {message}", file=sys.stderr)

    boxes = [Sandbox(name, progress=progress(name)) for name in args.sandboxes]
    started_here = [box for box in boxes if not box.status().ready]
    for box in boxes:
        box.up()
    paths = [box.kubeconfig for box in boxes]
    contexts = [kubeconfig.load(path).context for path in paths]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        fleet = Fleet(Path(tmp), f"bench-dash-{uuid.uuid4().hex[:4]}", contexts=contexts)
        query = "env=" + ",".join(fleet.names)
        splits = [
            [name for name in fleet.names if fleet.cluster_index[name] == index]
            for index in range(len(boxes))
        ]
        try:
            started = time.perf_counter()
            fleet.save(*paths)
            saved = time.perf_counter() - started
            print(f"{len(fleet.statuses)} statuses saved in {saved:.1f}s", file=sys.stderr)
            process, url = start_serve(Path(tmp), fleet.repo.url, kubeconfigs=paths)
            writers = [StatusWriter(path) for path in paths]
            try:
                wait_for_clusters(url, query, len(boxes))
                read = wait_for_versions(url, query)
                print(f"versions read from git in {read:.1f}s", file=sys.stderr)
                pipeline, pipeline_client, cells = page_times(url, f"/?{query}", args.requests)
                afresh, _, _ = page_times(url, f"/?{query}", args.requests, afresh=True)
                matrix, matrix_client, _ = page_times(url, f"/matrix?{query}", args.requests)
                changes = [
                    (writer, changed_apps(fleet.statuses_in(index), args.events))
                    for index, writer in enumerate(writers)
                ]
                streamed = [stream_latencies(url, w, items) for w, items in changes]
                shown = [] if args.no_browser else browser_latencies(url, query, changes)
            finally:
                for writer in writers:
                    writer.close()
                process.terminate()
                process.wait(timeout=15)
        finally:
            fleet.delete(*paths)
            for box in started_here:
                if not args.keep:
                    box.down()
    load_after = os.getloadavg()[0]

    page_ms = statistics.median(pipeline)
    page_ok = "met" if page_ms < PAGE_GOAL_MS else "MISSED"

    def event_row(what: str, index: int, latencies: list[float]) -> str:
        event_ms = [latency * 1000 for latency in latencies]
        ok = "met" if max(event_ms) < EVENT_GOAL_S * 1000 else "MISSED"
        where = f"cluster {index + 1} ({contexts[index]})"
        return row(
            f"status change in {where} to {what}",
            event_ms,
            f"< {EVENT_GOAL_S:.0f} s, every run: {ok}",
        )

    clusters = len(boxes)
    plural = "s" if clusters > 1 else ""
    heading = f"### {clusters} cluster{plural} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    split = "; ".join(
        f"cluster {i + 1}, {contexts[i]}: {len(names)} environments ({names[0]}…{names[-1]})"
        for i, names in enumerate(splits)
    )
    afresh_ratio = statistics.median(afresh) / statistics.median(matrix)
    text = (
        f"{heading}\n\n"
        f"`bench/dashboard.py --sandboxes {' '.join(args.sandboxes)}`: {APPS} apps x "
        f"{ENVIRONMENTS} environments ({cells} cells) from a real config repo "
        "(tests/cluster/scale.py: Cellenics-long tags, an approval gate at the end) over "
        f"{clusters} cluster{plural}, each environment's by its "
        f"`cluster.context` ({split}); their ConveyorApp statuses written in each "
        "environment's cluster, one real `conveyor serve --repo` with $KUBECONFIG naming "
        f"every sandbox (one watched hub per cluster). {os.cpu_count()} CPUs shared by the "
        "apiservers, etcds, the server, the client, Chromium and whatever else ran; load "
        f"average {load_before:.1f} before, {load_after:.1f} after. Measured once the "
        f"server had read every version from git, {read:.0f} s after it started.\n\n"
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
        + "".join(
            event_row("its cells on an open SSE stream", index, latencies)
            for index, latencies in enumerate(streamed)
        )
        + "".join(
            event_row("the pipeline page in Chromium (DOM updated)", index, latencies)
            for index, latencies in enumerate(shown)
        )
        + "\nThe pipeline page is served as rendered after the last change (per filter and "
        "session); rendered afresh is what the first request after a change costs, "
        f"{afresh_ratio:.2f}x the matrix page, its peer. A change's latency includes the "
        "apiserver write (of its own cluster), that cluster's watch event, the rendering "
        "of the app's matrix cell and pipeline row and, in Chromium, the swap of the cell "
        "into the open page (a MutationObserver notes when the cell's badge carries the "
        "change).\n"
    )
    write_results(heading, text)
    print(text)


if __name__ == "__main__":
    main()
