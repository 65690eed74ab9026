"""The HTTP/1.1 connection protocol ``deltaclip serve`` runs under uvicorn: uvicorn's h11
protocol with a read timeout and JSON protocol errors.

* **Read timeout.** uvicorn times out only idle keep-alive connections; a client that sends part
  of a request head, or part of a body, and then stalls holds its connection (and a slot of the
  server's memory) for ever. Here, whenever the server is waiting on the client (no complete
  head yet, or a body still coming while the app reads it), ``read_timeout_s`` without a byte
  answers 408 ``request_timeout`` and closes the connection. Other connections are unaffected.
* **Protocol errors** (a garbage request line, Content-Length ``abc`` or ``-5``, two different
  Content-Lengths, an incomplete head over the h11 buffer): uvicorn answers a plain-text 400;
  here the answer is the usual JSON error shape, 400 ``malformed_http``.

What uvicorn still answers by itself is listed in docs/API.md ("Answers from the HTTP server").
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import MalformedHttp, RequestTimedOut, ServerError, answer_for


def raw_error(error: ServerError) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response for ``error``, as the error table says."""
    status, code, message, _ = answer_for(error)
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    reason = {400: "Bad Request", 408: "Request Timeout"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class DeltaclipH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a read timeout and JSON protocol errors (see the module)."""

    read_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm_read_timer()  # idle from here on: uvicorn's keep-alive timeout applies
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        self._disarm_read_timer()
        self.transport.write(raw_error(MalformedHttp(f"malformed HTTP request: {msg}")))
        self.transport.close()

    # ------------------------------------------------------------------------------ read timeout

    def _waiting_on_client(self) -> bool:
        """True while the next step needs bytes from the client: a head not yet complete, or a
        body still coming (unless the server itself paused reading)."""
        if self.transport is None or self.transport.is_closing():
            return False
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            # Between requests with nothing received yet uvicorn's keep-alive timer runs; only
            # a fresh connection or a partial head is ours to time.
            return self.timeout_keep_alive_task is None
        return bool(cycle.more_body) and not cycle.response_started and not self.flow.read_paused

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _arm_read_timer(self) -> None:
        self._disarm_read_timer()
        if self._waiting_on_client():
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self._waiting_on_client():
            if self.transport is not None and not self.transport.is_closing():
                self._arm_read_timer()  # e.g. reading was paused: look again later
            return
        error = RequestTimedOut(f"no request bytes for {self.read_timeout_s:g}s")
        self.transport.write(raw_error(error))
        self.transport.close()


def protocol_class(read_timeout_s: float) -> type[DeltaclipH11Protocol]:
    """The protocol class with ``read_timeout_s`` set (uvicorn instantiates it per connection)."""
    return type("DeltaclipH11Protocol", (DeltaclipH11Protocol,), {"read_timeout_s": read_timeout_s})
