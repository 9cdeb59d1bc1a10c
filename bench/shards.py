"""Benchmark: one environment of many plain apps with 1 and then 2 agent shards.

Apps are Flux's benchmark shape (bench/agent_scale.py: a Deployment, ServiceAccount,
Service and Ingress each; the Deployment at 0 replicas, as flux-benchmark's), all in one
environment. In one run on one sandbox, for 1
shard and then for 2 (each on an environment of its own, the previous one deleted
first, so both start from nothing):

- start → all Ready: every shard's first pass done, the Ready counts adding up to N;
- a no-op resync (webhook): the longest shard's pass time, and the writes of all;
- peak RSS of each shard process;
- with 2 shards, failover: `kill -9` of one, then the time until the survivor's pass
  over all N apps is done with all of them Ready.

Prints the figures and the load average; `--results` appends them to bench/RESULTS.md.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent_scale import SECRET, Bench, app_manifest, append_table, free_port, hook, peak_rss

from conveyor.sandbox import Sandbox

# As flux-benchmark's releases (replicas: 0): what is measured is the delivery tool and the
# apiserver, not the scheduler and kwok starting 10,000 Pods. With one replica each, the
# controller-manager's per-namespace lists made the cluster's own work grow with the
# square of the apps in the namespace, and it, not the agents, set the pace past 5,000.
REPLICAS = 0

_PASS = re.compile(r"pass done: (\d+)/(\d+) Ready, (\d+) writes, ([\d.]+)s")


def passes(log: Path) -> list[tuple[int, int, int, float]]:
    return [(int(r), int(t), int(w), float(s)) for r, t, w, s in _PASS.findall(log.read_text())]


class Shard:
    """One `conveyor agent --shards N` process and its log."""

    def __init__(self, bench: Bench, name: str, bare: Path, shards: int) -> None:
        self.port = free_port()
        self.log = bench.work / f"{name}.log"
        secret = bench.work / "secret"
        secret.write_bytes(SECRET)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                "agent",
                "--repo",
                str(bare),
                "--path",
                "apps",
                "--shards",
                str(shards),
                # A write the overloaded apiserver answers after its deadline leaves its
                # app for the next pass: the interval is that pass.
                "--interval",
                "60s",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--webhook-secret-file",
                str(secret),
                "--timeout",
                "900",
                "--log-format",
                "json",
            ],
            env=bench.env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def passes(self) -> list[tuple[int, int, int, float]]:
        return passes(self.log)

    def hook(self) -> None:
        hook(f"http://127.0.0.1:{self.port}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"shard exited:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(check: object, shards: list[Shard], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for shard in shards:
            shard.check_alive()
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def all_ready_after(shards: list[Shard], counts: list[int], n: int) -> bool:
    """Whether each shard has a pass after its first `counts` ones, and the newest
    passes of all of them have N apps Ready between them."""
    latest = []
    for shard, count in zip(shards, counts, strict=True):
        done = shard.passes()
        if len(done) <= count:
            return False
        latest.append(done[-1])
    return sum(ready for ready, _total, _w, _s in latest) >= n


def measure(bench: Bench, n: int, shard_count: int, *, clean_up: bool) -> dict[str, object]:
    bare, repo = bench.git_repo(f"shards{shard_count}")
    namespace = f"shards-{shard_count}"
    bench.namespace(namespace)
    for i in range(n):
        (repo / f"apps/s{i:05d}").mkdir(parents=True)
        (repo / f"apps/s{i:05d}/app.yaml").write_text(
            app_manifest(f"s{i:05d}", namespace, replicas=REPLICAS)
        )
    bench.commit(repo, bare, "apps")
    started = time.monotonic()
    shards = [Shard(bench, f"s{shard_count}-{k}", bare, shard_count) for k in range(shard_count)]
    row: dict[str, object] = {"shards": shard_count, "n": n}
    try:
        wait_for(
            lambda: all_ready_after(shards, [0] * shard_count, n),
            shards,
            timeout=3600,
            what="all Ready",
        )
        row["ready_s"] = time.monotonic() - started
        row["first_writes"] = sum(sum(p[2] for p in s.passes()) for s in shards)
        progress(row)
        counts = [len(s.passes()) for s in shards]
        for shard in shards:
            shard.hook()
        wait_for(
            lambda: all(len(s.passes()) > c for s, c in zip(shards, counts, strict=True)),
            shards,
            timeout=1800,
            what="the no-op passes",
        )
        noop = [s.passes()[-1] for s in shards]
        row["noop_s"] = max(p[3] for p in noop)
        row["noop_writes"] = sum(p[2] for p in noop)
        row["apps_per_shard"] = [p[1] for p in noop]
        row["rss_mib"] = [peak_rss(s.proc.pid) / 2**20 for s in shards]
        progress(row)
        if shard_count > 1:
            victim, survivor = shards[-1], shards[0]
            count = len(survivor.passes())
            killed = time.monotonic()
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()

            def taken_over() -> bool:
                done = survivor.passes()[count:]
                return any(total == n and ready == n for ready, total, _w, _s in done)

            wait_for(taken_over, [survivor], timeout=1800, what="the takeover")
            row["failover_s"] = time.monotonic() - killed
    finally:
        for shard in shards:
            shard.stop()
    row["load"] = os.getloadavg()
    if clean_up:
        # Waited out, so that the next measurement does not share the apiserver with
        # the deletion of this one's objects (60,000 of them at 10,000 apps).
        bench.cleanup(namespace, timeout=1800)
    return row


def progress(row: dict[str, object]) -> None:
    """What is measured so far, in case the run is cut short."""
    print(f"  so far: {row} | load {os.getloadavg()}", flush=True)


def print_row(row: dict[str, object]) -> None:
    rss = ", ".join(f"{r:.0f}" for r in row["rss_mib"])  # type: ignore[attr-defined]
    failover = f" | failover {row['failover_s']:.1f}s" if "failover_s" in row else ""
    print(
        f"{row['shards']} shard(s), {row['n']} apps: all Ready {row['ready_s']:.1f}s "
        f"({row['first_writes']} writes) | no-op {row['noop_s']:.2f}s, "
        f"{row['noop_writes']} writes | apps per shard {row['apps_per_shard']} "
        f"| peak RSS {rss} MiB{failover} | load {row['load']}",
        flush=True,
    )


def append_results(rows: list[dict[str, object]]) -> None:
    table = []
    for r in rows:
        rss = ", ".join(f"{x:.0f} MiB" for x in r["rss_mib"])  # type: ignore[attr-defined]
        failover = f"{r['failover_s']:.1f} s" if "failover_s" in r else "—"
        load = " ".join(f"{x:.1f}" for x in r["load"])  # type: ignore[attr-defined]
        table.append(
            [
                str(r["shards"]),
                str(r["n"]),
                f"{r['ready_s']:.1f} s",
                str(r["first_writes"]),
                f"{r['noop_s']:.2f} s",
                str(r["noop_writes"]),
                str(r["apps_per_shard"]),
                rss,
                failover,
                load,
            ]
        )
    columns = [
        "shards", "apps", "start → all Ready", "API writes", "no-op resync", "no-op writes",
        "apps per shard", "peak RSS per shard", "failover after kill -9", "load average",
    ]  # fmt: skip
    append_table("Shards, bench/shards.py", columns, table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=10000)
    parser.add_argument("--shards", default="1,2", help="shard counts to measure, in order")
    parser.add_argument("--sandbox", default="bench-shards")
    parser.add_argument("--keep", action="store_true", help="leave the sandbox up")
    parser.add_argument("--results", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    sandbox = Sandbox(args.sandbox)
    state = sandbox.up()
    env = {
        **os.environ,
        "KUBECONFIG": str(sandbox.kubeconfig),
        "PATH": f"{state.bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-shards-"))
    bench = Bench(work, env)
    rows = []
    try:
        counts = [int(x) for x in args.shards.split(",") if x]
        for index, count in enumerate(counts):
            # The last one's objects go with the sandbox, unless it is kept.
            clean_up = args.keep or index < len(counts) - 1
            row = measure(bench, args.apps, count, clean_up=clean_up)
            rows.append(row)
            print_row(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            sandbox.down()
    if args.results:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
