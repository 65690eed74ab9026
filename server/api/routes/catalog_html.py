"""The catalog as an HTML page for people (the JSON reads are in :mod:`.catalog_json`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse

from adapters_store.names import NAME_PATTERN
from adapters_store.usage import Sort

from ...catalog_page import render
from ...errors import documented
from ..deps import ServiceDep

router = APIRouter(tags=["catalog"])


@router.get(
    "/catalog",
    response_class=HTMLResponse,
    summary="The catalog as a page for people",
    responses=documented(RequestValidationError),
)
async def catalog_page(
    service: ServiceDep,
    task: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    sort: Sort = "task",
) -> HTMLResponse:
    view = await service.catalog(task, limit, offset, sort)
    body = render(
        view.page.items,
        total=view.page.total,
        limit=limit,
        offset=offset,
        task=task,
        sort=sort,
        base_label=view.base_label,
        shapes=view.shapes,
        base_fingerprint=view.base_fingerprint,
    )
    return HTMLResponse(body)
