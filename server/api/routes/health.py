"""Liveness, readiness, metrics and the base model's status."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from deltaclip_api import BaseStatus, Health, Readiness

from ...errors import AdminDisabled, NotReady, Timeout, Unauthorized, documented
from ..deps import AdminDep, ServiceDep

router = APIRouter()


@router.get(
    "/healthz",
    tags=["health"],
    summary="Liveness: the process runs and its base has not failed to load",
    response_model=Health,
    response_model_exclude_none=True,
    responses={
        **documented(),
        503: {"model": Health, "description": "The base model failed to load."},
    },
)
def healthz(service: ServiceDep) -> Health | JSONResponse:
    if service.load_error:
        body = Health(status="failed", error=service.load_error)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    return Health(status="ok")


@router.get(
    "/readyz",
    tags=["health"],
    summary="Readiness: 200 once the base model is loaded, 503 while the model worker restarts",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={
        **documented(),
        503: {
            "model": Readiness,
            "description": "Still loading, the load failed, or the model worker is restarting.",
        },
    },
)
def readyz(service: ServiceDep) -> Readiness | JSONResponse:
    if not service.ready:
        body = Readiness(status="not ready", reason=service.not_ready_reason)
        return JSONResponse(
            body.model_dump(exclude_none=True), status_code=503, headers={"Retry-After": "5"}
        )
    return Readiness(
        status="ready",
        fingerprint=service.loaded_fingerprint,
        adapters_loaded=service.adapters_loaded,
        preloaded=service.preloaded,
    )


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **documented()},
)
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/base",
    tags=["health"],
    summary="The base model, and the last check of its live weights (cached, with its age)",
    response_model=BaseStatus,
    responses=documented(NotReady),
)
async def base(service: ServiceDep) -> BaseStatus:
    # async: it only reads memory, so it runs on the event loop (no thread-pool hop per call).
    return BaseStatus(**asdict(service.base_status()))


@router.post(
    "/admin/base/check",
    summary="Check the live weights now (between batches) and answer the new proof",
    dependencies=[AdminDep],
    tags=["admin"],
    response_model=BaseStatus,
    responses=documented(Unauthorized, AdminDisabled, NotReady, Timeout),
)
async def check_base(service: ServiceDep) -> BaseStatus:
    return BaseStatus(**asdict(await service.check_base()))
