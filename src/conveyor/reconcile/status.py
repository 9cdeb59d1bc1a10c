"""Per-app status kept in the cluster, as ConveyorApp objects in `conveyor-system`.

In the cluster so it survives restarts of the agent and is visible to `kubectl get
conveyorapps` as well as `conveyor get apps`. Each app records its outcome like a Flux
object: a Ready condition with reason, message and revision, plus the inventory of
what was applied (for pruning) and the fingerprint of the last apply (for no-op
resyncs). Status is written only when it changes: a no-op resync writes nothing.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from conveyor.causes import MESSAGE_LIMIT, capped, short_cause
from conveyor.cluster.apply import FIELD_MANAGER, apply_objects
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.objects import ObjectRef
from conveyor.cluster.ownership import (
    OWNER_LABEL,
    SOURCE_ANNOTATION,
    EnvironmentIdentity,
    normalise_repository_url,
    owner_of,
)
from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from conveyor.config.helmrelease import HelmReleaseSpec

NAMESPACE = "conveyor-system"
GROUP = "conveyor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ConveyorApp"

# An app's state in one word, as tables show it; the conditions say it the kstatus way.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
SUSPENDED = "Suspended"
WAITING_FOR_GATE = "WaitingForGate"
SOURCE_KIND = "source"  # the status of the git source itself, beside its apps
HISTORY_LENGTH = 10  # applied revisions an app's status remembers, newest first


class Reason(StrEnum):
    """Why an app is in its state; each reason belongs to one state (`Reason.state`)."""

    SUCCEEDED = "ReconciliationSucceeded"
    DRIFT_CORRECTED = "DriftCorrected"
    DRIFT_DETECTED = "DriftDetected"
    FETCHED = "Fetched"
    PROGRESSING = "Progressing"
    DEPENDENCY_NOT_READY = "DependencyNotReady"
    NOT_LEADER = "NotLeader"
    SUSPENDED = "Suspended"
    GATE_CLOSED = "GateClosed"
    RENDER_FAILED = "RenderFailed"
    DEPENDENCY_NOT_FOUND = "DependencyNotFound"
    API_ERROR = "ApiError"
    EMPTY_RENDER = "EmptyRender"
    OWNERSHIP_CONFLICT = "OwnershipConflict"
    FLUX_STILL_MANAGES = "FluxStillManages"
    APPLY_FAILED = "ApplyFailed"
    PRUNE_FAILED = "PruneFailed"
    DRIFT_CORRECTION_FAILED = "DriftCorrectionFailed"
    UPGRADE_FAILED = "UpgradeFailed"
    ROLLBACK_FAILED = "RollbackFailed"
    ROLLED_BACK = "RolledBack"
    HEALTH_CHECK_FAILED = "HealthCheckFailed"
    FETCH_FAILED = "FetchFailed"
    RECONCILE_FAILED = "ReconcileFailed"  # the source's: the last agent pass hit an error
    INTERNAL_ERROR = "InternalError"

    @property
    def state(self) -> str:
        return _STATE_OF.get(self, STALLED)


_STATE_OF = {
    Reason.SUCCEEDED: READY,
    Reason.DRIFT_CORRECTED: READY,
    Reason.DRIFT_DETECTED: READY,
    Reason.FETCHED: READY,
    Reason.PROGRESSING: RECONCILING,
    Reason.DEPENDENCY_NOT_READY: RECONCILING,
    Reason.NOT_LEADER: RECONCILING,
    Reason.SUSPENDED: SUSPENDED,
    Reason.GATE_CLOSED: WAITING_FOR_GATE,
}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_READY = '.status.conditions[?(@.type=="Ready")]'


def crd_manifest() -> dict[str, Any]:
    column = {"type": "string"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"conveyorapps.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": "conveyorapps",
                "singular": "conveyorapp",
                "kind": KIND,
                "shortNames": ["capp"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                    "additionalPrinterColumns": [
                        {**column, "name": "App", "jsonPath": ".spec.app"},
                        {**column, "name": "Ready", "jsonPath": _READY + ".status"},
                        {**column, "name": "Reason", "jsonPath": _READY + ".reason"},
                        {**column, "name": "Applied", "jsonPath": ".status.lastAppliedRevision"},
                        {**column, "name": "State", "jsonPath": ".status.state", "priority": 1},
                        {
                            **column,
                            "name": "Message",
                            "jsonPath": _READY + ".message",
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def resource_name(scope: str, app: str) -> str:
    """`<scope>.<app>`; the scope's own source status is named after the scope alone."""
    return f"{scope}.{app}"[:253] if app else scope[:253]


