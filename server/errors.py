"""Every error leaves the server as JSON ``{"error": {"code", "message"}}``; this is the one
place where exceptions become HTTP statuses."""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters_store import errors as store

log = logging.getLogger("deltaclip.server")


class ApiError(Exception):
    """A client-facing error with its status, code and message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


_STORE_STATUS: list[tuple[type[store.StoreError], int]] = [
    (store.IncompatibleBase, 422),
    (store.AdapterTooLarge, 413),
    (store.InvalidAdapter, 422),
    (store.NotFound, 404),
    (store.AlreadyExists, 409),
    (store.InvalidName, 400),
    # Damaged stored bytes: refused for this adapter only, as a conflict with the stored state
    # (re-registering the file repairs it); never a 5xx.
    (store.ChecksumMismatch, 409),
]


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def _json(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _disk_full(exc: BaseException) -> bool:
    """True for "no space left" from the blob store (ENOSPC/EDQUOT) or from the catalog database
    (SQLite's SQLITE_FULL, PostgreSQL's SQLSTATE 53100 disk_full)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, OperationalError):
        orig = exc.orig
        return getattr(orig, "sqlstate", None) == "53100" or "database or disk is full" in str(orig)
    return False


def _internal(request: Request) -> JSONResponse:
    # %r: the path is the client's text, so control characters are escaped, never written raw.
    log.exception("unhandled error on %s %r", request.method, request.url.path)
    return _json(500, "internal", "internal server error")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(store.StoreError)
    async def _store(request: Request, exc: store.StoreError) -> JSONResponse:
        for cls, status in _STORE_STATUS:
            if isinstance(exc, cls):
                if status >= 500:
                    log.error("%s %r: %s", request.method, request.url.path, exc.code)
                return _json(
                    status, exc.code, str(exc), {"Retry-After": "5"} if status == 503 else None
                )
        return _json(400, exc.code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(
                str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")
            )
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _json(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(OSError)
    @app.exception_handler(OperationalError)
    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        # A full disk is the server's condition, not a bug and not the client's mistake: 507,
        # with a message that names no path (OSError's text carries the temporary file's).
        if not _disk_full(exc):
            return _internal(request)
        log.error("%s %r: storage is full", request.method, request.url.path)
        return _json(507, "insufficient_storage",
                     "the server has no storage space left; nothing was registered, retry later",
                     {"Retry-After": "60"})  # fmt: skip

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up before sending its whole body: nobody is left to answer, and it is
        # not a server error (no traceback in the log).
        log.info("%s %r: client disconnected mid-request", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request)
