"""Bring a named sandbox up, report on it, and take it down.

`up` is idempotent: a healthy sandbox is found and returned as it is; a sandbox that
once came up and now has a dead (or unhealthy) component gets that component restarted
in place, with its ports, PKI and data, so that etcd keeps its objects and every
kubeconfig and agent that dials the sandbox keeps working. Only a sandbox that never
finished starting is taken down and started afresh. Any failure while starting stops
every process already started, so nothing is left half-running.
"""

from __future__ import annotations

import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from conveyor.errors import ConveyorError
from conveyor.sandbox import process
from conveyor.sandbox.build import ensure_binaries, ensure_tools
from conveyor.sandbox.components import (
    NODE_NAME,
    PORT_NAMES,
    SERVICE_IP,
    ComponentSpec,
    Health,
    audit_policy,
    component_specs,
    kubeconfig_text,
    node_manifest,
    registry_config,
)
from conveyor.sandbox.layout import ComponentRecord, Layout, SandboxState
from conveyor.sandbox.paths import sandbox_dir, validate_name
from conveyor.sandbox.pki import Pki
from conveyor.sandbox.ports import free_ports as choose_free_ports
from conveyor.sandbox.versions import VERSIONS, Versions

Progress = Callable[[str], None]
START_TIMEOUT = 120.0
# etcd and the registry need nothing; the apiserver needs etcd; the rest need the apiserver.
START_ORDER = (
    "etcd",
    "registry",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
)


class SandboxError(ConveyorError, RuntimeError):
    """Something a user can act on: which component, what happened, its log tail."""

    def __init__(self, message: str, *, component: str | None = None, log_tail: str = "") -> None:
        self.component = component
        self.log_tail = log_tail
        text = message
        if log_tail:
            text += f"\n--- last lines of {component} log ---\n{log_tail}"
        super().__init__(text)


class PortInUseError(SandboxError):
    pass


@dataclass
class ComponentStatus:
    name: str
    pid: int
    running: bool
    healthy: bool
    rss_bytes: int
    detail: str
    log: str
    log_tail: str | None = None


@dataclass
class SandboxStatus:
    name: str
    exists: bool
    ready: bool
    kubeconfig: str | None
    registry: str | None
    components: list[ComponentStatus]

    @property
    def rss_bytes(self) -> int:
        return sum(c.rss_bytes for c in self.components)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "rss_bytes": self.rss_bytes}


