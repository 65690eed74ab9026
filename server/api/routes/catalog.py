from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from ...catalog_page import render
from ..deps import NAME_PATTERN, RuntimeDep

router = APIRouter(tags=["catalog"])


@router.get("/catalog", response_class=HTMLResponse, summary="The catalog as a page for people")
async def catalog_page(
    rt: RuntimeDep,
    task: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> HTMLResponse:
    page = await asyncio.to_thread(rt.registry.list, task=task, limit=limit, offset=offset)
    sig = rt.engine.signature if rt.engine is not None else None
    s = rt.settings
    body = render(
        page.items, total=page.total, limit=limit, offset=offset, task=task,
        base_label=f"{s.base_model}/{s.base_pretrained}", shapes=sig.param_shapes if sig else None,
        base_fingerprint=sig.fingerprint if sig else None,
    )  # fmt: skip
    return HTMLResponse(body)
