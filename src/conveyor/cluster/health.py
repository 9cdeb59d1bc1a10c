"""Is an applied object done? Health by the kstatus rules, from the object alone.

The verify step must tell "still rolling out" from "will never get there" without
knowing every controller, so each object is judged only by what it reports: its
observed generation, the counters of the built-in workloads, and for everything else
the Ready/Reconciling/Stalled conditions that kstatus-compatible controllers publish.
The functions are pure, so the agent can judge objects it got from a watch or a list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from conveyor.cluster.objects import Obj


class HealthStatus(StrEnum):
    CURRENT = "Current"
    IN_PROGRESS = "InProgress"
    FAILED = "Failed"


@dataclass(frozen=True)
class Health:
    status: HealthStatus
    message: str


def _current(message: str) -> Health:
    return Health(HealthStatus.CURRENT, message)


def _in_progress(message: str) -> Health:
    return Health(HealthStatus.IN_PROGRESS, message)


def _failed(message: str) -> Health:
    return Health(HealthStatus.FAILED, message)


def _conditions(status: Obj) -> dict[str, Obj]:
    return {
        str(condition.get("type")): condition
        for condition in status.get("conditions") or []
        if isinstance(condition, dict)
    }


def _is_true(conditions: dict[str, Obj], kind: str) -> bool:
    return conditions.get(kind, {}).get("status") == "True"


def _detail(condition: Obj) -> str:
    """The condition's own words: message, else reason, else its type."""
    return str(condition.get("message") or condition.get("reason") or condition.get("type"))


def _count(status: Obj, field: str) -> int:
    return int(status.get(field) or 0)


def _deployment(label: str, spec: Obj, status: Obj) -> Health:
    wanted = int(spec.get("replicas", 1))
    conditions = _conditions(status)
    progressing = conditions.get("Progressing", {})
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        return _failed(f"{label}: progress deadline exceeded: {_detail(progressing)}")
    updated = _count(status, "updatedReplicas")
    total = _count(status, "replicas")
    available = _count(status, "availableReplicas")
    ready = _count(status, "readyReplicas")
    if updated < wanted:
        return _in_progress(f"{label}: {updated}/{wanted} replicas updated")
    if total > updated:
        return _in_progress(f"{label}: {total - updated} old replicas pending termination")
    if available < wanted:
        return _in_progress(f"{label}: {available}/{wanted} replicas available")
    if ready < wanted:
        return _in_progress(f"{label}: {ready}/{wanted} replicas ready")
    if "Available" in conditions and not _is_true(conditions, "Available"):
        return _in_progress(f"{label}: not available: {_detail(conditions['Available'])}")
    return _current(f"{label}: {available}/{wanted} replicas available")


def _stateful_set(label: str, spec: Obj, status: Obj) -> Health:
    wanted = int(spec.get("replicas", 1))
    strategy = spec.get("updateStrategy") or {}
    ready = _count(status, "readyReplicas")
    if ready < wanted:
        return _in_progress(f"{label}: {ready}/{wanted} replicas ready")
    if strategy.get("type") == "OnDelete":
        return _current(f"{label}: {ready}/{wanted} replicas ready (OnDelete updates)")
    partition = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
    if partition > 0:
        to_update = max(wanted - partition, 0)
        updated = _count(status, "updatedReplicas")
        if updated < to_update:
            return _in_progress(
                f"{label}: {updated}/{to_update} replicas updated above partition {partition}"
            )
        return _current(f"{label}: partitioned rollout complete ({updated} updated)")
    current_revision = status.get("currentRevision")
    update_revision = status.get("updateRevision")
    if current_revision != update_revision:
        updated = _count(status, "updatedReplicas")
        return _in_progress(
            f"{label}: rolling update to {update_revision}: {updated}/{wanted} replicas updated"
        )
    return _current(f"{label}: {ready}/{wanted} replicas ready")


def _daemon_set(label: str, spec: Obj, status: Obj) -> Health:
    desired = _count(status, "desiredNumberScheduled")
    for field, what in (
        ("currentNumberScheduled", "scheduled"),
        ("updatedNumberScheduled", "updated"),
        ("numberReady", "ready"),
        ("numberAvailable", "available"),
    ):
        have = _count(status, field)
        if have < desired:
            return _in_progress(f"{label}: {have}/{desired} pods {what}")
    return _current(f"{label}: {desired}/{desired} pods available")


def _replica_set(label: str, spec: Obj, status: Obj) -> Health:
    wanted = int(spec.get("replicas", 1))
    conditions = _conditions(status)
    if _is_true(conditions, "ReplicaFailure"):
        return _in_progress(f"{label}: replica failure: {_detail(conditions['ReplicaFailure'])}")
    total = _count(status, "replicas")
    if total > wanted:
        return _in_progress(f"{label}: {total - wanted} replicas pending termination")
    for field, what in (
        ("fullyLabeledReplicas", "labeled"),
        ("readyReplicas", "ready"),
        ("availableReplicas", "available"),
    ):
        have = _count(status, field)
        if have < wanted:
            return _in_progress(f"{label}: {have}/{wanted} replicas {what}")
    return _current(f"{label}: {wanted}/{wanted} replicas available")


