"""The JSON API under /api/v1: the same reads and actions as the pages, for scripts.

Reads are open; actions need `Authorization: Bearer <token>` and are refused when they
come from another site. Unknown environments, apps and actions answer 404 naming what
exists; a malformed body answers 422 (FastAPI's validation).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from conveyor.reconcile.status import SOURCE_KIND
from conveyor.web import views
from conveyor.web.actions import ActionError
from conveyor.web.auth import Principal, Throttled, cross_site, remote
from conveyor.web.dashboard import Dashboard
from conveyor.web.sse import StatusChange, stream


def dashboard(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


DashboardDep = Annotated[Dashboard, Depends(dashboard)]


def api_principal(request: Request, board: DashboardDep) -> Principal:
    """The caller of an action: a same-site request with a valid bearer token."""
    why = cross_site(request)
    if why is not None:
        board.refused(request.url.path, remote(request), why)
        raise HTTPException(403, why)
    if not board.auth.enabled:
        raise HTTPException(403, "actions are disabled: start `conveyor serve --token-file F`")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        board.refused(request.url.path, remote(request), "no token")
        raise HTTPException(
            401,
            "this action needs a token: `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        name = board.auth.verify(token.strip(), client=remote(request))
    except Throttled as error:
        board.refused(request.url.path, remote(request), str(error))
        raise HTTPException(
            429, str(error), headers={"Retry-After": str(error.retry_after)}
        ) from None
    if name is None:
        board.refused(request.url.path, remote(request), "invalid token")
        raise HTTPException(403, "invalid token")
    return Principal(name=name, via="api", remote=remote(request))


class ActionBody(BaseModel):
    """Optional details of an action; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500, description="Why, for the audit trail.")
    params: dict[str, str] = Field(default_factory=dict, description="Action-specific values.")


class ActionInfo(views.Model):
    name: str
    label: str
    scopes: list[str]
    description: str


class ActionOutcome(views.Model):
    action: str
    environment: str
    app: str | None
    actor: str
    message: str
    accepted: bool = Field(description="True when the action goes on in the background.")


router = APIRouter(prefix="/api/v1")


@router.get("/matrix", response_model=views.Matrix, tags=["status"])
async def get_matrix(
    board: DashboardDep,
    env: Annotated[list[str] | None, Query(description="Only these environments.")] = None,
) -> views.Matrix:
    """Environments by apps: version, state, revision, last apply and drift per cell."""
    return await board.matrix(only=env)


@router.get("/clusters", response_model=list[views.ClusterOut], tags=["status"])
async def list_clusters(board: DashboardDep) -> list[views.ClusterOut]:
    """Every cluster read (one per distinct kubeconfig context of the environments),
    whether it answers, and when its statuses were last read."""
    return (await board.matrix()).clusters


@router.get("/pipeline", response_model=views.Pipeline, tags=["status"])
async def get_pipeline(
    board: DashboardDep,
    env: Annotated[list[str] | None, Query(description="Only these environments.")] = None,
) -> views.Pipeline:
    """The matrix in promotion order, with what waits to reach each cell: a version the
    previous environment runs, a closed gate (and the version it holds), git ahead of
    the cluster; and the action that applies (promote from, approve, diff)."""
    return await board.pipeline(only=env)


@router.get("/environments", response_model=list[views.Environment], tags=["status"])
async def list_environments(board: DashboardDep) -> list[views.Environment]:
    return (await board.matrix()).environments


@router.get("/environments/{environment}/apps", response_model=list[views.Cell], tags=["status"])
async def list_apps(environment: str, board: DashboardDep) -> list[views.Cell]:
    statuses = await board.environment(environment)
    return [
        board.cell(s, board.version(s))
        for s in sorted(statuses, key=lambda s: s.app)
        if s.app and s.kind != SOURCE_KIND
    ]


@router.get(
    "/environments/{environment}/shards", response_model=list[views.ShardOut], tags=["status"]
)
async def list_shards(environment: str, board: DashboardDep) -> list[views.ShardOut]:
    """The live shards of an environment split over agent replicas (agent --shards): the
    apps each owns now, and the apps and seconds of its last pass. Empty when unsharded."""
    return await board.shards(environment)


@router.get(
    "/environments/{environment}/apps/{app}", response_model=views.AppDetail, tags=["status"]
)
async def get_app(environment: str, app: str, board: DashboardDep) -> views.AppDetail:
    return await board.detail(await board.status(environment, app))


@router.get(
    "/environments/{environment}/apps/{app}/history", response_model=views.History, tags=["app"]
)
async def get_history(environment: str, app: str, board: DashboardDep) -> views.History:
    """Commits that changed the app's file (and what made them), and its Helm revisions."""
    return await board.history(await board.status(environment, app))


