"""Liveness, readiness, metrics and the base model's status."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process runs and its base has not failed to load")
def healthz(service: ServiceDep) -> JSONResponse:
    if service.load_error:
        return JSONResponse({"status": "failed", "error": service.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: 200 once the base model is loaded")
def readyz(service: ServiceDep) -> JSONResponse:
    if not service.ready:
        reason = service.load_error or "loading the base model"
        return JSONResponse(
            {"status": "not ready", "reason": reason}, status_code=503, headers={"Retry-After": "5"}
        )
    return JSONResponse({"status": "ready", "fingerprint": service.loaded_fingerprint})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/base", summary="The base model, and its fingerprint as loaded and as the weights are now"
)
async def base(service: ServiceDep) -> dict[str, Any]:
    return asdict(await service.base_status())