def _job(label: str, spec: Obj, status: Obj) -> Health:
    conditions = _conditions(status)
    if _is_true(conditions, "Failed"):
        return _failed(f"{label}: failed: {_detail(conditions['Failed'])}")
    if _is_true(conditions, "Complete"):
        return _current(f"{label}: complete ({_count(status, 'succeeded')} succeeded)")
    if spec.get("suspend"):
        return _in_progress(f"{label}: suspended")
    completions = int(spec.get("completions", 1))
    succeeded = _count(status, "succeeded")
    active = _count(status, "active")
    return _in_progress(f"{label}: {succeeded}/{completions} completions, {active} active")


def _pod(label: str, spec: Obj, status: Obj) -> Health:
    phase = status.get("phase")
    if phase == "Succeeded":
        return _current(f"{label}: succeeded")
    if phase == "Failed":
        reason = status.get("message") or status.get("reason") or "a container exited in error"
        return _failed(f"{label}: failed: {reason}")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            return _failed(f"{label}: container {container.get('name')} is crash-looping")
    conditions = _conditions(status)
    if _is_true(conditions, "Ready"):
        return _current(f"{label}: ready")
    scheduled = conditions.get("PodScheduled", {})
    if scheduled.get("status") == "False":
        return _in_progress(f"{label}: not scheduled: {_detail(scheduled)}")
    return _in_progress(f"{label}: {phase or 'Pending'}, not ready")


def _persistent_volume_claim(label: str, spec: Obj, status: Obj) -> Health:
    phase = status.get("phase")
    if phase == "Bound":
        return _current(f"{label}: bound")
    if phase == "Lost":
        return _failed(f"{label}: its volume is lost")
    return _in_progress(f"{label}: {phase or 'Pending'}, not bound")


def _service(label: str, spec: Obj, status: Obj) -> Health:
    if spec.get("type") != "LoadBalancer":
        return _current(f"{label}: {spec.get('type') or 'ClusterIP'} service")
    ingress = (status.get("loadBalancer") or {}).get("ingress") or []
    if not ingress:
        return _in_progress(f"{label}: waiting for a load balancer address")
    addresses = ", ".join(str(i.get("ip") or i.get("hostname")) for i in ingress)
    return _current(f"{label}: load balancer at {addresses}")


def _custom_resource_definition(label: str, spec: Obj, status: Obj) -> Health:
    conditions = _conditions(status)
    names = conditions.get("NamesAccepted", {})
    if names.get("status") == "False":
        return _failed(f"{label}: names not accepted: {_detail(names)}")
    if _is_true(conditions, "Established"):
        return _current(f"{label}: established")
    return _in_progress(f"{label}: not established yet")


def _by_conditions(label: str, spec: Obj, status: Obj) -> Health:
    conditions = _conditions(status)
    if _is_true(conditions, "Stalled"):
        return _failed(f"{label}: stalled: {_detail(conditions['Stalled'])}")
    if _is_true(conditions, "Reconciling"):
        return _in_progress(f"{label}: reconciling: {_detail(conditions['Reconciling'])}")
    ready = conditions.get("Ready")
    if ready is None:
        return _current(f"{label}: present")
    if ready.get("status") == "True":
        return _current(f"{label}: ready")
    return _in_progress(f"{label}: not ready: {_detail(ready)}")


Rule = Callable[[str, Obj, Obj], Health]

RULES: dict[tuple[str, str], Rule] = {
    ("apps", "Deployment"): _deployment,
    ("apps", "StatefulSet"): _stateful_set,
    ("apps", "DaemonSet"): _daemon_set,
    ("apps", "ReplicaSet"): _replica_set,
    ("batch", "Job"): _job,
    ("", "Pod"): _pod,
    ("", "PersistentVolumeClaim"): _persistent_volume_claim,
    ("", "Service"): _service,
    ("apiextensions.k8s.io", "CustomResourceDefinition"): _custom_resource_definition,
}
"""Kinds whose status has a shape of its own; every other kind is judged by conditions."""

GENERATION_OBSERVERS = frozenset(
    ("apps", kind) for kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
)
"""Built-in kinds whose controller always reports observedGeneration: until it does, the
object has not been looked at. Other kinds are only compared when they report one."""


def assess(obj: Obj) -> Health:
    """Judge one live object: Current when done, InProgress while getting there, Failed
    when it needs a human."""
    kind = str(obj.get("kind", ""))
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    label = f"{kind} {meta.get('name', '?')}"
    if meta.get("deletionTimestamp"):
        return _in_progress(f"{label}: being deleted")
    rule = RULES.get((group, kind))
    generation = int(meta.get("generation") or 0)
    observed = status.get("observedGeneration")
    if observed is None and (group, kind) in GENERATION_OBSERVERS:
        return _in_progress(f"{label}: controller has not observed generation {generation} yet")
    if observed is not None and int(observed) < generation:
        return _in_progress(
            f"{label}: controller has not observed generation {generation} yet "
            f"(observed {observed})"
        )
    return (rule or _by_conditions)(label, spec, status)


def aggregate(healths: Iterable[tuple[str, Health]]) -> Health:
    """Combine named healths: the worst wins, and the message names what is not Current."""
    failed: list[str] = []
    in_progress: list[str] = []
    total = 0
    for name, health in healths:
        total += 1
        if health.status is HealthStatus.FAILED:
            failed.append(f"{name} ({health.message})")
        elif health.status is HealthStatus.IN_PROGRESS:
            in_progress.append(f"{name} ({health.message})")
    if failed:
        return _failed(f"{len(failed)}/{total} failed: " + "; ".join(failed + in_progress))
    if in_progress:
        return _in_progress(f"{len(in_progress)}/{total} in progress: " + "; ".join(in_progress))
    return _current(f"{total}/{total} current")
