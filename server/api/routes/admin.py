"""Mutations, behind the admin bearer token (attached to the whole router). Each route parses
the request, makes one service call and shapes the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ...errors import InvalidRequest
from ..deps import NAME_PATTERN, AdminDep, ServiceDep
from ..uploads import read_files, upload_openapi

router = APIRouter(prefix="/admin/adapters", tags=["admin"], dependencies=[AdminDep])

TaskPath = Annotated[str, Path(pattern=NAME_PATTERN)]
AliasPath = Annotated[str, Path(pattern=NAME_PATTERN)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]

_UPLOAD = upload_openapi(
    {"file": {"type": "string", "format": "binary"}, "alias": {"type": "string"}}
)


def _one_file_only(_: int) -> InvalidRequest:
    return InvalidRequest("send exactly one adapter file in field 'file'")


class AliasBody(BaseModel):
    version: int = Field(ge=1, le=2**31 - 1)


@router.post(
    "", status_code=201, summary="Upload and register an adapter file", openapi_extra=_UPLOAD
)
async def upload(request: Request, service: ServiceDep) -> JSONResponse:
    """201 with task, version and digest; 200 when the same bytes were already registered."""

    async def read() -> tuple[bytes, str | None]:
        files, fields = await read_files(request, "file", max_files=1, too_many=_one_file_only)
        if len(files) != 1:
            raise _one_file_only(1)
        return files[0], fields.get("alias") or request.query_params.get("alias")

    result = await service.register(read)
    rec = result.record
    body = {"task": rec.task, "version": rec.version, "digest": rec.digest, "created": result.created,
            "aliases": rec.aliases, "nnz": rec.nnz, "density": rec.density, "size_bytes": rec.size_bytes}  # fmt: skip
    return JSONResponse(body, status_code=201 if result.created else 200)


@router.delete("/{task}/versions/{version}", summary="Delete one version (hard delete)")
async def delete_version(
    service: ServiceDep, task: TaskPath, version: VersionPath
) -> dict[str, Any]:
    rec = await service.delete(task, version)
    return {"deleted": {"task": rec.task, "version": rec.version, "digest": rec.digest}}


@router.put("/{task}/aliases/{alias}", summary="Point an alias at a version")
async def put_alias(
    service: ServiceDep, task: TaskPath, alias: AliasPath, body: AliasBody
) -> dict[str, Any]:
    await service.set_alias(task, alias, body.version)
    return {"task": task, "alias": alias, "version": body.version}


@router.delete("/{task}/aliases/{alias}", summary="Remove an alias")
async def delete_alias(service: ServiceDep, task: TaskPath, alias: AliasPath) -> dict[str, Any]:
    await service.remove_alias(task, alias)
    return {"task": task, "alias": alias, "removed": True}
