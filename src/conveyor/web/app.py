"""`conveyor serve`: the dashboard and the JSON API in one FastAPI app on uvicorn."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import swagger_ui_bundle
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.cluster.client import KubeClient
from conveyor.source.webhook import listener_config
from conveyor.web import api, pages
from conveyor.web.dashboard import Dashboard, NotFound, ServeOptions

STATIC = Path(__file__).parent / "static"
SWAGGER_UI = Path(swagger_ui_bundle.swagger_ui_path)

# Everything the pages load comes from this server, and no other site may frame them
# (clickjacking an action button). Swagger UI styles its elements inline, so /api/docs
# alone allows inline styles; no page allows inline scripts.
_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'{inline}; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
CONTENT_SECURITY_POLICY = _POLICY.format(inline="")
DOCS_CONTENT_SECURITY_POLICY = _POLICY.format(inline=" 'unsafe-inline'")


class ResponseHeaders:
    """Headers on every response: `Server-Timing: app;dur=<ms>`, the time until its
    headers, which for a rendered page is the whole server time (benchmarks and
    browsers read it); and the security headers, unless the route set its own policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                spent = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={spent:.1f}".encode()))
                if not any(name == b"content-security-policy" for name, _ in headers):
                    headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
                headers += [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff")]
                headers.append((b"referrer-policy", b"same-origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)


def create_app(options: ServeOptions, *, kube: KubeClient | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dashboard = Dashboard(options, kube=kube)
        app.state.dashboard = dashboard
        await dashboard.start()
        try:
            yield
        finally:
            await dashboard.close()

    app = FastAPI(
        title="conveyor",
        summary="GitOps continuous delivery: status, history, diffs and actions",
        version="v1",
        lifespan=lifespan,
        docs_url=None,  # served below from local files, not from a CDN
        redoc_url=None,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/api/docs/assets", StaticFiles(directory=SWAGGER_UI), name="swagger-ui")

    @app.get("/api/docs", include_in_schema=False)
    async def api_docs(request: Request) -> HTMLResponse:
        response = pages.templates.TemplateResponse(request, "api_docs.html", {})
        response.headers["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        return response

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(error)}, status_code=404)
        board: Dashboard = request.app.state.dashboard
        return pages.message_page(request, board, "Not found", str(error), status_code=404)

    @app.exception_handler(httpx.TransportError)
    async def cluster_down(request: Request, error: Exception) -> Response:
        # A read of one app's live objects, events or Helm history from a cluster that
        # stopped answering: say so, as the matrix does, instead of a 500.
        message = f"its cluster does not answer ({error or type(error).__name__}); try again"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=503)
        board: Dashboard = request.app.state.dashboard
        return pages.message_page(request, board, "Cluster unreachable", message, status_code=503)

    api.install(app)
    pages.install(app)
    app.add_middleware(ResponseHeaders)
    return app


def serve(options: ServeOptions) -> None:
    # The default limits: no cap on connections, as each open page holds an event stream.
    config = listener_config(
        create_app(options),
        options.listen,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run()
