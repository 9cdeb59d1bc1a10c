"""The dashboard's HTML pages: server-rendered with Jinja, updated live over SSE.

No front-end build and nothing fetched from elsewhere: a few lines of JavaScript
(static/app.js) swap fragments the server renders. Forms post plainly, carry a CSRF
token, and need the session that logging in with the token gives.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from conveyor.reconcile.status import SOURCE_KIND, AppStatus
from conveyor.web import views
from conveyor.web.actions import ActionError
from conveyor.web.auth import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    Principal,
    Throttled,
    cross_site,
    remote,
)
from conveyor.web.dashboard import Dashboard
from conveyor.web.sse import StatusChange, stream

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATE_CLASS = {
    "Ready": "ready",
    "Reconciling": "reconciling",
    "Stalled": "stalled",
    "Suspended": "suspended",
    "WaitingForGate": "gate",
}
templates.env.filters["state_class"] = lambda state: STATE_CLASS.get(str(state), "unknown")
templates.env.filters["short"] = lambda sha: str(sha or "")[:12]
_LONG_HEX = re.compile(r"[0-9a-f]{12,}")


def brief(version: str) -> str:
    """A version (or a line naming one) as a narrow cell shows it, the whole being its
    title: Cellenics' `refs-heads-master-<40 hex>-<time>` as `master-<7 hex>-<time>`."""
    shown = re.sub(r"\brefs-(heads|tags)-", "", str(version or ""))
    return _LONG_HEX.sub(lambda found: found.group(0)[:7], shown)


templates.env.filters["brief"] = brief
templates.env.globals["quote"] = lambda text: quote(str(text), safe="")


