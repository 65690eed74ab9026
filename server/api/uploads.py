"""Reading files out of a request: multipart fields or a raw body, with counts bounded (the
HTTP side of an upload; what the bytes must be is :mod:`server.images`' and the store's job)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import InvalidRequest, MissingFile, ServerError, TooManyImages, UnsupportedMediaType
from ..images import image_format

RAW_TYPES = ("image/", "application/octet-stream")
MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024
# Starlette's parser stops at the first file over its limit with this text (its only signal).
_TOO_MANY_FILES = "Too many files."


def too_many_images(limit: int) -> ServerError:
    """413 ``too_many_images``: the wording :mod:`server.images` uses for the same limit."""
    return TooManyImages(f"at most {limit} images per request")


async def read_files(
    request: Request,
    field: str,
    max_files: int,
    *,
    sniff_images: bool = False,
    too_many: Callable[[int], ServerError] = too_many_images,
) -> tuple[list[bytes], dict[str, str]]:
    """The bytes of every multipart part named ``field`` (or the raw body), plus text fields.

    With ``sniff_images``, a raw body of any other content type (or none) is taken when its
    bytes are an image (:func:`~server.images.image_format`), since clients such as ``curl
    --data-binary`` mislabel it; any other body is still 415.

    Raises:
        ServerError: ``too_many(max_files)`` for a form with more files than ``max_files``
            (counted as they stream in); :class:`InvalidRequest` for any other broken form.
    """
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(
                max_files=max_files, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
            )
        except HTTPException as exc:  # Starlette's 400 for what its multipart parser refuses
            if str(exc.detail).startswith(_TOO_MANY_FILES):
                raise too_many(max_files) from None
            raise InvalidRequest(f"malformed multipart form: {exc.detail}") from None
        files: list[bytes] = []
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == field:
                    files.append(await value.read())
                await value.close()
            else:
                fields[name] = value
        if not files:
            raise MissingFile(f"no multipart field named {field!r} with a file")
        return files, fields
    if content_type.startswith(RAW_TYPES):
        return [await request.body()], {}
    if sniff_images:
        body = await request.body()
        if image_format(body) is not None:
            return [body], {}
    shown = content_type.split(";")[0] or "none"
    raise UnsupportedMediaType(
        f"send multipart/form-data with field {field!r}, or a raw image body "
        f"(content type was {shown!r})"
    )


def upload_openapi(properties: dict[str, Any], *, raw_images: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of an upload route (FastAPI cannot infer it: the routes read the
    body themselves, to bound it while it streams in): a multipart form with a required
    ``file`` field, and optionally a raw image body."""
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": properties}
        }
    }
    if raw_images:
        # One raw image: declared as application/octet-stream (which clients and generators
        # know); the route also takes image/* and a sniffed image under any type (docs/API.md).
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}
