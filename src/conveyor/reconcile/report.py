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

from conveyor.cluster.client import ApiError, KubeClient
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

log = logging.getLogger("conveyor.reconcile")


def error_summary(error: BaseException) -> str:
    """An error as one line for a status, an event or a log message. conveyor's own errors
    say what failed; any other (httpx's, a KeyError from a bug) is named by its type."""
    lines = str(error).strip().splitlines()
    name = type(error).__name__
    if not lines:
        return name
    return lines[0] if type(error).__module__.startswith("conveyor.") else f"{name}: {lines[0]}"


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


class EventRecorder:
    def __init__(self, kube: KubeClient, *, component: str = "conveyor") -> None:
        self.kube = kube
        self.component = component

    async def record(self, status: AppStatus, *, warning: bool, reason: str, message: str) -> None:
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
            "message": message[:1024],
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


def notification_for(status: AppStatus, *, newly_applied: bool) -> Notification | None:
    """The notification a status change is worth: a newly applied revision, a failure
    (a remediation rollback is `rolled-back`), corrected drift, a gate to wait for."""
    if status.state == READY and status.reason == "DriftCorrected":
        event = "drift-corrected"
    elif status.state == READY and newly_applied:
        event = "applied"
    elif status.state == STALLED:
        event = "rolled-back" if status.reason == "RolledBack" else "failed"
    elif status.state == WAITING_FOR_GATE:
        event = "waiting-for-gate"
    else:
        return None
    return Notification(
        event=event,
        environment=status.scope,
        app=status.app,
        state=status.state,
        reason=status.reason,
        message=status.message,
        revision=status.attempted_revision,
        time=now(),
    )
