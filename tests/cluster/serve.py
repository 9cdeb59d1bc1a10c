"""A real `conveyor serve` process on loopback for the dashboard and API tests."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import SandboxHandle


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    def __init__(self, sandbox: SandboxHandle, tmp: Path, *extra: str, tokens: bool = True) -> None:
        self.port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.log = tmp / f"serve-{self.port}.log"
        args = [sys.executable, "-m", "conveyor", "serve", "--listen", f"127.0.0.1:{self.port}"]
        args += ["--log-format", "json"]  # the tests read the audit lines as JSON
        if tokens:
            token_file = tmp / f"tokens-{self.port}"
            token_file.write_text(f"# who may act\nalice {self.token}\n")
            token_file.chmod(0o600)
            args += ["--token-file", str(token_file)]
        self.process = subprocess.Popen(
            [*args, *extra],
            env=sandbox.env,
            stdout=self.log.open("w"),  # serve logs on stdout
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2).json()["status"] == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
