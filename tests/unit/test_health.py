"""kstatus rules, one realistic object per case: what is done, what is on its way, what
will never get there on its own."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.cluster.health import Health, HealthStatus, aggregate, assess

CURRENT = HealthStatus.CURRENT
IN_PROGRESS = HealthStatus.IN_PROGRESS
FAILED = HealthStatus.FAILED

Obj = dict[str, Any]


def condition(kind: str, status: str, reason: str = "", message: str = "") -> Obj:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def obj(
    api_version: str,
    kind: str,
    *,
    spec: Obj | None = None,
    status: Obj | None = None,
    generation: int = 1,
    **meta: Any,
) -> Obj:
    body: Obj = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "web", "namespace": "apps", "generation": generation, **meta},
    }
    if spec is not None:
        body["spec"] = spec
    if status is not None:
        body["status"] = status
    return body


def deployment(status: Obj | None, *, replicas: int = 2, generation: int = 1) -> Obj:
    return obj(
        "apps/v1",
        "Deployment",
        generation=generation,
        spec={
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}},
        },
        status=status,
    )


def deployment_status(
    *,
    replicas: int = 2,
    updated: int = 2,
    ready: int = 2,
    available: int = 2,
    observed: int = 1,
    progressing: Obj | None = None,
) -> Obj:
    return {
        "observedGeneration": observed,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "conditions": [
            condition("Available", "True", "MinimumReplicasAvailable"),
            progressing
            or condition("Progressing", "True", "NewReplicaSetAvailable", 'ReplicaSet "web-1"'),
        ],
    }


def stateful_set(status: Obj, *, strategy: Obj | None = None) -> Obj:
    return obj(
        "apps/v1",
        "StatefulSet",
        spec={
            "replicas": 3,
            "serviceName": "web",
            "updateStrategy": strategy or {"type": "RollingUpdate"},
        },
        status={"observedGeneration": 1, **status},
    )


def daemon_set(**counts: int) -> Obj:
    status = {
        "observedGeneration": 1,
        "desiredNumberScheduled": 3,
        "currentNumberScheduled": 3,
        "updatedNumberScheduled": 3,
        "numberReady": 3,
        "numberAvailable": 3,
        "numberMisscheduled": 0,
    }
    return obj("apps/v1", "DaemonSet", spec={}, status={**status, **counts})


def replica_set(status: Obj) -> Obj:
    full = {
        "observedGeneration": 1,
        "replicas": 2,
        "fullyLabeledReplicas": 2,
        "readyReplicas": 2,
        "availableReplicas": 2,
    }
    return obj("apps/v1", "ReplicaSet", spec={"replicas": 2}, status={**full, **status})


def job(status: Obj, **spec: Any) -> Obj:
    return obj("batch/v1", "Job", spec={"completions": 1, "backoffLimit": 2, **spec}, status=status)


def pod(status: Obj) -> Obj:
    return obj("v1", "Pod", spec={"containers": [{"name": "web", "image": "web:1"}]}, status=status)


def service(kind: str, status: Obj | None = None) -> Obj:
    return obj("v1", "Service", spec={"type": kind, "ports": [{"port": 80}]}, status=status or {})


def custom(conditions: list[Obj], *, observed: int | None = 1, generation: int = 1) -> Obj:
    status: Obj = {"conditions": conditions}
    if observed is not None:
        status["observedGeneration"] = observed
    return obj("example.com/v1", "Database", spec={"size": 1}, status=status, generation=generation)


CASES: list[tuple[str, Obj, HealthStatus, str]] = [
    # -- generations ---------------------------------------------------------------
    ("deployment just created, no status", deployment(None), IN_PROGRESS, "observed generation"),
    (
        "deployment spec changed, not observed",
        deployment(deployment_status(), generation=2),
        IN_PROGRESS,
        "generation 2 yet (observed 1)",
    ),
    (
        "being deleted",
        obj("v1", "ConfigMap", deletionTimestamp="2026-01-01T00:00:00Z"),
        IN_PROGRESS,
        "being deleted",
    ),
    # -- Deployment ------------------------------------------------------------------
    ("deployment rolled out", deployment(deployment_status()), CURRENT, "2/2 replicas available"),
    (
        "deployment scaled to zero",
        deployment(deployment_status(replicas=0, updated=0, ready=0, available=0), replicas=0),
        CURRENT,
        "0/0",
    ),
    (
        "deployment updating",
        deployment(deployment_status(replicas=3, updated=1, ready=2, available=2)),
        IN_PROGRESS,
        "1/2 replicas updated",
    ),
    (
        "deployment old replicas still present",
        deployment(deployment_status(replicas=3, updated=2, ready=3, available=3)),
        IN_PROGRESS,
        "1 old replicas pending termination",
    ),
    (
        "deployment waiting for availability",
        deployment(deployment_status(ready=1, available=1)),
        IN_PROGRESS,
        "Deployment web: 1/2 replicas available",
    ),
    (
        "deployment available but not all ready",
        deployment(deployment_status(ready=1, available=2)),
        IN_PROGRESS,
        "1/2 replicas ready",
    ),
    (
        "deployment past its progress deadline",
        deployment(
            deployment_status(
                ready=0,
                available=0,
                progressing=condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    'ReplicaSet "web-1" has timed out progressing.',
                ),
            )
        ),
        FAILED,
        "timed out progressing",
    ),
    # -- StatefulSet -----------------------------------------------------------------
    (
        "statefulset rolled out",
        stateful_set(
            {"replicas": 3, "readyReplicas": 3, "currentRevision": "r1", "updateRevision": "r1"}
        ),
        CURRENT,
        "3/3 replicas ready",
    ),
    (
        "statefulset pods not ready",
        stateful_set(
            {"replicas": 3, "readyReplicas": 1, "currentRevision": "r1", "updateRevision": "r1"}
        ),
        IN_PROGRESS,
        "1/3 replicas ready",
    ),
    (
        "statefulset rolling update",
        stateful_set(
            {
                "replicas": 3,
                "readyReplicas": 3,
                "updatedReplicas": 1,
                "currentRevision": "r1",
                "updateRevision": "r2",
            }
        ),
        IN_PROGRESS,
        "rolling update to r2: 1/3",
    ),
    (
        "statefulset partition not yet reached",
        stateful_set(
            {
                "replicas": 3,
                "readyReplicas": 3,
                "updatedReplicas": 0,
                "currentRevision": "r1",
                "updateRevision": "r2",
            },
            strategy={"type": "RollingUpdate", "rollingUpdate": {"partition": 2}},
        ),
        IN_PROGRESS,
        "0/1 replicas updated above partition 2",
    ),
    (
        "statefulset partitioned rollout done",
        stateful_set(
            {
                "replicas": 3,
                "readyReplicas": 3,
                "updatedReplicas": 1,
                "currentRevision": "r1",
                "updateRevision": "r2",
            },
            strategy={"type": "RollingUpdate", "rollingUpdate": {"partition": 2}},
        ),
        CURRENT,
        "partitioned rollout complete",
    ),
    (
        "statefulset OnDelete ignores revisions",
        stateful_set(
            {"replicas": 3, "readyReplicas": 3, "currentRevision": "r1", "updateRevision": "r2"},
            strategy={"type": "OnDelete"},
        ),
        CURRENT,
        "OnDelete",
    ),
    # -- DaemonSet -------------------------------------------------------------------
    ("daemonset everywhere", daemon_set(), CURRENT, "3/3 pods available"),
    ("daemonset not scheduled", daemon_set(currentNumberScheduled=2), IN_PROGRESS, "2/3 pods sch"),
    ("daemonset updating", daemon_set(updatedNumberScheduled=1), IN_PROGRESS, "1/3 pods updated"),
    ("daemonset not ready", daemon_set(numberReady=2), IN_PROGRESS, "2/3 pods ready"),
    ("daemonset not available", daemon_set(numberAvailable=0), IN_PROGRESS, "0/3 pods available"),
    (
        "daemonset with no matching nodes",
        daemon_set(
            desiredNumberScheduled=0,
            currentNumberScheduled=0,
            updatedNumberScheduled=0,
            numberReady=0,
            numberAvailable=0,
        ),
        CURRENT,
        "0/0",
    ),
    # -- ReplicaSet ------------------------------------------------------------------
    ("replicaset available", replica_set({}), CURRENT, "2/2 replicas available"),
    ("replicaset not ready", replica_set({"readyReplicas": 1}), IN_PROGRESS, "1/2 replicas ready"),
    (
        "replicaset scaling down",
        replica_set({"replicas": 3}),
        IN_PROGRESS,
        "1 replicas pending termination",
    ),
    (
        "replicaset cannot create pods",
        replica_set(
            {
                "replicas": 0,
                "readyReplicas": 0,
                "availableReplicas": 0,
                "conditions": [
                    condition("ReplicaFailure", "True", "FailedCreate", 'pods "web-" forbidden')
                ],
            }
        ),
        IN_PROGRESS,
        "forbidden",
    ),
    # -- Job -------------------------------------------------------------------------
    ("job just created", job({}), IN_PROGRESS, "0/1 completions, 0 active"),
    ("job running", job({"active": 1, "startTime": "2026-01-01T00:00:00Z"}), IN_PROGRESS, "1 act"),
    (
        "job complete",
        job(
            {
                "succeeded": 1,
                "conditions": [
                    condition("SuccessCriteriaMet", "True", "CompletionsReached"),
                    condition("Complete", "True", "CompletionsReached"),
                ],
            }
        ),
        CURRENT,
        "complete (1 succeeded)",
    ),
    (
        "job failed",
        job(
            {
                "failed": 3,
                "conditions": [
                    condition("FailureTarget", "True", "BackoffLimitExceeded"),
                    condition(
                        "Failed",
                        "True",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                ],
            }
        ),
        FAILED,
        "backoff limit",
    ),
    ("job suspended", job({}, suspend=True), IN_PROGRESS, "suspended"),
    # -- Pod -------------------------------------------------------------------------
    (
        "pod running and ready",
        pod({"phase": "Running", "conditions": [condition("Ready", "True")]}),
        CURRENT,
        "ready",
    ),
    (
        "pod running, not ready",
        pod(
            {
                "phase": "Running",
                "conditions": [condition("Ready", "False", "ContainersNotReady")],
            }
        ),
        IN_PROGRESS,
        "Running, not ready",
    ),
    (
        "pod unschedulable",
        pod(
            {
                "phase": "Pending",
                "conditions": [
                    condition(
                        "PodScheduled",
                        "False",
                        "Unschedulable",
                        "0/1 nodes are available: 1 node(s) didn't match node selector.",
                    )
                ],
            }
        ),
        IN_PROGRESS,
        "not scheduled: 0/1 nodes",
    ),
    ("pod succeeded", pod({"phase": "Succeeded"}), CURRENT, "succeeded"),
    ("pod failed", pod({"phase": "Failed", "reason": "Evicted"}), FAILED, "failed: Evicted"),
    (
        "pod crash-looping",
        pod(
            {
                "phase": "Running",
                "conditions": [condition("Ready", "False", "ContainersNotReady")],
                "containerStatuses": [
                    {
                        "name": "web",
                        "ready": False,
                        "restartCount": 5,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    }
                ],
            }
        ),
        FAILED,
        "container web is crash-looping",
    ),
    # -- PersistentVolumeClaim ---------------------------------------------------------
    (
        "pvc bound",
        obj("v1", "PersistentVolumeClaim", spec={}, status={"phase": "Bound"}),
        CURRENT,
        "bound",
    ),
    (
        "pvc pending",
        obj("v1", "PersistentVolumeClaim", spec={}, status={"phase": "Pending"}),
        IN_PROGRESS,
        "Pending, not bound",
    ),
    (
        "pvc lost",
        obj("v1", "PersistentVolumeClaim", spec={}, status={"phase": "Lost"}),
        FAILED,
        "lost",
    ),
    # -- Service -----------------------------------------------------------------------
    ("service cluster ip", service("ClusterIP"), CURRENT, "ClusterIP service"),
    ("service node port", service("NodePort"), CURRENT, "NodePort service"),
    (
        "load balancer without address",
        service("LoadBalancer", {"loadBalancer": {}}),
        IN_PROGRESS,
        "waiting for a load balancer address",
    ),
    (
        "load balancer with address",
        service("LoadBalancer", {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
        CURRENT,
        "203.0.113.7",
    ),
    # -- CustomResourceDefinition ------------------------------------------------------
    (
        "crd established",
        obj(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            spec={},
            status={
                "conditions": [
                    condition("NamesAccepted", "True", "NoConflicts"),
                    condition("Established", "True", "InitialNamesAccepted"),
                ]
            },
        ),
        CURRENT,
        "established",
    ),
    (
        "crd names conflict",
        obj(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            spec={},
            status={
                "conditions": [
                    condition("NamesAccepted", "False", "ListKindConflict", "is already in use"),
                    condition("Established", "False", "NotAccepted"),
                ]
            },
        ),
        FAILED,
        "already in use",
    ),
    # -- custom resources by conditions --------------------------------------------------
    ("custom ready", custom([condition("Ready", "True", "Succeeded")]), CURRENT, "ready"),
    (
        "custom not ready",
        custom([condition("Ready", "False", "Provisioning", "creating volume")]),
        IN_PROGRESS,
        "not ready: creating volume",
    ),
    (
        "custom not ready and stalled",
        custom(
            [
                condition("Ready", "False", "InstallFailed"),
                condition("Stalled", "True", "InstallFailed", "chart not found"),
            ]
        ),
        FAILED,
        "stalled: chart not found",
    ),
    (
        "custom reconciling",
        custom(
            [
                condition("Ready", "True", "Succeeded"),
                condition("Reconciling", "True", "Progressing", "upgrading to 1.2"),
            ]
        ),
        IN_PROGRESS,
        "reconciling: upgrading to 1.2",
    ),
    (
        "custom with stale ready",
        custom([condition("Ready", "True", "Succeeded")], observed=1, generation=2),
        IN_PROGRESS,
        "generation 2",
    ),
    (
        "custom without observedGeneration still judged by conditions",
        custom([condition("Ready", "True")], observed=None, generation=4),
        CURRENT,
        "ready",
    ),
    (
        "custom with unrelated conditions",
        custom([condition("Synced", "True")]),
        CURRENT,
        "present",
    ),
    # -- no status at all ------------------------------------------------------------------
    ("configmap", obj("v1", "ConfigMap"), CURRENT, "ConfigMap web"),
    ("secret", obj("v1", "Secret"), CURRENT, "Secret web"),
    ("serviceaccount", obj("v1", "ServiceAccount"), CURRENT, "ServiceAccount web"),
    ("role", obj("rbac.authorization.k8s.io/v1", "Role"), CURRENT, "Role web"),
    ("namespace", obj("v1", "Namespace", status={"phase": "Active"}), CURRENT, "Namespace web"),
]


@pytest.mark.parametrize(
    ("live", "expected", "words"),
    [pytest.param(live, expected, words, id=case) for case, live, expected, words in CASES],
)
def test_assess(live: Obj, expected: HealthStatus, words: str) -> None:
    health = assess(live)
    assert health.status is expected, health.message
    assert words in health.message


def test_message_names_kind_and_object() -> None:
    health = assess(deployment(deployment_status(ready=1, available=1)))
    assert health == Health(IN_PROGRESS, "Deployment web: 1/2 replicas available")


def test_assess_reads_but_never_changes_the_object() -> None:
    live = deployment(deployment_status())
    before = repr(live)
    assess(live)
    assert repr(live) == before


def test_health_is_frozen() -> None:
    health = Health(CURRENT, "ok")
    with pytest.raises(AttributeError):
        health.status = FAILED  # type: ignore[misc]


def test_status_values_are_the_kstatus_words() -> None:
    assert [s.value for s in HealthStatus] == ["Current", "InProgress", "Failed"]


AGGREGATE_CASES: list[tuple[str, list[tuple[str, Health]], HealthStatus, str]] = [
    ("nothing", [], CURRENT, "0/0 current"),
    (
        "all current",
        [("Deployment/web", Health(CURRENT, "a")), ("Service/web", Health(CURRENT, "b"))],
        CURRENT,
        "2/2 current",
    ),
    (
        "one in progress",
        [
            ("Deployment/web", Health(IN_PROGRESS, "1/2 replicas available")),
            ("Service/web", Health(CURRENT, "ClusterIP service")),
        ],
        IN_PROGRESS,
        "1/2 in progress: Deployment/web (1/2 replicas available)",
    ),
    (
        "failed beats in progress",
        [
            ("Deployment/web", Health(IN_PROGRESS, "1/2 replicas available")),
            ("Job/migrate", Health(FAILED, "backoff limit")),
            ("ConfigMap/env", Health(CURRENT, "present")),
        ],
        FAILED,
        "1/3 failed: Job/migrate (backoff limit); Deployment/web (1/2 replicas available)",
    ),
]


@pytest.mark.parametrize(
    ("healths", "expected", "message"),
    [pytest.param(h, e, m, id=case) for case, h, e, m in AGGREGATE_CASES],
)
def test_aggregate(healths: list[tuple[str, Health]], expected: HealthStatus, message: str) -> None:
    combined = aggregate(iter(healths))
    assert combined == Health(expected, message)


def test_aggregate_leaves_current_objects_out_of_the_message() -> None:
    combined = aggregate(
        [("ConfigMap/env", Health(CURRENT, "present")), ("Pod/x", Health(FAILED, "Evicted"))]
    )
    assert "ConfigMap/env" not in combined.message
    assert "Pod/x" in combined.message
