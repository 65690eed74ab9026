"""Client hygiene at the ASGI level: bounded request heads, HEAD on GET routes, and a 500 that
keeps the connection usable.

* **Heads**: uvicorn's h11 parser bounds only *incomplete* heads (``h11_max_incomplete_event_size``);
  a 130 kB head that arrives in one piece is parsed whole. :class:`HeadLimitMiddleware` answers
  any head larger than ``max_head_bytes`` (request line plus header lines) with 431 JSON.
* **HEAD**: FastAPI registers GET routes for GET only; :class:`HeadAsGetMiddleware` answers HEAD
  as the GET would (status and headers, ``Content-Length`` included) without the body.
* **500s**: Starlette renders an unexpected exception and then re-raises it to the server, which
  closes the connection, so the client's next keep-alive request is reset.
  :class:`UnexpectedErrorMiddleware` renders it (the error table's ``internal``), logs it with its
  traceback and does *not* re-raise, so the connection stays usable.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import HeadersTooLarge, error_response

log = logging.getLogger("deltaclip.server")


def head_bytes(scope: Scope) -> int:
    """The size of the request's head as sent: request line and ``name: value`` lines."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    line = len(scope["method"]) + target + len(" ?HTTP/1.1\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", [])) + 2


class HeadLimitMiddleware:
    """431 ``headers_too_large`` (JSON) for a request head over ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_bytes(scope) > self.limit:
            error = HeadersTooLarge(f"the request head exceeds {self.limit:,} bytes")
            await error_response(error, {"Connection": "close"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class HeadAsGetMiddleware:
    """Answer ``HEAD`` as ``GET`` without the body (RFC 9110 §9.3.2)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        as_get = {**scope, "method": "GET"}

        async def bodiless_send(message: Message) -> None:
            if message["type"] == "http.response.start" and "route" in as_get:
                scope["route"] = as_get["route"]  # the route the GET took, for the metrics
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(as_get, receive, bodiless_send)


class UnexpectedErrorMiddleware:
    """Render an exception no handler took as the error table's 500, keeping the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise  # half a response went out: only closing the connection can end it
            # %r: the path is the client's text, so control characters are escaped.
            log.exception("unhandled error on %s %r", scope["method"], scope["path"])
            await error_response(exc)(scope, receive, send)
