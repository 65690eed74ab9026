"""Hostile requests against the real ``deltaclip serve`` process on loopback: bad images, bombs,
multipart abuse, malformed queries, lying or malformed HTTP framing and oversized bodies. Each
gets the right 4xx (never a 5xx), memory stays bounded, the server keeps serving, and its log
carries no traceback, no filesystem path and no raw control character.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import png_bytes
from tests.security.helpers import (
    ADMIN,
    ServerProcess,
    raw_exchange,
    start_server,
    statuses,
)

Tiny = tuple[nn.Module, BaseSignature]
MAX_REQUEST = 1 << 20
MAX_UPLOAD = 4 << 20
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny: Tiny) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("hostile-requests")
    url = f"sqlite:///{tmp / 'catalog.db'}"
    upgrade(url)
    env = {"DELTACLIP_MAX_REQUEST_BYTES": str(MAX_REQUEST), "DELTACLIP_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}  # fmt: skip
    srv = start_server(tmp / "home", url, env, ["--access-log", "--log-level", "info"])
    try:
        data = encode_adapter(random_adapter(*tiny, "t", class_names=CLASSES))
        r = httpx.post(f"{srv.url}/admin/adapters", files={"file": ("a", data)}, headers=ADMIN)
        assert r.status_code == 201, r.text
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    # After every hostile test: still alive and still answering correctly.
    assert server.alive()
    r = httpx.post(f"{server.url}/predict?task=t", content=png_bytes(0), headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 200 and r.json()["predictions"][0][0]["label"] in CLASSES


def check_client_error(r: httpx.Response, status: int, server: ServerProcess) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"code", "message"}
    assert "Traceback" not in r.text and str(server.home) not in r.text and "/tmp/" not in r.text


# ------------------------------------------------------------------------------------ images


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = zlib.compress(b"\0" * 64)) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")  # fmt: skip


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(NOISE, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (40, 20), (0, 0, 255)), "JPEG", exif=exif)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)


def bad_crc_png() -> bytes:
    data = bytearray(encode(NOISE, "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


IMAGES: list[tuple[str, Callable[[], bytes], int]] = [
    ("zero-bytes", lambda: b"", 400),
    ("truncated-png", lambda: encode(NOISE, "PNG")[:300], 422),
    ("truncated-jpeg", lambda: encode(NOISE, "JPEG")[:300], 422),
    ("png-bad-crc", bad_crc_png, 422),
    ("jpeg-garbage-after-soi", lambda: b"\xff\xd8\xff" + b"\x00garbage" * 20, 422),
    ("not-an-image", lambda: b"plain text, not an image at all", 415),
    ("html-as-image", lambda: b"<html><script>alert(1)</script></html>", 415),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', 415),
    ("tiff", lambda: encode(Image.new("RGB", (4, 4)), "TIFF"), 415),
    ("fits", lambda: b"SIMPLE  =                    T" + b" " * 2850, 415),
    ("gif-animated", lambda: animated("GIF"), 415),
    ("ico", lambda: encode(Image.new("RGB", (16, 16)), "ICO"), 415),
    ("pdf", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", 415),
    ("psd-magic", lambda: b"8BPS" + b"\0" * 40, 415),
    ("jpeg2000", lambda: encode(Image.new("RGB", (8, 8)), "JPEG2000"), 415),
    ("png-bomb-20k-x-20k", lambda: png_declaring(20_000, 20_000), 413),
    ("png-bomb-2**31-wide", lambda: png_declaring(2**31 - 1, 1), 413),
    ("jpeg-bomb-65k-x-65k", lambda: jpeg_declaring(65_000, 65_000), 413),
    ("bmp-bomb-30k-x-30k", lambda: bmp_declaring(30_000, 30_000), 413),
    ("png-0x0", lambda: png_declaring(0, 0), 422),
    ("png-0-wide", lambda: png_declaring(0, 10), 422),
    ("cmyk-jpeg", lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), 200),
    ("16-bit-png", lambda: encode(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), "PNG"), 200),
    ("palette-transparent-png", lambda: encode(Image.new("P", (8, 8), 3), "PNG", transparency=3), 200),
    ("rgba-png", lambda: encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), 200),
    ("1-bit-bmp", lambda: encode(Image.new("1", (9, 7), 1), "BMP"), 200),
    ("grayscale-jpeg", lambda: encode(Image.new("L", (8, 8), 128), "JPEG"), 200),
    ("progressive-jpeg", lambda: encode(NOISE, "JPEG", progressive=True), 200),
    ("animated-png", lambda: animated("PNG"), 200),
    ("animated-webp", lambda: animated("WEBP"), 200),
    ("exif-rotated-jpeg", exif_rotated, 200),
    ("1x1-png", lambda: encode(Image.new("RGB", (1, 1)), "PNG"), 200),
    ("10000x1-png", lambda: encode(Image.new("RGB", (10_000, 1)), "PNG"), 200),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "status"), IMAGES, ids=[c[0] for c in IMAGES])
def test_hostile_image(
    http: httpx.Client, server: ServerProcess, name: str, build: Callable[[], bytes], status: int
) -> None:
    data = build()
    raw = http.post("/predict?task=t", content=data, headers={"content-type": "image/png"})
    multi = http.post("/predict?task=t", files=[("file", ("x", data, "application/octet-stream"))])
    for r in (raw, multi):
        if status == 200:
            assert r.status_code == 200, (name, r.text)
            assert r.json()["predictions"][0][0]["label"] in CLASSES
        else:
            check_client_error(r, status, server)


# ------------------------------------------------------------------------------------ multipart


def _multipart(parts: list[bytes], boundary: bytes = b"XyZ") -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"  # fmt: skip
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def _file_part(data: bytes, name: bytes = b"file", filename: bytes = b"a.png", extra: bytes = b"") -> bytes:  # fmt: skip
    return (b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n' + extra + b"Content-Type: image/png\r\n\r\n" + data)  # fmt: skip


def _field_part(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


PNG = png_bytes(1)
MULTIPART: list[tuple[str, Callable[[], tuple[bytes, dict[str, str]]], tuple[int, ...]]] = [
    ("100-fields", lambda: _multipart([_file_part(PNG)] + [_field_part(f"f{i}", b"x") for i in range(100)]), (400,)),
    ("65-files", lambda: _multipart([_file_part(PNG)] * 65), (400, 413)),  # 413 on /predict, 400 on /admin
    ("200KiB-filename", lambda: _multipart([_file_part(PNG, filename=b"a" * 200_000)]), (400,)),
    ("200KiB-part-header", lambda: _multipart([_file_part(PNG, extra=b"X-Pad: " + b"p" * 200_000 + b"\r\n")]), (400,)),
    ("5000-part-headers", lambda: _multipart([_file_part(PNG, extra=b"X: y\r\n" * 5000)]), (400,)),
    ("100KiB-text-field", lambda: _multipart([_file_part(PNG), _field_part("note", b"n" * 100_000)]), (400,)),
    ("no-file-field", lambda: _multipart([_file_part(PNG, name=b"other")]), (400,)),
    ("zero-byte-file", lambda: _multipart([_file_part(b"")]), (400,)),
    ("missing-boundary", lambda: (b"--x\r\n", {"content-type": "multipart/form-data"}), (400,)),
    ("wrong-boundary", lambda: (_multipart([_file_part(PNG)], b"AAA")[0], {"content-type": "multipart/form-data; boundary=BBB"}), (400,)),
    ("unterminated", lambda: (_multipart([_file_part(PNG)])[0][:-20], _multipart([])[1]), (400,)),
    ("nul-in-part-name", lambda: _multipart([_file_part(PNG, name=b"fi\x00le")]), (400,)),
    ("text-plain-body", lambda: (b"hello", {"content-type": "text/plain"}), (415,)),
    ("no-content-type", lambda: (b"plain text, no content type", {}), (415,)),
    ("json-body", lambda: (b'{"file": "x"}', {"content-type": "application/json"}), (415,)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "allowed"), MULTIPART, ids=[c[0] for c in MULTIPART])
def test_hostile_multipart(
    http: httpx.Client,
    server: ServerProcess,
    name: str,
    build: Callable[[], tuple[bytes, dict[str, str]]],
    allowed: tuple[int, ...],
) -> None:
    body, headers = build()
    for path in ("/predict?task=t", "/admin/adapters"):
        r = http.post(path, content=body, headers={**headers, **ADMIN})
        assert r.status_code in (*allowed, 422), (name, path, r.status_code, r.text[:300])
        check_client_error(r, r.status_code, server)


# ------------------------------------------------------------------------------------ queries

QUERIES: list[tuple[str, str, str, int]] = [
    ("unknown-task", "POST", "/predict?task=ghost", 404),
    ("unknown-version", "POST", "/predict?task=t&version=99", 404),
    ("unknown-alias", "POST", "/predict?task=t&alias=nope", 404),
    ("version-and-alias", "POST", "/predict?task=t&version=1&alias=production", 400),
    ("missing-task", "POST", "/predict", 422),
    ("empty-task", "POST", "/predict?task=", 422),
    ("task-traversal", "POST", "/predict?task=../../etc/passwd", 422),
    ("task-encoded-traversal", "POST", "/predict?task=%2e%2e%2f%2e%2e%2fetc", 422),
    ("task-nul", "POST", "/predict?task=t%00", 422),
    ("task-newline", "POST", "/predict?task=t%0d%0aFAKE%20log%20line", 422),
    ("task-ansi", "POST", "/predict?task=%1b%5b2J", 422),
    ("task-300-chars", "POST", "/predict?task=" + "t" * 300, 422),
    ("task-unicode", "POST", "/predict?task=t%C3%A9", 422),
    ("version-zero", "POST", "/predict?task=t&version=0", 422),
    ("version-negative", "POST", "/predict?task=t&version=-1", 422),
    ("version-float", "POST", "/predict?task=t&version=1.5", 422),
    ("version-text", "POST", "/predict?task=t&version=abc", 422),
    ("version-2**64", "POST", "/predict?task=t&version=18446744073709551616", 422),
    ("top-k-zero", "POST", "/predict?task=t&top_k=0", 422),
    ("top-k-huge", "POST", "/predict?task=t&top_k=99999999", 422),
    ("top-k-exponent", "POST", "/predict?task=t&top_k=1e3", 422),
    ("alias-traversal", "POST", "/predict?task=t&alias=../x", 422),
    ("zero-shot-one-label", "POST", "/predict/zero-shot?labels=cat", 400),
    ("zero-shot-control-label", "POST", "/predict/zero-shot?labels=cat,d%07og", 400),
    ("zero-shot-duplicate-labels", "POST", "/predict/zero-shot?labels=cat,cat", 400),
    ("zero-shot-1001-labels", "POST", "/predict/zero-shot?labels=" + ",".join(f"l{i}" for i in range(1001)), 400),
    ("list-limit-zero", "GET", "/adapters?limit=0", 422),
    ("list-limit-text", "GET", "/adapters?limit=abc", 422),
    ("list-offset-negative", "GET", "/adapters?offset=-1", 422),
    ("list-base-nul", "GET", "/adapters?base=%00", 422),
    ("list-domain-newline", "GET", "/adapters?domain=a%0ab", 422),
    ("list-task-traversal", "GET", "/adapters?task=..%2f..", 422),
    ("task-path-traversal", "GET", "/adapters/..%2f..%2fetc%2fpasswd", 404),
    ("task-path-control", "GET", "/adapters/t%0aFAKE", 422),
    ("version-path-text", "GET", "/adapters/t/versions/abc", 422),
    ("version-path-huge", "GET", "/adapters/t/versions/99999999999", 422),
    ("file-unknown-version", "GET", "/adapters/t/versions/7/file", 404),
    ("catalog-task-nul", "GET", "/catalog?task=%00", 422),
    ("catalog-limit-huge", "GET", "/catalog?limit=100000", 422),
    ("unknown-route", "GET", "/../../etc/passwd", 404),
    ("wrong-method", "DELETE", "/predict?task=t", 405),
]  # fmt: skip


@pytest.mark.parametrize(("name", "method", "url", "status"), QUERIES, ids=[c[0] for c in QUERIES])
def test_hostile_query(
    http: httpx.Client, server: ServerProcess, name: str, method: str, url: str, status: int
) -> None:
    content = PNG if method == "POST" else None
    r = http.request(method, url, content=content, headers={"content-type": "image/png"})
    check_client_error(r, status, server)


# ------------------------------------------------------------------------------------ bodies


class RssSampler:
    """The peak resident memory of a process, sampled every few milliseconds."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.peak, self._stop = server, server.rss_kib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_kib())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _chunked(total: int, first: bytes = b"\x89PNG\r\n\x1a\n") -> Iterator[bytes]:
    piece = 64 * 1024
    yield b"%x\r\n" % len(first) + first + b"\r\n"
    for _ in range(total // piece):
        yield b"%x\r\n" % piece + b"\0" * piece + b"\r\n"
    yield b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/predict?task=t", "image/png"),
        ("/predict?task=t", "multipart/form-data; boundary=XyZ"),
        ("/admin/adapters", "application/octet-stream"),
        ("/admin/adapters", "multipart/form-data; boundary=XyZ"),
    ],
    ids=["predict-raw", "predict-multipart", "upload-raw", "upload-multipart"],
)
def test_oversized_chunked_body_is_413_while_streaming_with_bounded_memory(
    http: httpx.Client, server: ServerProcess, path: str, content_type: str
) -> None:
    """48 MiB sent chunked (no Content-Length): refused once the limit is crossed, without the
    server holding the body in memory."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Authorization: {ADMIN['Authorization']}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    first = b"--XyZ\r\n" + _file_part(b"\x89PNG") if "multipart" in content_type else b"\x89PNG"
    before = server.rss_kib()
    with RssSampler(server) as rss:
        answer = raw_exchange(
            server.port, head, _chunked(48 << 20, first), wait=20, first_response=True
        )
    assert statuses(answer) == [413], answer[:300]
    assert b"payload_too_large" in answer
    assert rss.peak - before < 24 * 1024, f"RSS grew by {(rss.peak - before) / 1024:.0f} MiB"


def test_declared_content_length_over_the_limit_is_413_before_any_body(
    server: ServerProcess,
) -> None:
    for path in ("/predict?task=t", "/admin/adapters"):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000000000\r\n\r\n"  # fmt: skip
        answer = raw_exchange(server.port, head.encode(), wait=5, first_response=True)
        assert statuses(answer) == [413], answer[:300]


# What each case must get: the statuses of every response on the connection, in order.
FRAMING: list[tuple[str, bytes, list[int]]] = [
    # The first 20 bytes are a truncated PNG: 422 (the rest is then read as a next request).
    ("content-length-smaller-than-body", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 20\r\n\r\n" + PNG, [422]),
    ("content-length-and-chunked", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400]),
    ("two-content-lengths", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5\r\nContent-Length: 500\r\n\r\nhello", [400]),
    ("negative-content-length", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", [400]),
    ("text-content-length", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", [400]),
    ("chunk-size-overflow", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\nabc", [400]),
    ("chunk-size-not-hex", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", [400]),
    # A chunk of 2^63 bytes is a valid promise: 3 bytes arrive, then silence until READ_TIMEOUT_S.
    ("chunk-size-2**63", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n8000000000000000\r\nabc", [408]),
    ("unknown-transfer-encoding", b"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, evil\r\n\r\n0\r\n\r\n", [400]),
    ("nul-in-request-line", b"GET /healthz\x00 HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
    # h11 reads a bare LF as a line end (RFC 9112 §2.2 allows it): an ordinary GET.
    ("bare-lf-request", b"GET /healthz HTTP/1.1\nHost: x\n\n", [200]),
    ("http-0.9", b"GET /healthz\r\n\r\n", [400]),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, [400]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "request_bytes", "expected"), FRAMING, ids=[c[0] for c in FRAMING]
)
def test_malformed_or_lying_http_framing_never_gets_a_5xx(
    http: httpx.Client, server: ServerProcess, name: str, request_bytes: bytes, expected: list[int]
) -> None:
    # Long enough for the read timeout (10 s) where the request stalls; most answer at once.
    answer = raw_exchange(server.port, request_bytes, wait=15, first_response=True)
    assert statuses(answer) == expected, (name, answer[:500])


def test_body_shorter_than_content_length_then_hang_up(
    http: httpx.Client, server: ServerProcess
) -> None:
    """The client promises 5000 bytes, sends 100 and disconnects: nothing to answer, no 5xx and
    no traceback in the log (checked at the end of this module). The server notices the
    hang-up: it logs it as a quiet ``client_disconnected`` (INFO)."""
    for path in ("/predict", "/admin/adapters"):
        head = f"POST {path}?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nAuthorization: {ADMIN['Authorization']}\r\nContent-Length: 5000\r\n\r\n"  # fmt: skip
        answer = raw_exchange(server.port, head.encode() + PNG[:100], wait=0.5)
        assert statuses(answer) == [], answer[:300]  # nothing is answered before the hang-up
        seen = f"POST {path!r}: client_disconnected"
        deadline = time.monotonic() + 20
        while seen not in server.log():
            assert time.monotonic() < deadline, f"the server never noticed the hang-up on {path}"
            time.sleep(0.05)


def test_huge_request_header_is_bounded(server: ServerProcess) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    before = server.rss_kib()
    with RssSampler(server) as rss:
        raw_exchange(server.port, head, (b"a" * (1 << 20) for _ in range(48)), wait=1)
    assert rss.peak - before < 16 * 1024, f"RSS grew by {(rss.peak - before) / 1024:.0f} MiB"


def test_server_log_has_no_traceback_path_or_raw_control_character(
    http: httpx.Client, server: ServerProcess
) -> None:
    """Runs last in this module: everything above went through this server."""
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert str(server.home) not in log and str(Path(server.home).parent) not in log
    assert not any(line.startswith("FAKE") for line in log.splitlines())
    assert not any(ch in log for ch in "\x00\x07\x1b\r"), "raw control characters in the log"
    assert "POST /predict" in log, "the access log must be on for this check to mean anything"
