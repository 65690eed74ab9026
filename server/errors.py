"""Every error leaves the server as JSON ``{"error": {"code", "message"}}``.

The server raises errors by meaning (:class:`NotReady`, :class:`ImageTooLarge`, ...), never with an
HTTP status in hand: :data:`RULES` is the one table from an exception type (the server's own, the
store's, the framework's, a full disk) to its status and code, and :func:`error_response` is the
one function that renders them, for the exception handlers and the body-limit middleware alike.
:func:`documented` turns the same table into each route's OpenAPI error responses, and
docs/API.md's table of statuses and codes is checked against it (tests/unit/test_error_table.py).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters_store import errors as store
from deltaclip_api import ErrorBody

log = logging.getLogger("deltaclip.server")


class ServerError(Exception):
    """Base of the errors the server raises; :data:`RULES` gives each type its status and code.

    Attributes:
        message: the client-facing text (names no server path).
        headers: response headers that depend on this occurrence (e.g. ``Retry-After``).
    """

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers) if headers else None

    @property
    def status(self) -> int:
        """The HTTP status :data:`RULES` maps this error to."""
        return answer_for(self)[0]

    @property
    def code(self) -> str:
        """The machine-readable code :data:`RULES` maps this error to."""
        return answer_for(self)[1]


class InvalidRequest(ServerError):
    """The request is malformed in a way no route parameter declared (400)."""


class EmptyImage(InvalidRequest):
    """An uploaded image has no bytes at all."""


class MissingFile(InvalidRequest):
    """A multipart request has no file in the expected field."""


class InvalidLabels(InvalidRequest):
    """Zero-shot labels are too few, repeated, too long or not printable."""


class MalformedHttp(InvalidRequest):
    """The bytes are not a valid HTTP/1.1 request (answered by the connection protocol)."""


class RequestTimedOut(ServerError):
    """The client sent part of a request head or body and then nothing for ``read_timeout_s``."""


class HeadersTooLarge(ServerError):
    """The request line and headers together exceed ``max_head_bytes``."""


class Unauthorized(ServerError):
    """The admin bearer token is missing or wrong."""


class AdminDisabled(ServerError):
    """The admin API is off because the server has no admin token configured."""


class PayloadTooLarge(ServerError):
    """The request body exceeds the path's byte limit (checked while it streams in)."""


class TooManyImages(PayloadTooLarge):
    """More images in one request than ``max_images``."""


class ImageTooLarge(PayloadTooLarge):
    """An image, or a request's images together, exceed the pixel budget."""


class UnsupportedMediaType(ServerError):
    """The body is neither multipart nor a raw image, or the image format is not allowed."""


class InvalidImage(ServerError):
    """An image in an allowed format could not be decoded, or has no pixels."""


class NotReady(ServerError):
    """The base model is still loading, or failed to load."""


class Overloaded(ServerError):
    """The batcher's queue is full; the client should retry shortly."""


class Timeout(ServerError):
    """No answer within ``request_timeout_s``."""


def _validation_message(exc: BaseException) -> str:
    """The first few validation failures as ``field: reason`` (no input values echoed)."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _http_detail(exc: BaseException) -> str:
    assert isinstance(exc, StarletteHTTPException)
    return str(exc.detail)


def _http_status(status: int) -> Callable[[BaseException], bool]:
    return lambda exc: isinstance(exc, StarletteHTTPException) and exc.status_code == status


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def disk_full(exc: BaseException) -> bool:
    """True for "no space left" from the blob store (ENOSPC/EDQUOT) or from the catalog database
    (SQLite's SQLITE_FULL, PostgreSQL's SQLSTATE 53100 disk_full)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, OperationalError):
        orig = exc.orig
        return getattr(orig, "sqlstate", None) == "53100" or "database or disk is full" in str(orig)
    return False


