"""Every error leaves the server as JSON ``{"error": {"code", "message"}}``; this is the one
place where exceptions become HTTP statuses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(store.StoreError)
    async def _store(request: Request, exc: store.StoreError) -> JSONResponse:
        for cls, status in _STORE_STATUS:
            if isinstance(exc, cls):
                if status >= 500:
                    log.error("%s %s: %s", request.method, request.url.path, exc.code)
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, "internal", "internal server error")
