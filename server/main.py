"""The FastAPI app factory. The lifespan opens the catalog (refusing one not at the head
migration) and loads the base model in the background; ``/readyz`` turns 200 once it is loaded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from . import errors
from .api.routes import admin, catalog_html, catalog_json, health, predict
from .config import ServerSettings
from .metrics import Metrics, ResponseMetricsMiddleware
from .middleware.body import BodyLimitMiddleware, ReplicaHeaderMiddleware
from .middleware.connection import (
    HeadAsGetMiddleware,
    HeadLimitMiddleware,
    UnexpectedErrorMiddleware,
)
from .runtime import Runtime
from .service import Service

log = logging.getLogger("deltaclip.server")


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The app: routes, one error table (:mod:`server.errors`), body limits per path, and a
    lifespan that owns the :class:`Runtime` its :class:`Service` works on."""
    settings = settings or ServerSettings()
    metrics = Metrics(settings.metrics_tasks)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, metrics)
        app.state.runtime = runtime
        app.state.service = Service(runtime)
        loading = asyncio.create_task(runtime.load())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            runtime.close()

    # /docs and /redoc with their scripts and styles served from the package (fastapi-offline),
    # not from a CDN: the page works on a machine without internet access.
    app = FastAPIOffline(
        title="deltaclip",
        version="1",
        summary="Many domain-adapted CLIP image towers served from one base model.",
        lifespan=lifespan,
        # operationId = the route function's name (predict, upload, ...): what a client
        # generated from /openapi.json calls its functions.
        generate_unique_id_function=lambda route: route.name,
    )
    errors.install(app)

    for module in (predict, catalog_json, admin, catalog_html, health):
        app.include_router(module.router)

    def limit_for(path: str) -> int:
        return (
            settings.max_upload_bytes if path.startswith("/admin/") else settings.max_request_bytes
        )

    # Innermost first: an unexpected error is rendered below the body limit and the replica
    # header; HEAD and the head limit are decided before anything else runs; every answer,
    # theirs included, is counted.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(ReplicaHeaderMiddleware, name=settings.replica_name)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(HeadLimitMiddleware, limit=settings.max_head_bytes)
    app.add_middleware(ResponseMetricsMiddleware, metrics=metrics)
    return app
