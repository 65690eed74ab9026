"""Slow, malformed and unlucky clients against the real server (``deltaclip serve`` under
uvicorn): stalled heads and bodies are cut off after the read timeout while others are served,
heads over the limit get 431, protocol errors are JSON, HEAD works on GET routes, and a 500
leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from adapters_store.catalog import upgrade
from server.main import create_app
from server.protocol import protocol_class
from tests.security.helpers import (
    ServerProcess,
    free_port,
    raw_exchange,
    start_server,
    statuses,
    store_settings,
)

READ_TIMEOUT = 1.5
KEEP_ALIVE = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("hygiene")
    url = f"sqlite:///{root / 'catalog.db'}"
    upgrade(url)
    env = {
        "DELTACLIP_READ_TIMEOUT_S": str(READ_TIMEOUT),
        "DELTACLIP_MAX_HEAD_BYTES": "65536",
        "DELTACLIP_KEEP_ALIVE_S": str(KEEP_ALIVE),
    }
    proc = start_server(root / "home", url, env=env)
    yield proc
    proc.stop()


def body_of(raw: bytes) -> Any:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout is the
    deadline: a server that never closes fails the test)."""
    raw = b""
    while data := sock.recv(65536):
        raw += data
    return raw


@pytest.mark.parametrize(
    ("partial", "expected"),
    [
        (b"", [408]),  # a fresh connection that never speaks is timed out too
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", [408]),
        (
            b"POST /predict/zero-shot?labels=a,b HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\x89PNG" * 5,
            [408],
        ),
    ],
    ids=["nothing", "partial-head", "partial-body"],
)
def test_a_stalled_client_is_cut_off_while_others_are_served(
    server: ServerProcess, partial: bytes, expected: list[int]
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(partial)
        # Meanwhile, others are answered (the stalled connection is open from here on).
        with httpx.Client(base_url=server.url, timeout=5) as client:
            for _ in range(5):
                t = time.monotonic()
                assert client.get("/healthz").status_code == 200
                assert time.monotonic() - t < READ_TIMEOUT
        raw = read_until_closed(sock)  # closed by the server, or socket.timeout fails the test
        elapsed = time.monotonic() - start
    assert READ_TIMEOUT - 0.2 <= elapsed < READ_TIMEOUT + 3, elapsed
    assert statuses(raw) == expected, raw[:300]
    # The server says why it hangs up, in the JSON error shape.
    assert body_of(raw)["error"]["code"] == "request_timeout"
    assert b"connection: close" in raw.lower()
    assert server.alive()


def test_a_client_sending_slowly_but_steadily_is_not_cut_off(server: ServerProcess) -> None:
    """The timeout is per silence, not per request: a byte every half timeout keeps it going."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    chunks = [b"a"] * 6 + [b"\r\n\r\n"]

    def trickle() -> Iterator[bytes]:
        for chunk in chunks:
            time.sleep(READ_TIMEOUT / 2)
            yield chunk

    raw = raw_exchange(server.port, head, trickle(), wait=10, first_response=True)
    assert statuses(raw) == [200], raw[:300]


@pytest.mark.parametrize(
    ("size", "status", "code"),
    [(70_000, 431, "headers_too_large"), (130_000, 400, "malformed_http")],
)
def test_a_head_over_the_limit_is_refused(
    server: ServerProcess, size: int, status: int, code: str
) -> None:
    """A head over 64 KiB that arrives whole gets 431 JSON from deltaclip's limit; one so large
    that h11 gives up on it while it is still incomplete gets h11's 400, also JSON."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    raw = raw_exchange(server.port, head, wait=5)
    assert statuses(raw) == [status], raw[:300]
    assert body_of(raw)["error"]["code"] == code, raw[:300]
    assert b"connection: close" in raw.lower()
    # Just under the limit is fine.
    ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
    assert statuses(raw_exchange(server.port, ok, wait=5, first_response=True)) == [200]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"\x16\x03\x01 garbage \x00\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    ],
    ids=["length-abc", "length-negative", "two-lengths", "garbage-line", "space-in-name"],
)
def test_protocol_errors_are_json(server: ServerProcess, request_bytes: bytes) -> None:
    raw = raw_exchange(server.port, request_bytes, wait=5)
    assert statuses(raw) == [400], raw[:300]
    assert b"content-type: application/json" in raw.lower()
    assert body_of(raw)["error"]["code"] == "malformed_http"


def test_head_is_answered_on_get_routes(server: ServerProcess) -> None:
    for path in ("/healthz", "/readyz", "/adapters", "/catalog", "/metrics", "/openapi.json"):
        get = httpx.get(server.url + path)
        head = httpx.head(server.url + path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
    assert httpx.head(server.url + "/adapters/nope").status_code == 404
    assert httpx.head(server.url + "/predict?task=x").status_code == 405


def test_the_connection_survives_an_error_answer(server: ServerProcess) -> None:
    """4xx answers keep the connection: the next request on it is answered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for path, status in (("/adapters/nope", 404), ("/healthz", 200), ("/predict", 405)):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert statuses(read_response(sock)) == [status], path


def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s(server: ServerProcess) -> None:
    """After an answer the connection stays open for the next request, and an idle one is closed
    (silently: nothing was asked) after KEEP_ALIVE_S, not kept for ever."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=KEEP_ALIVE + 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(read_response(sock)) == [200]
        idle = time.monotonic()
        rest = read_until_closed(sock)  # socket.timeout (a failure) if it is never closed
        waited = time.monotonic() - idle
    assert rest == b""
    assert KEEP_ALIVE - 0.2 <= waited < KEEP_ALIVE + 3, waited


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_a_500_keeps_the_connection_usable(tmp_path: Path) -> None:
    """An unexpected error answers the JSON 500 and the client's next keep-alive request on the
    same connection is answered (uvicorn alone would close it). A slow answer is not a slow
    client: a route working longer than the read timeout still answers."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    app = create_app(store_settings(tmp_path / "home", url))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    @app.post("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(2.5)
        return {"done": True}

    port = free_port()
    config = uvicorn.Config(app, port=port, http=protocol_class(1.0), log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            first = read_response(sock)
            assert statuses(first) == [500]
            assert body_of(first) == {
                "error": {"code": "internal", "message": "internal server error"}
            }
            assert b"connection: close" not in first.lower()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert statuses(read_response(sock)) == [200]
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            assert statuses(read_response(sock)) == [200]
    finally:
        server.should_exit = True
        thread.join(15)
