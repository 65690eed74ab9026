"""Shared tools of the reliability and security suite: crafted files, a real server process on
loopback, raw-socket HTTP, process workers for crash and concurrency tests, and store checks.

Workers run in a ``forkserver`` context whose server has already imported torch and the store,
so starting one costs milliseconds instead of the ~2.5 s of a fresh interpreter, without the
hazards of forking the test process itself (threads, open database connections).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapters_store.bases import TINY

ADMIN_TOKEN = "security-suite-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REPO_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------- crafted files


def header_of(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header


def payload_of(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n :]


def raw_file(header: Any, payload: bytes = b"", pad: bool = True) -> bytes:
    """A safetensors-shaped file by hand: u64 header length, header bytes, payload."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + payload


def rewrite_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    header = header_of(data)
    edit(header)
    return raw_file(header, payload_of(data))


# --------------------------------------------------------------------------------- store checks


def files_under(root: Path) -> list[Path]:
    """Every file below ``root`` (blobs and temporary files alike)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def integrity_check(db_file: Path) -> str:
    conn = sqlite3.connect(str(db_file), timeout=30)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def store_settings(home: Path, url: str, **extra: Any) -> Any:
    from server.config import ServerSettings

    return ServerSettings(
        home=home, database_url=url, base_model=TINY[0], base_pretrained=TINY[1],
        admin_token=ADMIN_TOKEN, max_wait_ms=1.0, **extra,
    )  # fmt: skip


# --------------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """``deltaclip serve`` in its own process on a loopback port (RSS measurable, killable)."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path
    home: Path

    def rss_kib(self) -> int:
        return proc_status_kib(self.proc.pid, "VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def start_server(
    home: Path, url: str, env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> ServerProcess:
    """Start the real CLI server (``deltaclip serve``) and wait until ``/readyz`` is 200."""
    port = free_port()
    full_env = {
        **os.environ,
        "DELTACLIP_HOME": str(home), "DELTACLIP_DATABASE_URL": url,
        "DELTACLIP_BASE_MODEL": TINY[0], "DELTACLIP_BASE_PRETRAINED": TINY[1],
        "DELTACLIP_ADMIN_TOKEN": ADMIN_TOKEN, "DELTACLIP_MAX_WAIT_MS": "1",
        "OMP_NUM_THREADS": "1", **(env or {}),
    }  # fmt: skip
    log_path = home.parent / f"server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapters_store.cli", "serve", "--port", str(port), *args],
            env=full_env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )  # fmt: skip
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", port, log_path, home)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server not ready:\n{server.log()}")


# --------------------------------------------------------------------------------- raw HTTP


def _one_response(data: bytes | bytearray) -> bool:
    """True once ``data`` holds a whole response with a Content-Length."""
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def raw_exchange(
    port: int,
    head: bytes,
    body_chunks: Iterator[bytes] | Sequence[bytes] = (),
    wait: float = 5.0,
    first_response: bool = False,
) -> bytes:
    """Send ``head`` then ``body_chunks`` on one connection (stopping as soon as the server
    answers, stops reading or closes), then read what the server answers until it closes, goes
    quiet for ``wait`` seconds or, with ``first_response``, one whole response has arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    received = bytearray()
    done = threading.Event()

    def reader() -> None:
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                received.extend(data)
                if first_response and _one_response(received):
                    break
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    try:
        sock.sendall(head)
        thread.start()
        for chunk in body_chunks:
            if done.is_set() or received:
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
        done.wait(wait)
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(2)
    return bytes(received)


def statuses(raw: bytes) -> list[int]:
    """Status codes of every HTTP/1.1 response in ``raw``."""
    out = []
    for line in raw.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 "):
            out.append(int(line.split()[1]))
    return out


# --------------------------------------------------------------------------------- workers


def mp_context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["adapters_store.registry", "tests.security.helpers"])
    return ctx


@dataclass
class WorkerResult:
    worker: int
    versions: list[int] = field(default_factory=list)
    created: int = 0
    errors: list[str] = field(default_factory=list)


def register_files(
    worker: int, url: str, home: str, base: Any, paths: list[str], results: Any
) -> None:
    """Register ``paths`` one after another; report versions and every error (never raise).

    The registry is built from settings, so blobs go where the store puts them by default: on
    disk with SQLite, in the catalog database with PostgreSQL."""
    from adapters_store.config import StoreSettings
    from adapters_store.registry import Registry

    out = WorkerResult(worker)
    reg = Registry.from_settings(StoreSettings(home=Path(home), database_url=url))
    try:
        for path in paths:
            try:
                result = reg.register(Path(path).read_bytes(), base)
                out.versions.append(result.record.version)
                out.created += int(result.created)
            except Exception as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        reg.close()
        results.put(out)


def register_until_killed(
    url: str, blob_root: str, base: Any, paths: list[str], ready: Any
) -> None:
    """Register ``paths`` in a loop forever; the parent SIGKILLs this process at a random time."""
    from adapters_store.blobs import BlobStore
    from adapters_store.catalog import Catalog
    from adapters_store.registry import Registry

    reg = Registry(Catalog(url), BlobStore(blob_root))
    ready.set()
    while True:
        for path in paths:
            reg.register(Path(path).read_bytes(), base)


def crash_during_registration(url: str, blob_root: str, base: Any, path: str, point: str) -> None:
    """Register ``path`` and SIGKILL this process at ``point`` of the sequence validate → blob →
    row: ``temp-written`` (blob bytes on disk, not yet renamed), ``blob-stored`` (blob visible, no
    row yet) or ``row-uncommitted`` (row inserted, transaction not committed)."""
    from sqlalchemy.orm import Session

    from adapters_store import blobs
    from adapters_store.blobs import BlobStore
    from adapters_store.catalog import Catalog
    from adapters_store.registry import Registry

    def die(*_: Any, **__: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    reg = Registry(Catalog(url), BlobStore(blob_root))
    if point == "temp-written":
        blobs.os.replace = die  # type: ignore[assignment]
    elif point == "blob-stored":
        reg._insert = die  # type: ignore[method-assign]
    elif point == "row-uncommitted":
        Session.commit = die  # type: ignore[assignment,method-assign]
    else:
        raise ValueError(point)
    reg.register(Path(path).read_bytes(), base)
    raise AssertionError("the crash point was not reached")
