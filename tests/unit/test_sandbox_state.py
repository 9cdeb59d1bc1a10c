"""Ports, state files, pid identity, and start failures, without a real cluster."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor.sandbox import process
from conveyor.sandbox.components import PORT_NAMES, component_specs
from conveyor.sandbox.layout import ComponentRecord, Layout, SandboxState
from conveyor.sandbox.manager import PortInUseError, Sandbox, SandboxError
from conveyor.sandbox.paths import validate_name
from conveyor.sandbox.pki import Pki
from conveyor.sandbox.ports import free_ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(PORT_NAMES)
    assert set(ports) == set(PORT_NAMES)
    assert len(set(ports.values())) == len(PORT_NAMES)
    assert all(1024 < p < 65536 for p in ports.values())


def test_state_round_trips(tmp_path: Path) -> None:
    state = SandboxState(
        name="a",
        bin_dir="/bin",
        versions={"kubernetes": "v1.36.3"},
        ports={"apiserver": 1234},
        components=[ComponentRecord("etcd", 42, 777)],
        ready=True,
    )
    path = tmp_path / "state.json"
    state.save(path)
    assert SandboxState.load(path) == state
    assert SandboxState.load(tmp_path / "missing.json") is None
    assert not path.with_suffix(".partial").exists()


@pytest.mark.parametrize("name", ["default", "staging", "prod-2"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "UPPER", "a/b", "-x", "x" * 41])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid sandbox name"):
        validate_name(name)


def test_stop_signals_only_the_process_it_started() -> None:
    ref = process.start(["sleep", "60"], log=Path("/tmp/conveyor-test-sleep.log"))
    assert process.is_running(ref)
    impostor = process.ProcessRef(pid=ref.pid, start_time=ref.start_time + 1)
    assert not process.is_running(impostor)
    assert process.stop(impostor) is False  # a reused pid is never signalled
    assert process.is_running(ref)
    assert process.stop(ref) is True
    assert not process.is_running(ref)


def test_every_server_listens_on_loopback(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    ports = free_ports(PORT_NAMES)
    specs = component_specs(layout, ports, tmp_path / "bin", Pki.at(tmp_path / "pki"))
    for spec in specs:
        assert spec.health.url.startswith("http://127.0.0.1:") or spec.health.url.startswith(
            "https://127.0.0.1:"
        )
        for arg in spec.argv:
            assert "0.0.0.0" not in arg  # noqa: S104 - asserting it is absent
    apiserver = next(s for s in specs if s.name == "kube-apiserver")
    assert f"--secure-port={ports['apiserver']}" in apiserver.argv
    assert "--bind-address=127.0.0.1" in apiserver.argv


def _fake_bin(directory: Path, etcd_script: str) -> Path:
    directory.mkdir()
    for name in (
        "etcd",
        "registry",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ):
        script = directory / name
        script.write_text("#!/bin/sh\nsleep 30\n" if name != "etcd" else etcd_script)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return directory


def _sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    monkeypatch.setenv("CONVEYOR_STATE", str(tmp_path / "state"))
    return Sandbox("unit")


def test_component_that_exits_during_start_is_reported_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = _sandbox(tmp_path, monkeypatch)
    bin_dir = _fake_bin(tmp_path / "bin", "#!/bin/sh\necho 'etcd: data dir is corrupt'\nexit 1\n")
    started = time.monotonic()
    with pytest.raises(SandboxError) as caught:
        sandbox._start(bin_dir, timeout=20)
    assert time.monotonic() - started < 15
    assert caught.value.component == "etcd"
    assert "etcd exited while starting" in str(caught.value)
    assert "data dir is corrupt" in caught.value.log_tail
    # Everything it had started (the registry stand-in) was stopped again.
    state = sandbox.state()
    assert state is not None
    assert not any(process.is_running(c.process) for c in state.components)


def test_port_in_use_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox = _sandbox(tmp_path, monkeypatch)
    bin_dir = _fake_bin(
        tmp_path / "bin",
        "#!/bin/sh\necho 'listen tcp 127.0.0.1:2379: bind: address already in use'\nexit 1\n",
    )
    with pytest.raises(PortInUseError, match="address already in use"):
        sandbox._start(bin_dir, timeout=20)


def test_env_and_status_of_a_missing_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = _sandbox(tmp_path, monkeypatch)
    assert sandbox.status().exists is False
    with pytest.raises(SandboxError, match="not running; start it with"):
        sandbox.env_lines()
    assert sandbox.down() == []


def test_cli_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "conveyor 0.1.0"


def test_config_files_are_written_from_this_version_before_a_restart(tmp_path: Path) -> None:
    """A sandbox made by an older conveyor may lack a file the apiserver's command line
    now names (the audit policy): a restart in place writes them first."""
    from conveyor.sandbox.layout import Layout
    from conveyor.sandbox.manager import _write_config

    layout = Layout(tmp_path / "old")
    _write_config(layout, {"registry": 5000})
    assert (layout.config_dir / "audit-policy.yaml").read_text().startswith("apiVersion")
    assert "5000" in (layout.config_dir / "registry.yaml").read_text()
