"""Liveness, readiness, metrics and the base model's status."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import AdminDep, ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process runs and its base has not failed to load")
def healthz(service: ServiceDep) -> JSONResponse:
    if service.load_error:
        return JSONResponse({"status": "failed", "error": service.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: 200 once the base model is loaded, 503 while the model worker restarts",
)
def readyz(service: ServiceDep) -> JSONResponse:
    if not service.ready:
        return JSONResponse(
            {"status": "not ready", "reason": service.not_ready_reason},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "fingerprint": service.loaded_fingerprint})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/base",
    summary="The base model, and the last check of its live weights (cached, with its age)",
)
async def base(service: ServiceDep) -> dict[str, Any]:
    # async: it only reads memory, so it runs on the event loop (no thread-pool hop per call).
    return asdict(service.base_status())


@router.post(
    "/admin/base/check",
    summary="Check the live weights now (between batches) and answer the new proof",
    dependencies=[AdminDep],
    tags=["admin"],
)
async def check_base(service: ServiceDep) -> dict[str, Any]:
    return asdict(await service.check_base())