# A full disk is the server's condition, not a bug and not the client's mistake; the message
# names no path (OSError's text carries the temporary file's).
_DISK_FULL_MESSAGE = "the server has no storage space left; nothing was registered, retry later"


@dataclass(frozen=True)
class Rule:
    """How one exception type answers.

    Attributes:
        kind: the exception type (subclasses included).
        status: the HTTP status, or None for the exception's own ``status_code`` (Starlette's).
        code: the error code, or None for the exception's own ``code`` (the store's errors carry
            theirs, shared with the CLI).
        when: an extra condition on the exception; the rule applies only where it holds.
        message: the client-facing text; ``str(exc)`` when None.
        headers: response headers every occurrence gets.
        log_level: log the occurrence at this level (server conditions the operator should see).
    """

    kind: type[Exception]
    status: int | None
    code: str | None
    when: Callable[[BaseException], bool] | None = None
    message: Callable[[BaseException], str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    log_level: int | None = None


# The first rule that matches wins, so subclasses come before their bases. Anything no rule
# matches is a bug: 500 ``internal``, logged with its traceback.
RULES: tuple[Rule, ...] = (
    Rule(EmptyImage, 400, "empty_image"),
    Rule(MissingFile, 400, "missing_file"),
    Rule(InvalidLabels, 400, "invalid_labels"),
    Rule(MalformedHttp, 400, "malformed_http"),
    Rule(InvalidRequest, 400, "invalid_request"),
    Rule(RequestTimedOut, 408, "request_timeout"),
    Rule(HeadersTooLarge, 431, "headers_too_large"),
    Rule(Unauthorized, 401, "unauthorized", headers={"WWW-Authenticate": "Bearer"}),
    Rule(AdminDisabled, 403, "admin_disabled"),
    Rule(TooManyImages, 413, "too_many_images"),
    Rule(ImageTooLarge, 413, "image_too_large"),
    Rule(PayloadTooLarge, 413, "payload_too_large"),
    Rule(UnsupportedMediaType, 415, "unsupported_media_type"),
    Rule(InvalidImage, 422, "invalid_image"),
    Rule(NotReady, 503, "not_ready", headers={"Retry-After": "5"}),
    Rule(Overloaded, 503, "overloaded"),  # Retry-After comes from the settings, per occurrence
    Rule(Timeout, 504, "timeout"),
    # The store's errors keep their own codes.
    Rule(store.IncompatibleBase, 422, None),
    Rule(store.AdapterTooLarge, 413, None),
    Rule(store.InvalidAdapter, 422, None),
    Rule(store.NotFound, 404, None),
    Rule(store.AlreadyExists, 409, None),
    Rule(store.InvalidName, 400, None),
    Rule(store.InvalidRequest, 400, None),
    Rule(store.UnmappedLabel, 400, None),
    # Damaged stored bytes: refused for this adapter only, as a conflict with the stored state
    # (re-registering the file repairs it); never a 5xx.
    Rule(store.ChecksumMismatch, 409, None),
    Rule(store.StoreError, 400, None),
    Rule(RequestValidationError, 422, "invalid_request", message=_validation_message),
    Rule(StarletteHTTPException, None, "not_found", _http_status(404), _http_detail),
    Rule(StarletteHTTPException, None, "method_not_allowed", _http_status(405), _http_detail),
    Rule(StarletteHTTPException, None, "http_error", message=_http_detail),
    # The client hung up before sending its whole body: nobody reads the answer, and it is not a
    # server error (no traceback in the log).
    Rule(ClientDisconnect, 400, "client_disconnected", log_level=logging.INFO),
    Rule(
        OSError,
        507,
        "insufficient_storage",
        disk_full,
        lambda _: _DISK_FULL_MESSAGE,
        {"Retry-After": "60"},
        logging.ERROR,
    ),
    Rule(
        OperationalError,
        507,
        "insufficient_storage",
        disk_full,
        lambda _: _DISK_FULL_MESSAGE,
        {"Retry-After": "60"},
        logging.ERROR,
    ),
)


# What the middlewares answer on any path before a route runs (server/middleware/).
ANY_ROUTE: tuple[type[BaseException], ...] = (HeadersTooLarge, PayloadTooLarge, InvalidRequest)
INTERNAL = ("internal", "a bug: the server logged it with its traceback")


# What the framework's and the system's exceptions mean here (their docstrings say nothing).
_MEANING: dict[type[BaseException], str] = {
    RequestValidationError: "a parameter fails its declared rule (type, range, pattern)",
    ClientDisconnect: "the client hung up before sending its whole body",
    OSError: "the blob store is out of space; nothing was registered",
    OperationalError: "the catalog database is out of space; nothing was registered",
}


def _meaning(kind: type[BaseException]) -> str:
    doc = _MEANING.get(kind) or kind.__doc__ or kind.__name__
    return doc.strip().splitlines()[0].rstrip(".")


def documented(*kinds: type[BaseException]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that raises ``kinds``: per status, the one error
    model (:class:`~deltaclip_api.ErrorBody`) and the codes :data:`RULES` gives those kinds,
    plus what every route can answer (:data:`ANY_ROUTE`, 500 ``internal``).

    Raises:
        LookupError: a kind no rule answers with a fixed status (it would be a 500).
    """
    codes: dict[int, dict[str, str]] = {}
    for kind in (*kinds, *ANY_ROUTE):
        rule = next((r for r in RULES if issubclass(kind, r.kind)), None)
        if rule is None or rule.status is None:
            raise LookupError(f"no rule of RULES gives {kind.__name__} a status")
        code = rule.code if rule.code is not None else str(getattr(kind, "code", "error"))
        found = codes.setdefault(rule.status, {})
        found[code] = f"{found[code]}, or {_meaning(kind)}" if code in found else _meaning(kind)
    codes[500] = dict([INTERNAL])
    return {
        status: {
            "model": ErrorBody,
            "description": "; ".join(f"`{code}`: {what}" for code, what in found.items()),
        }
        for status, found in sorted(codes.items())
    }


def rule_for(exc: BaseException) -> Rule | None:
    """The first rule of :data:`RULES` that applies to ``exc``, or None (a bug: 500)."""
    for rule in RULES:
        if isinstance(exc, rule.kind) and (rule.when is None or rule.when(exc)):
            return rule
    return None


def answer_for(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """Status, code, message and headers for ``exc``, as :data:`RULES` says."""
    rule = rule_for(exc)
    if rule is None:
        return 500, "internal", "internal server error", {}
    status = rule.status if rule.status is not None else int(getattr(exc, "status_code", 500))
    code = rule.code if rule.code is not None else str(getattr(exc, "code", "error"))
    message = rule.message(exc) if rule.message is not None else str(exc)
    return status, code, message, {**rule.headers, **(getattr(exc, "headers", None) or {})}


def error_response(exc: BaseException, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one rendering of an error: ``{"error": {"code", "message"}}`` with the table's status.

    Args:
        exc: what went wrong.
        headers: extra headers for this response (the middleware closes the connection).
    """
    status, code, message, own = answer_for(exc)
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={**own, **(headers or {})} or None,
    )


async def _handle(request: Request, exc: Exception) -> Response:
    rule = rule_for(exc)
    if rule is None:
        # %r: the path is the client's text, so control characters are escaped, never written raw.
        log.exception("unhandled error on %s %r", request.method, request.url.path)
    elif rule.log_level is not None:
        log.log(rule.log_level, "%s %r: %s", request.method, request.url.path, answer_for(exc)[1])
    return error_response(exc)


def install(app: FastAPI) -> None:
    """Answer every exception type of :data:`RULES`, and anything else as a logged 500."""
    for kind in dict.fromkeys(rule.kind for rule in RULES):
        app.add_exception_handler(kind, _handle)
    app.add_exception_handler(Exception, _handle)
