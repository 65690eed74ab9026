from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request

from ...errors import ApiError
from ...images import decode_image
from ..deps import NAME_PATTERN, RuntimeDep
from ..uploads import read_files

router = APIRouter(tags=["predict"])

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _images(
    request: Request, rt: Any, train_config: dict[str, Any] | None = None
) -> torch.Tensor:
    engine, _, _ = rt.require_ready()
    transform = engine.transform_for(train_config)
    files, _ = await read_files(request, "file", rt.settings.max_images)
    if len(files) > rt.settings.max_images:
        raise ApiError(
            413, "too_many_images", f"at most {rt.settings.max_images} images per request"
        )

    def decode() -> torch.Tensor:
        budget, tensors = rt.settings.max_request_pixels, []
        for data in files:
            limit = min(rt.settings.max_image_pixels, budget)
            try:
                image = decode_image(data, limit)
            except ApiError as exc:
                if exc.status == 413 and limit < rt.settings.max_image_pixels:
                    raise ApiError(413, "image_too_large", "the request's images together exceed "
                                   f"{rt.settings.max_request_pixels:,} pixels") from None  # fmt: skip
                raise
            budget -= image.width * image.height
            tensors.append(transform(image))
        return torch.stack(tensors)

    return await asyncio.to_thread(decode)


def _top_k(probs: torch.Tensor, labels: list[str], k: int) -> list[list[dict[str, Any]]]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [
            {"label": labels[int(i)], "score": round(float(v), 6)}
            for v, i in zip(row_v, row_i, strict=True)
        ]
        for row_v, row_i in zip(values, indices, strict=True)
    ]


@router.post("/predict", summary="Classify images with a task's adapter", openapi_extra=_IMAGE_BODY)
async def predict(
    request: Request,
    rt: RuntimeDep,
    task: Annotated[str, Query(pattern=NAME_PATTERN, description="task name")],
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    alias: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> dict[str, Any]:
    """Answers with the adapter that was used (task, version, digest) and, per image, the top-k labels."""
    start = time.perf_counter()
    if version is not None and alias is not None:
        raise ApiError(400, "invalid_request", "give version or alias, not both")
    rt.require_ready()
    record = await rt.resolve(task, version, alias)
    images = await _images(request, rt, record.train_config)
    prepared = await rt.prepared(record)
    probs = await rt.predict(prepared, images)
    rt.metrics.request_latency.labels(task=record.task).observe(time.perf_counter() - start)
    return {
        "task": record.task,
        "version": record.version,
        "digest": record.digest,
        "predictions": _top_k(probs, prepared.class_names, top_k),
    }


@router.post(
    "/predict/zero-shot",
    summary="Classify with the base's text head (no adapter)",
    openapi_extra=_IMAGE_BODY,
)
async def zero_shot(
    request: Request,
    rt: RuntimeDep,
    labels: Annotated[
        str, Query(min_length=1, max_length=10_000, description="comma-separated labels")
    ],
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> dict[str, Any]:
    """CLIP zero-shot over free-form labels with the frozen text tower. Meaningless for bases whose
    text tower is random (``deltaclip-efflite0``): their scores are chance-level."""
    names = [part.strip() for part in labels.split(",")]
    if (
        len(names) < 2
        or any(not n or len(n) > 200 or not n.isprintable() for n in names)
        or len(set(names)) != len(names)
    ):
        raise ApiError(
            400,
            "invalid_labels",
            "labels must be 2 or more distinct, printable, comma-separated names",
        )
    if len(names) > 1000:
        raise ApiError(400, "invalid_labels", "at most 1000 labels")
    images = await _images(request, rt)
    probs = await rt.zero_shot(names, images)
    s = rt.settings
    return {
        "base": {
            "model": s.base_model,
            "pretrained": s.base_pretrained,
            "fingerprint": rt.loaded_fingerprint,
        },
        "predictions": _top_k(probs, names, top_k),
    }