class Sandbox:
    def __init__(
        self,
        name: str = "default",
        *,
        versions: Versions = VERSIONS,
        progress: Progress | None = None,
    ) -> None:
        self.name = validate_name(name)
        self.versions = versions
        self.layout = Layout(sandbox_dir(name))
        self._say: Progress = progress or (lambda _message: None)

    # -- queries -----------------------------------------------------------------

    def state(self) -> SandboxState | None:
        return SandboxState.load(self.layout.state_file)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    def registry(self) -> str:
        state = self._require_state()
        return f"127.0.0.1:{state.ports['registry']}"

    def env_lines(self) -> list[str]:
        state = self._require_state()
        return [
            f"export KUBECONFIG={self.layout.kubeconfig}",
            f"export CONVEYOR_REGISTRY=127.0.0.1:{state.ports['registry']}",
            f"export PATH={os.pathsep.join(state.path)}:$PATH",
        ]

    def status(self) -> SandboxStatus:
        state = self.state()
        if state is None:
            return SandboxStatus(self.name, False, False, None, None, [])
        pki = Pki.at(self.layout.pki_dir)
        specs = {
            s.name: s for s in component_specs(self.layout, state.ports, Path(state.bin_dir), pki)
        }
        statuses = []
        for record in state.components:
            running = process.is_running(record.process)
            healthy, detail = (False, "not running")
            if running and record.name in specs:
                healthy, detail = _probe(specs[record.name].health, pki)
            log = self.layout.log(record.name)
            statuses.append(
                ComponentStatus(
                    name=record.name,
                    pid=record.pid,
                    running=running,
                    healthy=healthy,
                    rss_bytes=process.rss_bytes(record.process),
                    detail=detail,
                    log=str(log),
                    log_tail=None if running else process.tail(log),
                )
            )
        ready = state.ready and bool(statuses) and all(s.healthy for s in statuses)
        return SandboxStatus(
            self.name,
            True,
            ready,
            str(self.layout.kubeconfig),
            f"127.0.0.1:{state.ports['registry']}",
            statuses,
        )

    # -- lifecycle ---------------------------------------------------------------

    def up(self, *, timeout: float = START_TIMEOUT) -> SandboxState:
        """Start (or find, or mend) the sandbox, with sops and age built beside it."""
        state = self._up(timeout=timeout)
        tools = str(ensure_tools(progress=self._say))
        if state.tools_dir != tools:  # also a sandbox started before the tools existed
            state.tools_dir = tools
            state.save(self.layout.state_file)
        return state

    def _up(self, *, timeout: float) -> SandboxState:
        existing = self.state()
        if existing is not None:
            status = self.status()
            if status.ready:
                self._say(f"sandbox {self.name} is already running")
                return existing
            if existing.ready:
                return self._restart_unhealthy(existing, status, timeout=timeout)
            self._say(f"sandbox {self.name} never finished starting; starting it afresh")
            self.down()
        bin_dir = ensure_binaries(self.versions, progress=self._say)
        try:
            return self._start(bin_dir, timeout=timeout)
        except PortInUseError:
            # Another program took a port between our choice and the bind: choose again once.
            self._say("a port was taken while starting; retrying with new ports")
            self.down()
            return self._start(bin_dir, timeout=timeout)

    def down(self) -> list[str]:
        """Stop the processes this sandbox started (by pid and start time), remove its state."""
        stopped: list[str] = []
        state = self.state()
        if state is not None:
            for record in reversed(state.components):
                if process.stop(record.process):
                    stopped.append(record.name)
        # A file vanishing while we delete (a component's last write) is not an error.
        shutil.rmtree(self.layout.root, onerror=_ignore_missing)
        return stopped

    def restart_component(
        self,
        name: str,
        *,
        down_for: float = 0.0,
        state: SandboxState | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        """Stop one component, optionally wait, and start it again with the same command
        line (same ports and data): how `up` mends a sandbox, and an outage drill for
        tests and demos."""
        state = state or self._require_state()
        pki = Pki.at(self.layout.pki_dir)
        specs = {
            s.name: s for s in component_specs(self.layout, state.ports, Path(state.bin_dir), pki)
        }
        record = next((c for c in state.components if c.name == name), None)
        if record is None or name not in specs:
            raise SandboxError(f"sandbox {self.name} has no component {name!r}")
        process.stop(record.process)
        time.sleep(down_for)
        state.components.remove(record)
        # The command line may name files that a sandbox made by an older conveyor lacks.
        _write_config(self.layout, state.ports)
        self._launch(state, specs[name])
        self._wait_healthy(state, specs[name], pki, time.monotonic() + timeout)

    def _restart_unhealthy(
        self, state: SandboxState, status: SandboxStatus, *, timeout: float
    ) -> SandboxState:
        """Restart, in start order, each component that is dead or unhealthy; the rest
        keep running. A component that cannot start again is an error that names it: the
        sandbox is never wiped behind its users' backs (`down`, then `up`, does that)."""
        deadline = time.monotonic() + timeout
        broken = {c.name for c in status.components if not c.healthy}
        # Start order, not the order of the records: a restart appends its record, and
        # after a reboot everything is dead and the apiserver must come before the rest.
        for name in sorted(broken, key=START_ORDER.index):
            self._say(f"sandbox {self.name}: {name} is not healthy; restarting it in place")
            try:
                self.restart_component(
                    name, state=state, timeout=max(deadline - time.monotonic(), 1.0)
                )
            except SandboxError as error:
                raise SandboxError(
                    f"sandbox {self.name}: {name} did not start again in place ({error}); "
                    f"`conveyor sandbox down --name {self.name}` then `up` starts a new one",
                    component=name,
                ) from error
        pki = Pki.at(self.layout.pki_dir)
        with _api_client(state.ports["apiserver"], pki) as api:
            _wait_for(lambda: _node_ready(api), "node Ready", deadline, self._say)
        self._say(f"sandbox {self.name} mended: restarted {', '.join(sorted(broken))}")
        return state

    # -- internals ---------------------------------------------------------------

    def _require_state(self) -> SandboxState:
        state = self.state()
        if state is None:
            raise SandboxError(
                f"sandbox {self.name!r} is not running; start it with "
                f"`conveyor sandbox up --name {self.name}`"
            )
        return state

    def _start(self, bin_dir: Path, *, timeout: float) -> SandboxState:
        started = time.monotonic()
        layout = self.layout
        for directory in (
            layout.root,
            layout.config_dir,
            layout.log_dir,
            layout.etcd_data,
            layout.registry_data,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        ports = choose_free_ports(PORT_NAMES)
        pki = _generate_pki(layout.pki_dir, cluster_name=self.name)
        layout.kubeconfig.write_text(
            kubeconfig_text(
                name=self.name, server=f"https://127.0.0.1:{ports['apiserver']}", pki=pki
            )
        )
        layout.kubeconfig.chmod(0o600)
        _write_config(layout, ports)
        state = SandboxState(
            name=self.name,
            bin_dir=str(bin_dir),
            versions=vars(self.versions),
            ports=ports,
        )
        state.save(layout.state_file)
        specs = {s.name: s for s in component_specs(layout, ports, bin_dir, pki)}
        deadline = started + timeout
        try:
            # etcd and the registry need nothing; the apiserver needs etcd; the rest
            # need the apiserver. The node is registered before kwok starts, so that kwok
            # takes it over (and renews its Lease) from its first sync.
            for wave in (START_ORDER[:2], START_ORDER[2:3]):
                self._start_wave(state, [specs[n] for n in wave], pki, deadline)
            self._say("registering the fake node")
            with _api_client(ports["apiserver"], pki) as api:
                _ensure_node(api, self.name)
                self._start_wave(
                    state,
                    [specs[n] for n in START_ORDER[3:]],
                    pki,
                    deadline,
                )
                _wait_for(lambda: _node_ready(api), "node Ready", deadline, self._say)
                _wait_for(lambda: _node_lease(api), "node Lease", deadline, self._say)
                _wait_for(
                    lambda: _default_service_account(api),
                    "default ServiceAccount",
                    deadline,
                    self._say,
                )
        except BaseException:
            self._stop_started(state)
            raise
        state.ready = True
        state.save(layout.state_file)
        self._say(f"sandbox {self.name} ready in {time.monotonic() - started:.1f}s")
        return state

    def _start_wave(
        self, state: SandboxState, specs: list[ComponentSpec], pki: Pki, deadline: float
    ) -> None:
        """Start components together, then wait for each to be healthy."""
        for spec in specs:
            self._launch(state, spec)
        for spec in specs:
            self._wait_healthy(state, spec, pki, deadline)

    def _launch(self, state: SandboxState, spec: ComponentSpec) -> None:
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"}
        ref = process.start(
            spec.argv, log=self.layout.log(spec.name), env=env, cwd=self.layout.root
        )
        state.components.append(ComponentRecord(spec.name, ref.pid, ref.start_time))
        state.save(self.layout.state_file)

    def _wait_healthy(
        self, state: SandboxState, spec: ComponentSpec, pki: Pki, deadline: float
    ) -> None:
        self._say(f"waiting for {spec.name}")
        record = next(c for c in state.components if c.name == spec.name)
        last_detail = ""
        while time.monotonic() < deadline:
            if not process.is_running(record.process):
                log_tail = process.tail(self.layout.log(spec.name))
                if "address already in use" in log_tail:
                    raise PortInUseError(
                        f"{spec.name} could not bind its port: address already in use",
                        component=spec.name,
                        log_tail=log_tail,
                    )
                raise SandboxError(
                    f"{spec.name} exited while starting", component=spec.name, log_tail=log_tail
                )
            healthy, last_detail = _probe(spec.health, pki)
            if healthy:
                return
            time.sleep(0.2)
        raise SandboxError(
            f"{spec.name} was not healthy within the start timeout ({spec.health.url}: "
            f"{last_detail})",
            component=spec.name,
            log_tail=process.tail(self.layout.log(spec.name)),
        )

    def _stop_started(self, state: SandboxState) -> None:
        for record in reversed(state.components):
            process.stop(record.process)
        state.save(self.layout.state_file)


def _ignore_missing(
    _function: object, path: str, error: tuple[type, BaseException, object]
) -> None:
    if not isinstance(error[1], FileNotFoundError):
        raise error[1]


def _generate_pki(directory: Path, *, cluster_name: str) -> Pki:
    # Imported here, not at the top: `cryptography` is the sandbox extra, and every
    # command (the image's too) imports this module through the CLI.
    try:
        from conveyor.sandbox.certificates import generate
    except ModuleNotFoundError as missing:
        raise SandboxError(
            f"a sandbox needs {missing.name}, which this install leaves out: "
            "pip install 'conveyor[sandbox]'"
        ) from None
    return generate(directory, cluster_name=cluster_name, service_ip=SERVICE_IP)


def _ssl_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


def _api_client(port: int, pki: Pki) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://127.0.0.1:{port}", verify=_ssl_context(pki), timeout=10.0
    )


def _probe(health: Health, pki: Pki) -> tuple[bool, str]:
    verify: ssl.SSLContext | bool
    if health.mode == "client-cert":
        verify = _ssl_context(pki)
    else:
        verify = health.mode != "insecure"
    try:
        response = httpx.get(health.url, verify=verify, timeout=2.0)
    except httpx.HTTPError as error:
        return False, f"{type(error).__name__}: {error}"
    if response.status_code == 200:
        return True, "ok"
    return False, f"HTTP {response.status_code}: {response.text[:200]}"


def _ensure_node(api: httpx.Client, sandbox: str) -> None:
    manifest = node_manifest(sandbox)
    response = api.post("/api/v1/nodes", json=manifest)
    if response.status_code not in (201, 409):
        raise SandboxError(
            f"could not create the fake node: HTTP {response.status_code} {response.text[:300]}"
        )
    # Status is ignored on create; capacity must be set on the status subresource.
    response = api.patch(
        f"/api/v1/nodes/{NODE_NAME}/status",
        json={"status": manifest["status"]},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    if response.status_code != 200:
        raise SandboxError(
            f"could not set the fake node's capacity: HTTP "
            f"{response.status_code} {response.text[:300]}"
        )


def _node_ready(api: httpx.Client) -> bool:
    response = api.get(f"/api/v1/nodes/{NODE_NAME}")
    if response.status_code != 200:
        return False
    conditions = response.json().get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _node_lease(api: httpx.Client) -> bool:
    """kwok renews the node's Lease like a kubelet; without it the node flaps NotReady."""
    return (
        api.get(
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE_NAME}"
        ).status_code
        == 200
    )


def _default_service_account(api: httpx.Client) -> bool:
    return api.get("/api/v1/namespaces/default/serviceaccounts/default").status_code == 200


def _wait_for(check: Callable[[], bool], what: str, deadline: float, say: Progress) -> None:
    say(f"waiting for {what}")
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SandboxError(f"timed out waiting for {what}")


__all__ = ["PortInUseError", "Sandbox", "SandboxError", "SandboxStatus"]


def _write_config(layout: Layout, ports: dict[str, int]) -> None:
    """The components' config files, from this version's code (the registry's, the
    apiserver's audit policy): written at start and again before a restart in place."""
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    (layout.config_dir / "registry.yaml").write_text(registry_config(layout, ports["registry"]))
    (layout.config_dir / "audit-policy.yaml").write_text(audit_policy())
