"""Mutations, behind the admin bearer token (attached to the whole router). Each route parses
the request, makes one service call and shapes the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.exc import OperationalError
from starlette.requests import ClientDisconnect

from adapters_store import errors as store
from adapters_store.names import NAME_PATTERN
from adapters_store.splits import MAX_SPLIT_VERSIONS, PLAIN_WEIGHT, heaviest
from deltaclip_api import AdapterRef, AliasRemoved, AliasSet, AliasShare, Deleted, Registration

from ...errors import (
    AdminDisabled,
    InvalidRequest,
    MissingFile,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    documented,
)
from ..deps import AdminDep, ServiceDep
from ..uploads import read_files, upload_openapi

router = APIRouter(prefix="/admin/adapters", tags=["admin"], dependencies=[AdminDep])
# Every admin route checks the token first; the mutations may find the disk full.
_ADMIN = (RequestValidationError, Unauthorized, AdminDisabled, OperationalError)

TaskPath = Annotated[str, Path(pattern=NAME_PATTERN)]
AliasPath = Annotated[str, Path(pattern=NAME_PATTERN)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]

_UPLOAD = upload_openapi(
    {"file": {"type": "string", "format": "binary"}, "alias": {"type": "string"}}
)


def _one_file_only(_: int) -> InvalidRequest:
    return InvalidRequest("send exactly one adapter file in field 'file'")


class AliasBody(BaseModel):
    """Either ``version`` (a plain alias) or ``split`` (a weighted alias), not both."""

    version: int | None = Field(None, ge=1, le=2**31 - 1)
    split: list[AliasShare] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SPLIT_VERSIONS,
        description="Versions and weights, e.g. v3 weight 90 and v4 weight 10; each client "
        "key (X-Deltaclip-Client or ?client=) sticks to one version.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> AliasBody:
        if (self.version is None) == (self.split is None):
            raise ValueError("give either version or split")
        if self.split is not None and len({s.version for s in self.split}) != len(self.split):
            raise ValueError("a version is named twice in split")
        return self

    def weights(self) -> dict[int, int]:
        if self.split is None:
            assert self.version is not None
            return {self.version: PLAIN_WEIGHT}
        return {share.version: share.weight for share in self.split}


@router.post(
    "",
    status_code=201,
    summary="Upload and register an adapter file",
    openapi_extra=_UPLOAD,
    response_model=Registration,
    responses={
        200: {"model": Registration, "description": "The same bytes were already registered."},
        **documented(
            *_ADMIN,
            InvalidRequest,
            MissingFile,
            ClientDisconnect,
            PayloadTooLarge,
            UnsupportedMediaType,
            NotReady,
            store.InvalidName,
            store.AdapterTooLarge,
            store.InvalidAdapter,
            store.IncompatibleBase,
            store.AlreadyExists,
            OSError,
        ),
    },
)
async def upload(request: Request, response: Response, service: ServiceDep) -> Registration:
    """201 with task, version and digest; 200 when the same bytes were already registered."""

    async def read() -> tuple[bytes, str | None]:
        files, fields = await read_files(request, "file", max_files=1, too_many=_one_file_only)
        if len(files) != 1:
            raise _one_file_only(1)
        return files[0], fields.get("alias") or request.query_params.get("alias")

    result = await service.register(read)
    rec = result.record
    response.status_code = 201 if result.created else 200
    return Registration(
        task=rec.task,
        version=rec.version,
        digest=rec.digest,
        created=result.created,
        aliases=rec.aliases,
        nnz=rec.nnz,
        density=rec.density,
        size_bytes=rec.size_bytes,
    )


@router.delete(
    "/{task}/versions/{version}",
    summary="Delete one version (hard delete)",
    response_model=Deleted,
    responses=documented(*_ADMIN, store.AdapterNotFound),
)
async def delete_version(service: ServiceDep, task: TaskPath, version: VersionPath) -> Deleted:
    rec = await service.delete(task, version)
    return Deleted(deleted=AdapterRef(task=rec.task, version=rec.version, digest=rec.digest))


@router.put(
    "/{task}/aliases/{alias}",
    summary="Point an alias at a version, or split it over several by weight",
    response_model=AliasSet,
    responses=documented(*_ADMIN, store.AdapterNotFound, store.InvalidName, store.InvalidRequest),
)
async def put_alias(
    service: ServiceDep, task: TaskPath, alias: AliasPath, body: AliasBody
) -> AliasSet:
    shares = await service.set_alias(task, alias, body.weights())
    split = [AliasShare(version=sh.version, weight=sh.weight) for sh in shares]
    return AliasSet(task=task, alias=alias, version=heaviest(shares).version, split=split)


@router.delete(
    "/{task}/aliases/{alias}",
    summary="Remove an alias",
    response_model=AliasRemoved,
    responses=documented(*_ADMIN, store.AdapterNotFound),
)
async def delete_alias(service: ServiceDep, task: TaskPath, alias: AliasPath) -> AliasRemoved:
    await service.remove_alias(task, alias)
    return AliasRemoved(task=task, alias=alias, removed=True)
