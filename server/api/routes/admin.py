"""Mutations, behind the admin bearer token (attached to the whole router)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from adapters_store.names import check_name

from ...errors import ApiError
from ..deps import NAME_PATTERN, AdminDep, RuntimeDep
from ..uploads import read_files

log = logging.getLogger("deltaclip.server")
router = APIRouter(prefix="/admin/adapters", tags=["admin"], dependencies=[AdminDep])

TaskPath = Annotated[str, Path(pattern=NAME_PATTERN)]
AliasPath = Annotated[str, Path(pattern=NAME_PATTERN)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]

_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "alias": {"type": "string"},
                    },
                }
            }
        },
    }
}


class AliasBody(BaseModel):
    version: int = Field(ge=1, le=2**31 - 1)


@router.post(
    "", status_code=201, summary="Upload and register an adapter file", openapi_extra=_UPLOAD
)
async def upload(request: Request, rt: RuntimeDep) -> JSONResponse:
    """201 with task, version and digest; 200 when the same bytes were already registered."""
    engine, _, _ = rt.require_ready()
    files, fields = await read_files(request, "file", max_files=1)
    if len(files) != 1:
        raise ApiError(400, "invalid_request", "send exactly one adapter file in field 'file'")
    alias = fields.get("alias") or request.query_params.get("alias")
    if alias is not None:
        check_name(alias, "alias")
    result = await asyncio.to_thread(rt.registry.register, files[0], engine.signature, alias)
    rec = result.record
    log.info(
        "registered %s v%d (%s) created=%s", rec.task, rec.version, rec.digest[:12], result.created
    )
    body = {"task": rec.task, "version": rec.version, "digest": rec.digest, "created": result.created,
            "aliases": rec.aliases, "nnz": rec.nnz, "density": rec.density, "size_bytes": rec.size_bytes}  # fmt: skip
    return JSONResponse(body, status_code=201 if result.created else 200)


@router.delete("/{task}/versions/{version}", summary="Delete one version (hard delete)")
async def delete_version(rt: RuntimeDep, task: TaskPath, version: VersionPath) -> dict[str, Any]:
    rec = await asyncio.to_thread(rt.registry.delete, task, version)
    if rt.cache is not None:
        rt.cache.evict(rec.digest)
    log.info("deleted %s v%d (%s)", rec.task, rec.version, rec.digest[:12])
    return {"deleted": {"task": rec.task, "version": rec.version, "digest": rec.digest}}


@router.put("/{task}/aliases/{alias}", summary="Point an alias at a version")
async def put_alias(
    rt: RuntimeDep, task: TaskPath, alias: AliasPath, body: AliasBody
) -> dict[str, Any]:
    await asyncio.to_thread(rt.registry.set_alias, task, alias, body.version)
    log.info("alias %s@%s -> v%d", task, alias, body.version)
    return {"task": task, "alias": alias, "version": body.version}


@router.delete("/{task}/aliases/{alias}", summary="Remove an alias")
async def delete_alias(rt: RuntimeDep, task: TaskPath, alias: AliasPath) -> dict[str, Any]:
    await asyncio.to_thread(rt.registry.remove_alias, task, alias)
    return {"task": task, "alias": alias, "removed": True}
