"""Start, find and stop the sandbox's server processes by pid, safely.

A pid alone can be reused by an unrelated process after ours died, so every pid is
stored with its kernel start time and checked against it before it is signalled:
`sandbox down` stops exactly what `sandbox up` started, nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/<pid>/stat


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def start_time_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(ref: ProcessRef) -> bool:
    fields = _stat_fields(ref.pid)
    if fields is None or int(fields[19]) != ref.start_time:
        return False
    return fields[0] not in ("Z", "X")  # a zombie has exited already


def rss_bytes(ref: ProcessRef) -> int:
    if not is_running(ref):
        return 0
    try:
        for line in Path(f"/proc/{ref.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def start(
    argv: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ProcessRef:
    """Start a detached server (own session, so it outlives the CLI) logging to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    started = start_time_of(process.pid)
    if started is None:  # exited before we could look at it
        process.wait()
        return ProcessRef(pid=process.pid, start_time=-1)
    return ProcessRef(pid=process.pid, start_time=started)


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_reaped(ref: ProcessRef, *, timeout: float = 5.0) -> None:
    """Wait until an exited process has left the process table.

    Processes whose starter has exited are reaped by init, which may take a moment;
    `down` returns only when no trace (not even a zombie) is left.
    """
    deadline = time.monotonic() + timeout
    while start_time_of(ref.pid) == ref.start_time and time.monotonic() < deadline:
        _reap(ref.pid)
        time.sleep(0.05)


def stop(ref: ProcessRef, *, grace: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds. Returns True if it was running."""
    if not is_running(ref):
        _wait_reaped(ref)
        return False
    os.kill(ref.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(ref.pid)
        if not is_running(ref):
            break
        time.sleep(0.05)
    if is_running(ref):
        os.kill(ref.pid, signal.SIGKILL)
        while is_running(ref):
            _reap(ref.pid)
            time.sleep(0.05)
    _wait_reaped(ref)
    return True


def tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(data.rstrip().splitlines()[-lines:])
