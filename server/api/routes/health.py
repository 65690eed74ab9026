from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process runs and its base has not failed to load")
def healthz(rt: RuntimeDep) -> JSONResponse:
    if rt.load_error:
        return JSONResponse({"status": "failed", "error": rt.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: 200 once the base model is loaded")
def readyz(rt: RuntimeDep) -> JSONResponse:
    if not rt.ready:
        reason = rt.load_error or "loading the base model"
        return JSONResponse(
            {"status": "not ready", "reason": reason}, status_code=503, headers={"Retry-After": "5"}
        )
    return JSONResponse({"status": "ready", "fingerprint": rt.loaded_fingerprint})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(rt: RuntimeDep) -> Response:
    if rt.batcher is not None:
        rt.metrics.queue_depth.set(rt.batcher.depth)
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/base", summary="The base model, and its fingerprint as loaded and as the weights are now"
)
async def base(rt: RuntimeDep) -> dict[str, Any]:
    engine, cache, _ = rt.require_ready()
    now = await rt.live_fingerprint()
    s = rt.settings
    return {
        "model": s.base_model,
        "pretrained": s.base_pretrained,
        "device": str(engine.device),
        "dtype": s.dtype,
        "fingerprint": rt.loaded_fingerprint,
        "serving_fingerprint": engine.serving_fingerprint,
        "live_fingerprint": now,
        "unchanged": now == engine.serving_fingerprint,
        "swaps": engine.swaps,
        "cached_adapters": len(cache),
        "cache_bytes": cache.bytes,
    }
