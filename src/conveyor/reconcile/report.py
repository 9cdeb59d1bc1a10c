"""Report outcomes beyond the status object: Kubernetes Events, Prometheus metrics and
the notification for a change.

Events are recorded only on changes (an applied revision, a failure, drift), so a no-op
resync writes nothing; a failure to record an event never fails a reconcile.
"""

from __future__ import annotations

import logging
import uuid

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor.causes import capped, short_cause
from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.notify.sinks import Notification
from conveyor.reconcile.status import (
    API_VERSION,
    KIND,
    NAMESPACE,
    READY,
    STALLED,
    WAITING_FOR_GATE,
    AppStatus,
    now,
)
from conveyor.source.git import LogEntry, change_kind

log = logging.getLogger("conveyor.reconcile")


def error_summary(error: BaseException) -> str:
    """An error as one line for a status, an event or a log message. conveyor's own errors
    say what failed; any other (httpx's, a KeyError from a bug) is named by its type."""
    lines = str(error).strip().splitlines()
    name = type(error).__name__
    if not lines:
        return name
    first = short_cause(lines[0])
    return first if type(error).__module__.startswith("conveyor.") else f"{name}: {first}"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "conveyor_reconcile_total",
            "App reconciles by result",
            ["scope", "app", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "conveyor_reconcile_duration_seconds",
            "Duration of one app reconcile",
            ["scope"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "conveyor_app_ready",
            "1 when the app is Ready",
            ["scope", "app"],
            registry=self.registry,
        )
        self.writes = Counter(
            "conveyor_api_writes_total",
            "API writes made by reconciles",
            ["scope"],
            registry=self.registry,
        )
        self.fetches = Counter(
            "conveyor_source_fetch_total",
            "Fetches of the config repo",
            ["result"],
            registry=self.registry,
        )
        self.pass_failures = Counter(
            "conveyor_pass_failures_total",
            "Agent passes interrupted by an error, retried after a backoff",
            ["error"],
            registry=self.registry,
        )
        self.revision = Gauge(
            "conveyor_source_revision_info",
            "Git revision being applied",
            ["scope", "revision"],
            registry=self.registry,
        )
        # A shard's load (agent --shards): its own apps and how long its last pass took.
        self.shard_apps = Gauge(
            "conveyor_shard_apps",
            "Apps this shard owned in its last pass",
            ["scope", "shard"],
            registry=self.registry,
        )
        self.shard_pass = Gauge(
            "conveyor_shard_pass_seconds",
            "Duration of this shard's last full pass",
            ["scope", "shard"],
            registry=self.registry,
        )
        self.shards_live = Gauge(
            "conveyor_shards_live",
            "Shards of the environment this shard sees live",
            ["scope"],
            registry=self.registry,
        )


class EventRecorder:
    def __init__(self, kube: KubeClient, *, component: str = "conveyor") -> None:
        self.kube = kube
        self.component = component

    async def record(
        self,
        status: AppStatus,
        *,
        warning: bool,
        reason: str,
        message: str,
        details: str | None = None,
    ) -> None:
        """An Event whose message is the one-line `message`, then the full text (capped);
        the log hears the one line (helm's full output is logged where it fails)."""
        timestamp = now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{status.name}.{uuid.uuid4().hex[:10]}", "namespace": NAMESPACE},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": status.name,
                "namespace": NAMESPACE,
            },
            "reason": reason,
            "message": capped(f"{message}\n\n{details}" if details else message),
            "type": "Warning" if warning else "Normal",
            "source": {"component": self.component},
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        }
        level = logging.WARNING if warning else logging.INFO
        log.log(
            level,
            "%s",
            message,
            extra={
                "app": status.app,
                "scope": status.scope,
                "reason": reason,
                "revision": status.attempted_revision,
            },
        )
        try:
            await self.kube.request(
                "POST", f"/api/v1/namespaces/{NAMESPACE}/events", json_body=event
            )
        except (ApiError, OSError, httpx.HTTPError) as error:
            log.warning("could not record event %s for %s: %s", reason, status.app, error)


# What a newly applied revision is announced as, by the kind of commit that brought it.
_APPLIED_EVENT = {"promotion": "promoted", "rollback": "rolled-back"}


def notification_for(
    status: AppStatus,
    *,
    identity: EnvironmentIdentity,
    newly_applied: bool,
    change: LogEntry | None = None,
) -> Notification | None:
    """The notification a status change is worth: a newly applied revision (`promoted` or
    `rolled-back` when `change`, the commit that brought it, is a promotion or a
    rollback; its author is the actor), a failure (a remediation rollback is
    `rolled-back`), corrected drift, a gate to wait for. The environment is named as
    `identity` names it (the status's scope may carry a suffix that keeps two
    environments of one name apart in a cluster), with its source and id beside."""
    actor = None
    if status.state == READY and status.reason == "DriftCorrected":
        event = "drift-corrected"
    elif status.state == READY and newly_applied:
        kind = change_kind(change.subject, change.body) if change is not None else "manual"
        event = _APPLIED_EVENT.get(kind, "applied")
        actor = change.author if change is not None and event != "applied" else None
    elif status.state == STALLED:
        event = "rolled-back" if status.reason == "RolledBack" else "failed"
    elif status.state == WAITING_FOR_GATE:
        event = "waiting-for-gate"
    else:
        return None
    return Notification(
        event=event,
        environment=identity.name,
        source=identity.source,
        owner=identity.id,
        app=status.app,
        state=status.state,
        reason=status.reason,
        message=status.message,
        revision=status.attempted_revision,
        time=now(),
        actor=actor,
    )
