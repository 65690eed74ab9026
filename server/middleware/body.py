"""Request body limits enforced while the body streams in (not after it has been buffered)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidRequest, PayloadTooLarge, ServerError, error_response


def body_too_large(limit: int) -> PayloadTooLarge:
    """The one wording for a body over ``limit``, declared or received."""
    return PayloadTooLarge(f"request body exceeds {limit:,} bytes")


class BodyLimitMiddleware:
    """413 when ``Content-Length`` or the bytes actually received exceed the path's limit.

    A declared length over the limit is answered here, before the app runs (outside its
    exception handlers), through the same :func:`~server.errors.error_response` as every other
    error; bytes received over the limit raise :class:`PayloadTooLarge` inside the route, where
    the handlers answer it.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    error: ServerError = InvalidRequest("Content-Length is not a number")
                    await _reject(error, scope, receive, send)
                    return
                if declared > limit:
                    await _reject(body_too_large(limit), scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _reject(error: ServerError, scope: Scope, receive: Receive, send: Send) -> None:
    # The body is left unread, so the connection cannot be reused: close it.
    await error_response(error, {"Connection": "close"})(scope, receive, send)


class ReplicaHeaderMiddleware:
    """Name the replica that answered in ``X-Deltaclip-Replica`` (routing and failover checks)."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (b"x-deltaclip-replica", name.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named_send)