def release_key(spec: HelmReleaseSpec) -> str:
    """How a status names its app's Helm release (`AppStatus.release`): `namespace/name`."""
    return f"{spec.target_namespace}/{spec.release_name}"


def split_release(release: str) -> tuple[str, str]:
    """The namespace and the name of a release named by `release_key`."""
    namespace, name = release.split("/", 1)
    return namespace, name


@dataclass
class AppStatus:
    scope: str
    app: str
    kind: str = "manifests"
    state: str = RECONCILING
    reason: str = "Progressing"
    message: str = ""  # one line: the Ready condition's message, the cause of a failure
    details: str | None = None  # a failure's full text (capped), when it says more
    # The revision last worked on (applied, held or failed); lastAppliedRevision is the
    # one that runs. They differ while a newer revision is tried, held or given up on.
    attempted_revision: str = ""
    helm_revision: int | None = None
    last_applied_time: str | None = None
    last_applied_revision: str | None = None
    fingerprint: str | None = None
    failures: int = 0
    failed_fingerprint: str | None = None
    last_good_helm_revision: int | None = None
    drift: str | None = None
    release: str | None = None  # "namespace/name" of the Helm release, for helm apps
    inventory: list[ObjectRef] = field(default_factory=list)
    # Revisions whose new content was applied and became healthy, newest first (at most
    # HISTORY_LENGTH): what the environment ran, for gates to tell a rollback.
    history: list[dict[str, str]] = field(default_factory=list)
    suspended: bool = False
    transition_time: str = field(default_factory=now)
    # The owning environment (EnvironmentIdentity.id and .source); None on a status
    # written before identities, until an environment that renders the app claims it.
    owner: str | None = None
    source: str | None = None
    adopt_from: str | None = None  # `conveyor adopt --from`: whose objects to take over
    generation: int | None = None  # the ConveyorApp's metadata.generation as last read
    # A source status's own fields: which repository and branch were fetched.
    repository: str | None = None
    branch: str | None = None
    # And the apps that revision has (None: written before sources listed them): an
    # app status beside them that is not among them was left by an earlier pass.
    apps: list[str] | None = None
    # The shard (agent --shards) that wrote this status last; None when not sharded.
    shard: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    def set_message(self, message: str, *, details: str | None = None) -> None:
        """`message` as one line (its cause, when it is long or spans lines); the full
        text, `details` or the long message itself, capped in `details`."""
        cause = message
        if len(message) > MESSAGE_LIMIT or not message.isprintable():
            cause = short_cause(message)
            details = details or message
        self.message = cause
        self.details = capped(details.strip()) if details and details.strip() != cause else None

    @property
    def applied_revisions(self) -> list[str]:
        """The revisions this app ran: the one applied last first, then its history (a
        status written before histories has only the first)."""
        last = self.last_applied_revision
        revisions = [e["revision"] for e in self.history if e.get("revision") not in (None, last)]
        return [last, *revisions] if last else revisions

    def record_history(self, revision: str, at: str) -> None:
        """`revision` ran from `at` on: first in the history, which keeps its length."""
        kept = [e for e in self.history if e.get("revision") != revision]
        self.history = [{"revision": revision, "appliedTime": at}, *kept][:HISTORY_LENGTH]

    @property
    def name(self) -> str:
        return resource_name(self.scope, self.app)

    def conditions(self) -> list[dict[str, Any]]:
        """kstatus conditions: Ready always; Reconciling and Stalled while they are true
        (`kubectl wait --for=condition=Ready` works on them). Reconciling is true while a
        revision is being applied, and while one waits for a gate: the app runs the
        revision it ran before, and says a newer one is attempted
        (`lastAttemptedRevision`)."""
        ready = "True" if self.ready else ("Unknown" if self.state == RECONCILING else "False")
        types = [("Ready", ready)]
        if self.state in (RECONCILING, WAITING_FOR_GATE):
            types.append(("Reconciling", "True"))
        if self.state == STALLED:
            types.append(("Stalled", "True"))
        return [
            {
                "type": kind,
                "status": value,
                "reason": self.reason,
                "message": self.message,
                "observedGeneration": self.generation,
                "lastTransitionTime": self.transition_time,
            }
            for kind, value in types
        ]

    def status_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "details": self.details,
            "lastAttemptedRevision": self.attempted_revision,
            "observedGeneration": self.generation,
            "kind": self.kind,
            "helmRevision": self.helm_revision,
            "lastAppliedTime": self.last_applied_time,
            "lastAppliedRevision": self.last_applied_revision,
            "fingerprint": self.fingerprint,
            "failures": self.failures,
            "failedFingerprint": self.failed_fingerprint,
            "lastGoodHelmRevision": self.last_good_helm_revision,
            "drift": self.drift,
            "release": self.release,
            "inventory": [r.to_dict() for r in self.inventory],
            "history": self.history,
            "conditions": self.conditions(),
        }
        if self.kind == SOURCE_KIND:
            body["repository"], body["branch"] = self.repository, self.branch
            if self.apps is not None:
                body["apps"] = list(self.apps)
        if self.shard:
            body["shard"] = self.shard
        return body

    def to_summary(self) -> dict[str, Any]:
        """What `conveyor get apps -o json` shows."""
        return {
            "name": self.app,
            "scope": self.scope,
            "kind": self.kind,
            "ready": self.ready,
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "revision": self.last_applied_revision or "",
            "lastAttemptedRevision": self.attempted_revision,
            "helmRevision": self.helm_revision,
            "lastAppliedTime": self.last_applied_time,
            "drift": self.drift,
            "suspended": self.suspended,
            "source": self.source,
            "lastWrittenBy": self.shard,
        }

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> AppStatus:
        spec = obj.get("spec", {})
        raw = obj.get("status") or {}
        conditions = raw.get("conditions") or [{}]
        generation = (obj.get("metadata") or {}).get("generation")
        return cls(
            scope=str(spec.get("scope", "")),
            app=str(spec.get("app", "")),
            kind=raw.get("kind", "manifests"),
            state=raw.get("state", RECONCILING),
            reason=raw.get("reason", "Progressing"),
            message=raw.get("message", ""),
            details=raw.get("details"),
            # `revision` is what versions before conditions called the attempted one.
            attempted_revision=raw.get("lastAttemptedRevision") or raw.get("revision", ""),
            helm_revision=raw.get("helmRevision"),
            last_applied_time=raw.get("lastAppliedTime"),
            last_applied_revision=raw.get("lastAppliedRevision"),
            fingerprint=raw.get("fingerprint"),
            failures=int(raw.get("failures") or 0),
            failed_fingerprint=raw.get("failedFingerprint"),
            last_good_helm_revision=raw.get("lastGoodHelmRevision"),
            drift=raw.get("drift"),
            release=raw.get("release"),
            inventory=[ObjectRef.from_dict(r) for r in raw.get("inventory") or []],
            history=[
                {str(k): str(v) for k, v in entry.items()}
                for entry in raw.get("history") or []
                if isinstance(entry, dict)
            ],
            suspended=bool(spec.get("suspend", False)),
            transition_time=conditions[0].get("lastTransitionTime") or now(),
            owner=owner.id if (owner := owner_of(obj)) else None,
            source=owner.source if owner else None,
            adopt_from=spec.get("adoptFrom") or None,
            generation=generation if isinstance(generation, int) else None,
            repository=raw.get("repository"),
            apps=[str(a) for a in raw["apps"]] if isinstance(raw.get("apps"), list) else None,
            branch=raw.get("branch"),
            shard=raw.get("shard"),
        )


