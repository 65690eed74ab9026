"""Predictions: a task's adapter, or the base's zero-shot text head. The routes parse the query,
hand the service a reader for the images, and shape the probabilities into top-k labels."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect

from adapters_store import errors as store
from adapters_store.names import NAME_PATTERN
from deltaclip_api import BaseInfo, Label, Prediction, ZeroShot

from ...errors import (
    EmptyImage,
    ImageTooLarge,
    InvalidImage,
    InvalidLabels,
    InvalidRequest,
    MissingFile,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Timeout,
    TooManyImages,
    UnsupportedMediaType,
    documented,
)
from ...service import Gone, ReadImages
from ..deps import ServiceDep
from ..uploads import read_files, upload_openapi

router = APIRouter(tags=["predict"])

_KEY = r"^[!-~]+$"
"""A client key: printable ASCII without spaces (what a header carries safely)."""
_KEY_OR_NONE = r"^[!-~]*$"

_IMAGE_BODY = upload_openapi(
    {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}, raw_images=True
)
# What reading and classifying a request's images can answer, adapter or zero-shot.
_IMAGE_ERRORS = (
    RequestValidationError,
    EmptyImage,
    MissingFile,
    ClientDisconnect,
    PayloadTooLarge,
    TooManyImages,
    ImageTooLarge,
    UnsupportedMediaType,
    InvalidImage,
    NotReady,
    Overloaded,
    Timeout,
)


def _image_reader(request: Request, max_images: int) -> ReadImages:
    async def read() -> list[bytes]:
        files, _ = await read_files(request, "file", max_images, sniff_images=True)
        return files

    return read


def _disconnect_watcher(request: Request) -> Gone:
    """Returns when the client hangs up. Called only after the body was read, so the only
    message left to receive is the disconnect; the service stops watching once it answers."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone


def _top_k(probs: torch.Tensor, labels: list[str], k: int) -> list[list[Label]]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [
            Label(label=labels[int(i)], score=round(float(v), 6))
            for v, i in zip(row_v, row_i, strict=True)
        ]
        for row_v, row_i in zip(values, indices, strict=True)
    ]


@router.post(
    "/predict",
    summary="Classify images with a task's adapter",
    openapi_extra=_IMAGE_BODY,
    response_model=Prediction,
    responses=documented(
        *_IMAGE_ERRORS,
        InvalidRequest,
        store.InvalidRequest,
        store.AdapterNotFound,
        store.InvalidAdapter,
        store.ChecksumMismatch,
    ),
)
async def predict(
    request: Request,
    response: Response,
    service: ServiceDep,
    task: Annotated[str, Query(pattern=NAME_PATTERN, description="task name")],
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    alias: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
    exact: Annotated[
        bool,
        Query(description="serve by the patched path only (bit-identical to the merged model)"),
    ] = False,
    client: Annotated[str | None, Query(min_length=1, max_length=256, pattern=_KEY)] = None,
    x_deltaclip_client: Annotated[
        str, Header(max_length=256, pattern=_KEY_OR_NONE, description="the client's key")
    ] = "",
) -> Prediction:
    """Answers with the adapter that was used (task, version, digest), the path that served
    it (``patched`` or ``mixed``, also in ``X-Deltaclip-Path``) and, per image, the top-k labels.
    A weighted alias serves each client key (``client``, else the ``X-Deltaclip-Client`` header)
    from one of its versions, always the same; without a key, one picked at random by weight."""
    read = _image_reader(request, service.settings.max_images)
    gone = _disconnect_watcher(request)
    key = client if client is not None else (x_deltaclip_client or None)
    result = await service.classify(task, version, alias, read, gone, exact=exact, key=key)
    record = result.record
    response.headers["X-Deltaclip-Path"] = result.path
    return Prediction(
        task=record.task,
        version=record.version,
        digest=record.digest,
        path=result.path,
        predictions=_top_k(result.probs, result.class_names, top_k),
    )


@router.post(
    "/predict/zero-shot",
    summary="Classify with the base's text head (no adapter)",
    openapi_extra=_IMAGE_BODY,
    response_model=ZeroShot,
    responses=documented(*_IMAGE_ERRORS, InvalidLabels, store.UnmappedLabel),
)
async def zero_shot(
    request: Request,
    service: ServiceDep,
    labels: Annotated[
        str, Query(min_length=1, max_length=10_000, description="comma-separated labels")
    ],
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> ZeroShot:
    """CLIP zero-shot over free-form labels with the base's text side (its frozen text tower; on
    the default ``deltaclip-efflite0``, WordNet over its ImageNet classifier). A label the default
    base cannot place is a 400 ``unmapped_label``."""
    names = [part.strip() for part in labels.split(",")]
    if (
        len(names) < 2
        or any(not n or len(n) > 200 or not n.isprintable() for n in names)
        or len(set(names)) != len(names)
    ):
        raise InvalidLabels("labels must be 2 or more distinct, printable, comma-separated names")
    if len(names) > 1000:
        raise InvalidLabels("at most 1000 labels")
    read = _image_reader(request, service.settings.max_images)
    probs = await service.zero_shot(names, read, _disconnect_watcher(request))
    s = service.settings
    base = BaseInfo(
        model=s.base_model, pretrained=s.base_pretrained, fingerprint=service.loaded_fingerprint
    )
    return ZeroShot(base=base, predictions=_top_k(probs, names, top_k))
