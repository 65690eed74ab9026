"""Catalog reads: listing, a task's versions and aliases, one version's details, the file."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from adapters_store import errors as store
from adapters_store.errors import AdapterNotFound
from adapters_store.names import NAME_PATTERN
from adapters_store.splits import heaviest
from adapters_store.usage import AGE_PATTERN, Sort, parse_age

from ...errors import documented
from ..deps import RuntimeDep
from ..schemas import AdapterDetail, AdapterPage, TaskVersions

router = APIRouter(prefix="/adapters", tags=["catalog"])

TaskPath = Annotated[str, Path(pattern=NAME_PATTERN)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
# Free-text filters: any printable text, but no control characters (PostgreSQL refuses NUL in
# text parameters, which would otherwise surface as a 500).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"


@router.get(
    "",
    summary="List adapters (filters combine; newest versions first within a task)",
    response_model=AdapterPage,
    responses=documented(RequestValidationError, store.InvalidRequest),
)
async def list_adapters(
    rt: RuntimeDep,
    task: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    base: Annotated[
        str | None,
        Query(max_length=256, pattern=TEXT_PATTERN, description="base model name or fingerprint"),
    ] = None,
    domain: Annotated[
        str | None,
        Query(max_length=256, pattern=TEXT_PATTERN, description="source or target domain"),
    ] = None,
    sort: Annotated[
        Sort,
        Query(
            description="task (name, newest version first) or most requests/images/errors, "
            "most recently served first"
        ),
    ] = "task",
    unused_since: Annotated[
        str | None,
        Query(
            pattern=AGE_PATTERN,
            description="only versions not served for this long or "
            "never, e.g. 30d (units s m h d w)",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> dict[str, Any]:
    age = parse_age(unused_since) if unused_since is not None else None
    page = await asyncio.to_thread(
        partial(
            rt.registry.list,
            task=task,
            base=base,
            domain=domain,
            sort=sort,
            unused_since=age,
            limit=limit,
            offset=offset,
        )
    )
    items = [r.summary() for r in page.items]
    return {"total": page.total, "limit": page.limit, "offset": page.offset, "items": items}


@router.get(
    "/{task}",
    summary="A task's versions and aliases",
    response_model=TaskVersions,
    responses=documented(RequestValidationError, AdapterNotFound),
)
async def get_task(rt: RuntimeDep, task: TaskPath) -> dict[str, Any]:
    versions = await asyncio.to_thread(rt.registry.versions, task)
    if not versions:
        raise AdapterNotFound(f"no adapter registered for task {task!r}")
    splits = await asyncio.to_thread(rt.registry.splits, task)
    return {
        "task": task,
        "aliases": {alias: heaviest(shares).version for alias, shares in splits.items()},
        "splits": {alias: [vars(sh) for sh in shares] for alias, shares in splits.items()},
        "versions": [r.summary() for r in versions],
    }


@router.get(
    "/{task}/versions/{version}",
    summary="All metadata of one version, with per-parameter change counts",
    response_model=AdapterDetail,
    responses=documented(RequestValidationError, AdapterNotFound),
)
async def get_version(rt: RuntimeDep, task: TaskPath, version: VersionPath) -> dict[str, Any]:
    record = await asyncio.to_thread(rt.registry.get, task, version)
    return record.to_dict()


@router.get(
    "/{task}/versions/{version}/file",
    summary="Download the adapter file (checksum-verified)",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},  # bytes: no schema (OpenAPI 3.1)
        **documented(RequestValidationError, AdapterNotFound, store.ChecksumMismatch),
    },
)
async def get_file(rt: RuntimeDep, task: TaskPath, version: VersionPath) -> Response:
    record = await asyncio.to_thread(rt.registry.get, task, version)
    data = await asyncio.to_thread(rt.registry.read_bytes, record)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{record.task}-v{record.version}.safetensors"',
            "ETag": f'"{record.digest}"',
        },
    )