@router.get(
    "/environments/{environment}/apps/{app}/journey", response_model=views.Journey, tags=["app"]
)
async def get_journey(environment: str, app: str, board: DashboardDep) -> views.Journey:
    """Where each version of the app went and when, per environment in promotion order."""
    return await board.journey((await board.status(environment, app)).app)


@router.get("/environments/{environment}/apps/{app}/diff", response_model=views.Diff, tags=["app"])
async def get_diff(environment: str, app: str, board: DashboardDep) -> views.Diff:
    """Git against the live cluster (server-side dry run); Secret values are masked."""
    status = await board.status(environment, app)
    try:
        return await board.diff(status)
    except ActionError as error:
        raise HTTPException(error.status_code, str(error)) from None


@router.get(
    "/environments/{environment}/apps/{app}/objects",
    response_model=list[views.ObjectOut],
    tags=["app"],
)
async def get_objects(environment: str, app: str, board: DashboardDep) -> list[views.ObjectOut]:
    status = await board.status(environment, app)
    return await views.objects(board.kube_for(status), status)


@router.get(
    "/environments/{environment}/apps/{app}/events",
    response_model=list[views.EventOut],
    tags=["app"],
)
async def get_events(environment: str, app: str, board: DashboardDep) -> list[views.EventOut]:
    status = await board.status(environment, app)
    return await views.events(board.kube_for(status), status)


@router.get("/gates", response_model=list[views.Gate], tags=["status"])
async def get_gates(board: DashboardDep) -> list[views.Gate]:
    """Apps waiting for a gate, and what they wait for."""
    return views.gates(await board.statuses())


@router.get("/actions", response_model=list[ActionInfo], tags=["actions"])
async def list_actions(board: DashboardDep) -> list[ActionInfo]:
    return [
        ActionInfo(name=a.name, label=a.label, scopes=list(a.scopes), description=a.description)
        for a in board.actions
    ]


async def _act(
    board: Dashboard,
    principal: Principal,
    response: Response,
    *,
    action: str,
    environment: str,
    app: str | None,
    body: ActionBody | None,
) -> ActionOutcome:
    body = body or ActionBody()
    try:
        result = await board.act(
            action,
            principal,
            environment=environment,
            app=app,
            reason=body.reason,
            params=body.params,
        )
    except ActionError as error:
        raise HTTPException(error.status_code, str(error)) from None
    response.status_code = 202 if result.accepted else 200
    return ActionOutcome(
        action=action,
        environment=environment,
        app=app,
        actor=principal.name,
        message=result.message,
        accepted=result.accepted,
    )


@router.post(
    "/environments/{environment}/actions/{action}",
    response_model=ActionOutcome,
    tags=["actions"],
    responses={202: {"model": ActionOutcome, "description": "Started in the background."}},
)
async def act_on_environment(
    environment: str,
    action: str,
    board: DashboardDep,
    principal: Annotated[Principal, Depends(api_principal)],
    response: Response,
    body: Annotated[ActionBody | None, Body()] = None,
) -> ActionOutcome:
    """Run an action on a whole environment (e.g. `reconcile`)."""
    return await _act(
        board, principal, response, action=action, environment=environment, app=None, body=body
    )


@router.post(
    "/environments/{environment}/apps/{app}/actions/{action}",
    response_model=ActionOutcome,
    tags=["actions"],
    responses={202: {"model": ActionOutcome, "description": "Started in the background."}},
)
async def act_on_app(
    environment: str,
    app: str,
    action: str,
    board: DashboardDep,
    principal: Annotated[Principal, Depends(api_principal)],
    response: Response,
    body: Annotated[ActionBody | None, Body()] = None,
) -> ActionOutcome:
    """Run an action on one app (`reconcile`, `suspend`, `resume`, ...)."""
    return await _act(
        board, principal, response, action=action, environment=environment, app=app, body=body
    )


@router.get("/stream", tags=["status"], response_class=StreamingResponse)
async def status_stream(board: DashboardDep) -> StreamingResponse:
    """Server-sent events: `status` with the changed cell (null when deleted), or with
    `cluster` when a cluster became unreachable or answers again."""

    def render(change: StatusChange) -> dict[str, object] | None:
        status = change.status
        if not board.fleet.shown(change):
            return None
        if change.cluster is not None:
            state = change.cluster
            cluster = views.ClusterOut(
                name=state.name,
                reachable=state.reachable,
                last_read=state.last_read,
                error=state.error,
            )
            return {"name": "", "cell": None, "cluster": cluster.model_dump(by_alias=True)}
        return {
            "name": change.name,
            "cell": board.cell(status, change.version).model_dump(by_alias=True)
            if status is not None and status.app
            else None,
        }

    return StreamingResponse(
        stream(board.fleet, render),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/healthz", tags=["status"], include_in_schema=False)
async def healthz(board: DashboardDep) -> dict[str, str]:
    return {"status": "ok" if board.fleet.ready else "syncing"}


def install(app: FastAPI) -> None:
    app.include_router(router)
