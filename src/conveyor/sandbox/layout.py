"""The files of one sandbox on disk, and its saved state.

The state file is what makes `up` idempotent and `down` exact: it records which
processes were started (pid and start time), on which ports, from which binaries.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conveyor.sandbox.process import ProcessRef


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def registry_data(self) -> Path:
        return self.root / "registry"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"


@dataclass
class ComponentRecord:
    name: str
    pid: int
    start_time: int

    @property
    def process(self) -> ProcessRef:
        return ProcessRef(pid=self.pid, start_time=self.start_time)


@dataclass
class SandboxState:
    name: str
    bin_dir: str
    versions: dict[str, str]
    ports: dict[str, int]
    components: list[ComponentRecord] = field(default_factory=list)
    ready: bool = False
    tools_dir: str = ""  # sops and age; empty in a state written before they were built

    @property
    def path(self) -> list[str]:
        """The folders to put first on PATH: kubectl and helm, then sops and age."""
        return [d for d in (self.bin_dir, self.tools_dir) if d]

    def save(self, path: Path) -> None:
        # Write-then-rename: a crash mid-write never leaves a half state file behind.
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(self), indent=2))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> SandboxState | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        raw["components"] = [ComponentRecord(**c) for c in raw.get("components", [])]
        return cls(**raw)
