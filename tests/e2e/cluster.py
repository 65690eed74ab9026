"""Real `deltaclip serve` replicas over one PostgreSQL catalog behind nginx, on loopback, for the
scale-out tests (each replica with its own home, as on separate hosts)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

from adapters_store.catalog import upgrade
from server.deploy import nginx_conf
from tests.conftest import ADMIN_TOKEN

Replicas = dict[str, tuple[str, subprocess.Popen[bytes]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready")


def start_replica(
    pg_url: str,
    home: Path,
    name: str,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> tuple[str, subprocess.Popen[bytes]]:
    """One `deltaclip serve` process on a free port (not waited for); its URL and process."""
    port = free_port()
    replica_env = {
        **os.environ,
        "DELTACLIP_HOME": str(home),
        "DELTACLIP_DATABASE_URL": pg_url,
        "DELTACLIP_BASE_MODEL": "deltaclip-tiny",
        "DELTACLIP_BASE_PRETRAINED": "random",
        "DELTACLIP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DELTACLIP_REPLICA_NAME": name,
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters_store.cli", "serve", "--port", str(port), *args],
        env=replica_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def running_cluster(
    pg_url: str, tmp_path: Path, replicas: int = 3, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, Replicas]]:
    """``replicas`` servers named ``replica-<i>`` and nginx in front; yields nginx's URL and
    ``name → (url, process)``. ``env``: extra ``DELTACLIP_*`` settings for every replica."""
    upgrade(pg_url)
    running: Replicas = {}
    for i in range(replicas):
        running[f"replica-{i}"] = start_replica(pg_url, tmp_path / f"host-{i}", f"replica-{i}", env)
    front = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        nginx_conf(
            [u.removeprefix("http://") for u, _ in running.values()],
            f"127.0.0.1:{front}",
            pid=str(tmp_path / "nginx.pid"),
            error_log=str(tmp_path / "nginx-error.log"),
            daemon=False,
        )
    )
    nginx = subprocess.Popen(
        ["nginx", "-p", str(tmp_path), "-c", str(conf)], stderr=subprocess.DEVNULL
    )
    try:
        for url, proc in running.values():
            wait_ready(url, proc)
        yield f"http://127.0.0.1:{front}", running
    finally:
        nginx.terminate()
        nginx.wait(10)
        for _, proc in running.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
