"""`conveyor serve`: the dashboard and the JSON API in one FastAPI app on uvicorn."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.cluster.client import KubeClient
from conveyor.reconcile.target import kube_client
from conveyor.web import api, pages
from conveyor.web.dashboard import Dashboard, NotFound, ServeOptions

STATIC = Path(__file__).parent / "static"


class ServerTiming:
    """`Server-Timing: app;dur=<ms>` on every response: the time until its headers, which
    for a rendered page is the whole server time (benchmarks and browsers read it)."""

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
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)


def create_app(options: ServeOptions, *, kube: KubeClient | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = kube or kube_client(kubeconfig_path=options.kubeconfig, context=options.context)
        dashboard = Dashboard(options, kube=client)
        app.state.dashboard = dashboard
        dashboard.hub.start()
        try:
            yield
        finally:
            await dashboard.close()
            if kube is None:
                await client.aclose()

    app = FastAPI(
        title="conveyor",
        summary="GitOps continuous delivery: status, history, diffs and actions",
        version="v1",
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(error)}, status_code=404)
        board: Dashboard = request.app.state.dashboard
        return pages.message_page(request, board, "Not found", str(error), status_code=404)

    api.install(app)
    pages.install(app)
    app.add_middleware(ServerTiming)
    return app


def serve(options: ServeOptions) -> None:
    host, _, port = options.listen.rpartition(":")
    config = uvicorn.Config(
        create_app(options),
        host=host or "127.0.0.1",
        port=int(port),
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run()