class StatusStore:
    """Reads and writes ConveyorApp objects; remembers what it last wrote."""

    def __init__(self, kube: KubeClient, *, writer: str | None = None) -> None:
        self.kube = kube
        # A shard's identity, recorded in each status it writes (`AppStatus.shard`); the
        # status is not written again for that alone, so a moved app costs no write.
        self.writer = writer
        self._written: dict[str, dict[str, Any]] = {}
        self._owners: dict[str, str | None] = {}  # the owner label as last read or written
        self._generations: dict[str, int | None] = {}

    async def install(self) -> None:
        """Create the CRD and namespace if needed (idempotent, no write when present).

        An agent confined to its namespaces (the chart's namespaced RBAC) may read
        neither: the chart installed both, and listing ConveyorApps proves the CRD."""
        crd = crd_manifest()
        try:
            live = await self.kube.get(
                "apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"]
            )
        except ApiError as error:
            if not error.forbidden:
                raise
            try:
                await self.kube.list(API_VERSION, KIND, namespace=NAMESPACE)
            except UnknownKindError:
                raise StatusError(
                    f"the {KIND} CRD is not installed and this agent may not install it: "
                    "install conveyor's chart (conveyor bootstrap)"
                ) from None
            return
        if live is None or live.get("spec", {}).get("versions") != crd["spec"]["versions"]:
            await apply_objects(self.kube, [crd])
        if await self.kube.get("v1", "Namespace", NAMESPACE) is None:
            await self.kube.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
                field_manager=FIELD_MANAGER,
            )

    async def list_all(
        self, *, scope: str | None = None, owner: str | None = None
    ) -> list[AppStatus]:
        """Every stored status (of one scope or owner, or of all), remembering what is
        stored."""
        # An owner's statuses are picked out by the apiserver, by their owner label (the
        # same test as `owner_of`): in a shared cluster the others' are not sent at all.
        selector = f"{OWNER_LABEL}={owner}" if owner else None
        try:
            items = await self.kube.list(
                API_VERSION, KIND, namespace=NAMESPACE, label_selector=selector
            )
        except UnknownKindError:
            return []  # no agent has run on this cluster yet
        except ApiError as error:
            if error.not_found:
                return []
            raise
        result = []
        for item in items:
            status = AppStatus.from_object(item)
            self._owners[status.name] = status.owner
            self._generations[status.name] = status.generation
            if (scope is None or status.scope == scope) and (
                owner is None or status.owner == owner
            ):
                result.append(status)
                self._written[status.name] = status.status_body()
        return result

    async def load_all(self, *, scope: str) -> dict[str, AppStatus]:
        """The statuses of one scope by app name."""
        return {s.app: s for s in await self.list_all(scope=scope)}

    async def load_environment(
        self, identity: EnvironmentIdentity, *, scope: str, with_legacy: bool = True
    ) -> tuple[dict[str, AppStatus], dict[str, AppStatus]]:
        """The environment's own statuses by app name, and, apart, the statuses of its
        scope written before identities existed: those are claimed only by rendering
        the app again, and never pruned for lacking the identity. `with_legacy=False`
        lists only the environment's own (the legacy ones come empty)."""
        own: dict[str, AppStatus] = {}
        legacy: dict[str, AppStatus] = {}
        owner = None if with_legacy else identity.id
        for status in await self.list_all(scope=scope, owner=owner):
            if status.owner == identity.id:
                own[status.app] = status
            elif status.owner is None:
                legacy[status.app] = status
        return own, legacy

    async def scope_for(self, identity: EnvironmentIdentity, *, scope: str) -> str:
        """The scope (the prefix of its ConveyorApps, Lease and labels) this environment
        uses in this cluster. An environment keeps the scope it used before; a new one
        takes its name as scope unless another environment already has it, and then its
        name with its id's first six digits: two repos' `staging` never share statuses."""
        statuses = await self.list_all()
        for status in statuses:
            if status.owner == identity.id and status.kind == SOURCE_KIND:
                return status.scope
        taken = {s.scope for s in statuses if s.owner is not None and s.owner != identity.id}
        return scope if scope not in taken else f"{scope}-{identity.id[:6]}"

    async def source_of(self, owner: str) -> str:
        """The readable source of the environment with id `owner`, from its statuses."""
        try:
            items = await self.kube.list(
                API_VERSION, KIND, namespace=NAMESPACE, label_selector=f"{OWNER_LABEL}={owner}"
            )
        except (ApiError, UnknownKindError):
            return ""
        sources = sorted({s.source for s in map(AppStatus.from_object, items) if s.source})
        return sources[0] if sources else ""

    async def environment_statuses(self, identity: EnvironmentIdentity) -> list[AppStatus]:
        """What an environment reported (its source status included): the statuses it
        owns, or, before it has run with identities, those of its name's scope."""
        statuses = await self.list_all()
        own = [s for s in statuses if s.owner == identity.id]
        return own or [s for s in statuses if s.owner is None and s.scope == identity.name]

    async def find_source(
        self, repository: str, *, name: str
    ) -> tuple[EnvironmentIdentity | None, str]:
        """The environment named `name` of `repository`, found by its source status when
        its branch is not known (the fetch failed): its identity and scope; else None and
        the name itself."""
        wanted = normalise_repository_url(repository)
        found = []
        for status in await self.list_all():
            identity = EnvironmentIdentity.parse(status.source or "")
            if status.kind == SOURCE_KIND and identity and identity.repository == wanted:
                if identity.name == name:
                    found.append((identity, status.scope))
        return found[0] if len(found) == 1 else (None, name)

    async def find_app(self, environment: str, app: str) -> AppStatus:
        """The status of `app` in the environment a person names: by its scope, or by
        its name when exactly one environment of that name has the app."""
        statuses = [s for s in await self.list_all() if s.app == app and s.kind != SOURCE_KIND]
        exact = [s for s in statuses if s.scope == environment]
        if exact:
            return exact[0]
        named = [s for s in statuses if _environment_name(s) == environment]
        if len(named) == 1:
            return named[0]
        if named:
            choices = ", ".join(sorted(f"{s.scope} ({s.source})" for s in named))
            raise StatusError(
                f"{len(named)} environments named {environment!r} have an app {app!r}: "
                f"{choices}; name one by its scope with --env"
            )
        raise StatusError(f"no app {app!r} in environment {environment!r} on this cluster")

    @staticmethod
    def stamp(status: AppStatus, identity: EnvironmentIdentity) -> None:
        """Make `status` the environment's (a new one, or a claimed legacy one)."""
        status.owner, status.source = identity.id, identity.source

    def stored(self, status: AppStatus) -> dict[str, Any]:
        """The status body as last read or written (empty if never)."""
        return self._written.get(status.name, {})

    async def save(self, status: AppStatus) -> bool:
        """Write the status if it differs from what is stored. Returns True if written."""
        if status.generation is None:
            # A status made afresh (a source's, each pass) observes what is stored; a
            # ConveyorApp that does not exist yet is created at generation 1.
            status.generation = self._generations.get(status.name) or 1
        previous = self._written.get(status.name)
        if self.writer is not None:
            status.shard = (previous or {}).get("shard")  # as stored, unless written below
            if previous is None or _without_time(previous) != _without_time(status.status_body()):
                status.shard = self.writer
        body = status.status_body()
        claimed = self._owners.get(status.name) != status.owner
        if previous is not None:
            if _without_time(previous) == _without_time(body) and not claimed:
                return False
            if previous.get("state") == body["state"]:
                # Same state: keep the original transition time, as conditions do.
                status.transition_time = previous["conditions"][0]["lastTransitionTime"]
                body["conditions"] = status.conditions()
        if previous is None or claimed:
            await self.kube.apply(_resource(status), field_manager=FIELD_MANAGER)
            self._owners[status.name] = status.owner
        if previous is not None and _without_time(previous) == _without_time(body):
            return True  # only claimed: the status itself is as stored
        await self.kube.apply(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": status.name, "namespace": NAMESPACE},
                "status": body,
            },
            field_manager=FIELD_MANAGER,
            force=True,
            subresource="status",
        )
        self._written[status.name] = copy.deepcopy(body)
        return True

    async def set_suspended(self, scope: str, app: str, suspended: bool) -> None:
        await self._set_spec(scope, app, {"suspend": suspended}, manager="conveyor-cli")

    async def set_adopt_from(self, scope: str, app: str, source: str) -> None:
        """Ask the environment's writer to take the app's objects over from `source`."""
        await self._set_spec(scope, app, {"adoptFrom": source}, manager="conveyor-adopt")

    async def _set_spec(
        self, scope: str, app: str, fields: dict[str, Any], *, manager: str
    ) -> None:
        """A person's request on an app. Each kind of request has its own field manager,
        so that neither the agent's writes nor another request undo it."""
        await self.kube.apply(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": resource_name(scope, app), "namespace": NAMESPACE},
                "spec": {"scope": scope, "app": app, **fields},
            },
            field_manager=manager,
            force=True,
        )

    async def delete(self, status: AppStatus) -> None:
        await self.kube.delete(API_VERSION, KIND, status.name, namespace=NAMESPACE)
        self._written.pop(status.name, None)


class StatusError(ConveyorError):
    """A person named an app or environment the cluster's statuses do not have."""


def _environment_name(status: AppStatus) -> str:
    identity = EnvironmentIdentity.parse(status.source or "")
    return identity.name if identity else status.scope


def _resource(status: AppStatus) -> dict[str, Any]:
    """A ConveyorApp's metadata and spec: which app of which environment it reports."""
    labels = {"conveyor.dev/scope": status.scope[:63]}
    annotations = {}
    spec: dict[str, Any] = {"scope": status.scope, "app": status.app}
    if status.owner:
        labels[OWNER_LABEL] = status.owner
        annotations[SOURCE_ANNOTATION] = status.source or ""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": status.name,
            "namespace": NAMESPACE,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


def _without_time(body: dict[str, Any]) -> dict[str, Any]:
    """`body` to compare with another, its conditions' transition times left out. Built
    anew, never deep-copied: a no-op pass compares every app's status, twice."""
    conditions = body.get("conditions")
    if not isinstance(conditions, list):
        return body
    return {
        **body,
        "conditions": [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} if isinstance(c, dict) else c
            for c in conditions
        ],
    }