def dashboard(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


DashboardDep = Annotated[Dashboard, Depends(dashboard)]


def _context(request: Request, board: Dashboard, **extra: Any) -> dict[str, Any]:
    session = request.cookies.get(SESSION_COOKIE)
    user = board.auth.session_name(session)
    return {
        "user": user,
        "csrf": board.auth.csrf_token(session) if user else "",
        "actions_enabled": board.auth.enabled,
        "notice": request.query_params.get("notice", "")[:300],
        **extra,
    }


def page(
    request: Request, board: Dashboard, template: str, *, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, _context(request, board, **extra), status_code=status_code
    )


def message_page(
    request: Request, board: Dashboard, title: str, message: str, *, status_code: int
) -> HTMLResponse:
    return page(
        request, board, "message.html", status_code=status_code, title=title, message=message
    )


def render_cell(environment: str, app: str, cell: views.Cell | None) -> str:
    return templates.get_template("_cell.html").render(environment=environment, app=app, cell=cell)


def render_pipeline_cells(row: views.Pipeline, app: str, **context: Any) -> dict[str, str]:
    """Every cell of an app's pipeline row: a change in one environment changes what
    waits in the next."""
    module = templates.get_template("_pipeline_cell.html").make_module(context)
    pipeline_cell = module.pipeline_cell  # type: ignore[attr-defined]  # the macro
    qapp = quote(app, safe="")
    return {
        f"pipe-{env.name}.{app}": str(
            pipeline_cell(env.name, app, row.cell(env.name, app), quote(env.name, safe=""), qapp)
        )
        for env in row.environments
    }


router = APIRouter(include_in_schema=False)


EnvironmentFilter = Annotated[list[str] | None, Query(alias="env")]


RENDERED_KEPT = 32  # pipelines rendered (per filter and session) kept until a change


async def pipeline_html(request: Request, board: Dashboard, env: list[str] | None) -> Markup:
    """The pipeline's table, rendered again only after a change: 720 cells cost tens of
    milliseconds to render, and open pages reload it on every status change."""
    board.refresh_head()  # also when nothing changed: git may have moved
    context = _context(request, board)
    key = (board.generation(), tuple(env or ()), context["user"], context["csrf"])
    html = board.rendered.get(key)
    if html is None:
        html = templates.get_template("_pipeline.html").render(
            pipeline=await board.pipeline(only=env), **context
        )
        board.rendered[key] = html
        while len(board.rendered) > RENDERED_KEPT:
            board.rendered.popitem(last=False)
    return Markup(html)  # noqa: S704 (rendered by Jinja with autoescape)


@router.get("/", response_class=HTMLResponse)
async def pipeline_page(
    request: Request, board: DashboardDep, env: EnvironmentFilter = None
) -> HTMLResponse:
    return page(request, board, "pipeline.html", table=await pipeline_html(request, board, env))


@router.get("/partials/pipeline", response_class=HTMLResponse)
async def pipeline_partial(
    request: Request, board: DashboardDep, env: EnvironmentFilter = None
) -> HTMLResponse:
    return HTMLResponse(await pipeline_html(request, board, env))


@router.get("/matrix", response_class=HTMLResponse)
async def matrix_page(
    request: Request, board: DashboardDep, env: EnvironmentFilter = None
) -> HTMLResponse:
    return page(request, board, "matrix.html", matrix=await board.matrix(only=env))


@router.get("/partials/matrix", response_class=HTMLResponse)
async def matrix_partial(
    request: Request, board: DashboardDep, env: EnvironmentFilter = None
) -> HTMLResponse:
    return page(request, board, "_matrix.html", matrix=await board.matrix(only=env))


@router.get("/gates", response_class=HTMLResponse)
async def gates_page(request: Request, board: DashboardDep) -> HTMLResponse:
    return page(request, board, "gates.html", gates=views.gates(await board.statuses()))


@router.get("/partials/gates", response_class=HTMLResponse)
async def gates_partial(request: Request, board: DashboardDep) -> HTMLResponse:
    return page(request, board, "_gates.html", gates=views.gates(await board.statuses()))


async def _app_context(board: Dashboard, status: AppStatus) -> dict[str, Any]:
    return {
        "status": status,
        "detail": await board.detail(status),
        "actions": board.actions.for_app(status),
    }


@router.get("/environments/{environment}/apps/{app}", response_class=HTMLResponse)
async def app_page(request: Request, environment: str, app: str, board: DashboardDep) -> Response:
    status = await board.status(environment, app)
    return page(
        request,
        board,
        "app.html",
        **await _app_context(board, status),
        history=await board.history(status),
        objects=await views.objects(board.kube_for(status), status),
        events=await views.events(board.kube_for(status), status),
    )


@router.get("/partials/status/{environment}/{app}", response_class=HTMLResponse)
async def status_partial(
    request: Request, environment: str, app: str, board: DashboardDep
) -> Response:
    status = await board.status(environment, app)
    return page(request, board, "_status.html", **await _app_context(board, status))


@router.get("/partials/live/{environment}/{app}", response_class=HTMLResponse)
async def live_partial(
    request: Request, environment: str, app: str, board: DashboardDep
) -> Response:
    status = await board.status(environment, app)
    return page(
        request,
        board,
        "_live.html",
        objects=await views.objects(board.kube_for(status), status),
        events=await views.events(board.kube_for(status), status),
    )


@router.get("/partials/journey/{environment}/{app}", response_class=HTMLResponse)
async def journey_partial(
    request: Request, environment: str, app: str, board: DashboardDep
) -> Response:
    status = await board.status(environment, app)
    return page(request, board, "_journey.html", journey=await board.journey(status.app))


@router.get("/environments/{environment}/apps/{app}/notes", response_class=HTMLResponse)
async def notes_page(
    request: Request, environment: str, app: str, board: DashboardDep, since: str
) -> Response:
    """Release notes of what `environment` runs since what `since` (another environment)
    runs."""
    status = await board.status(environment, app)
    await board.status(since, app)  # 404 naming the environments that have the app
    notes = await board.notes(status.app, base=since, head=environment)
    return page(request, board, "notes.html", notes=notes)


@router.get("/partials/diff/{environment}/{app}", response_class=HTMLResponse)
async def diff_partial(
    request: Request, environment: str, app: str, board: DashboardDep
) -> Response:
    status = await board.status(environment, app)
    try:
        diff = await board.diff(status)
    except ActionError as error:
        diff = views.Diff(title=environment, changes=[], error=str(error))
    return page(request, board, "_diff.html", diff=diff)


@router.get("/environments/{environment}", response_class=HTMLResponse)
async def environment_page(request: Request, environment: str, board: DashboardDep) -> Response:
    statuses = await board.environment(environment)
    cells = [
        views.cell(s, board.version(s))
        for s in sorted(statuses, key=lambda s: s.app)
        if s.kind != SOURCE_KIND
    ]
    return page(
        request,
        board,
        "environment.html",
        environment=environment,
        cells=cells,
        shards=await board.shards(environment),
        actions=board.actions.for_environment(),
    )


@router.get("/stream")
async def page_stream(request: Request, board: DashboardDep) -> StreamingResponse:
    """Each status change as the HTML of its matrix cell and of its app's pipeline row;
    a source change asks the page to redraw (its environment header)."""
    # The pipeline's cells carry forms: rendered for this page's session.
    context = _context(request, board)

    def render(change: StatusChange) -> dict[str, Any] | None:
        status = change.status
        scope, _, app = change.name.partition(".")
        if not board.fleet.shown(change):
            return None
        if change.cluster is not None:  # a cluster came back or went away: redraw
            return {"name": change.name, "html": {}, "refresh": True, "cluster": True}
        if not app:  # an environment's source (revision, fetch errors): redraw the matrix
            return {"name": change.name, "html": {}, "refresh": True}
        cell = board.cell(status, board.version(status)) if status is not None else None
        html = {f"cell-{scope}.{app}": render_cell(scope, app, cell)}
        html |= render_pipeline_cells(board.pipeline_row(app), app, **context)
        return {"name": change.name, "html": html}

    return StreamingResponse(
        stream(board.fleet, render),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- login and actions ----------------------------------------------------------------


def _local(next_url: str | None) -> str:
    """Only same-site paths, so a login link cannot send anyone elsewhere."""
    if next_url and next_url.startswith("/") and not next_url.startswith(("//", "/\\")):
        return next_url
    return "/"


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, board: DashboardDep, next: str = "/") -> HTMLResponse:
    return page(request, board, "login.html", next=_local(next))


@router.post("/login")
async def login(
    request: Request,
    board: DashboardDep,
    token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    why = cross_site(request)
    if why is not None:
        board.refused("/login", remote(request), why)
        return message_page(request, board, "Refused", why, status_code=403)
    try:
        session = board.auth.login(token.strip(), client=remote(request))
    except Throttled as error:
        board.refused("/login", remote(request), str(error))
        throttled = page(
            request, board, "login.html", status_code=429, next=_local(next), error=f"{error}."
        )
        throttled.headers["Retry-After"] = str(error.retry_after)
        return throttled
    if session is None:
        board.refused("/login", remote(request), "invalid token")
        return page(
            request, board, "login.html", status_code=403, next=_local(next), error="Invalid token."
        )
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(
    request: Request, board: DashboardDep, csrf: Annotated[str, Form()] = ""
) -> Response:
    session = request.cookies.get(SESSION_COOKIE)
    if cross_site(request) is None and board.auth.csrf_ok(session, csrf) and session:
        board.auth.logout(session)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _page_action(
    request: Request,
    board: Dashboard,
    *,
    action: str,
    environment: str,
    app: str | None,
    csrf: str,
    reason: str,
    params: dict[str, str] | None = None,
    back: str | None = None,
) -> Response:
    why = cross_site(request)
    if why is not None:
        board.refused(request.url.path, remote(request), why)
        return message_page(request, board, "Refused", why, status_code=403)
    if not board.auth.enabled:
        return message_page(
            request,
            board,
            "Actions disabled",
            "This dashboard is read-only: start `conveyor serve --token-file F` to act.",
            status_code=403,
        )
    session = request.cookies.get(SESSION_COOKIE)
    user = board.auth.session_name(session)
    if user is None:
        board.refused(request.url.path, remote(request), "not logged in")
        return message_page(
            request, board, "Log in first", "Actions need the token: log in.", status_code=401
        )
    if not board.auth.csrf_ok(session, csrf):
        board.refused(request.url.path, remote(request), "bad CSRF token")
        return message_page(
            request, board, "Refused", "The form's CSRF token is missing or stale.", status_code=403
        )
    principal = Principal(name=user, via="dashboard", remote=remote(request))
    try:
        result = await board.act(
            action,
            principal,
            environment=environment,
            app=app,
            reason=reason or None,
            params=params,
        )
    except ActionError as error:
        return message_page(request, board, "Not done", str(error), status_code=error.status_code)
    back = back or (
        f"/environments/{quote(environment)}/apps/{quote(app)}"
        if app
        else f"/environments/{quote(environment)}"
    )
    return RedirectResponse(f"{back}?notice={quote(result.message)}", status_code=303)


@router.post("/environments/{environment}/apps/{app}/actions/{action}")
async def app_action(
    request: Request,
    environment: str,
    app: str,
    action: str,
    board: DashboardDep,
    csrf: Annotated[str, Form()] = "",
    reason: Annotated[str, Form(max_length=500)] = "",
    source: Annotated[str, Form(alias="from", max_length=253)] = "",
    version: Annotated[str, Form(max_length=128)] = "",
) -> Response:
    """A button's action; the pipeline's promote and approve buttons name the
    environment to promote from and the version to approve (checked by the action)."""
    params = {k: v for k, v in (("from", source), ("version", version)) if v}
    return await _page_action(
        request,
        board,
        action=action,
        environment=environment,
        app=app,
        csrf=csrf,
        reason=reason,
        params=params,
    )


@router.post("/environments/{environment}/actions/{action}")
async def environment_action(
    request: Request,
    environment: str,
    action: str,
    board: DashboardDep,
    csrf: Annotated[str, Form()] = "",
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    return await _page_action(
        request, board, action=action, environment=environment, app=None, csrf=csrf, reason=reason
    )


@router.get("/sandboxes", response_class=HTMLResponse)
async def sandboxes_page(request: Request, board: DashboardDep) -> HTMLResponse:
    return page(
        request,
        board,
        "sandboxes.html",
        view=await board.sandboxes(),
        actions=board.actions.for_sandbox(),
    )


@router.post("/sandboxes/{environment}/{sandbox_id}/actions/{action}")
async def sandbox_action(
    request: Request,
    environment: str,
    sandbox_id: str,
    action: str,
    board: DashboardDep,
    csrf: Annotated[str, Form()] = "",
    ttl: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    if board.actions.get(action) not in board.actions.for_sandbox():
        return message_page(
            request, board, "Not done", f"{action!r} is not a sandbox action", status_code=404
        )
    params = {"id": sandbox_id, **({"ttl": ttl} if ttl else {})}
    return await _page_action(
        request,
        board,
        action=action,
        environment=environment,
        app=None,
        csrf=csrf,
        reason="",
        params=params,
        back="/sandboxes",
    )


def install(app: FastAPI) -> None:
    app.include_router(router)
