"""Shared fixtures: the tiny base once per session, stores under ``tmp_path``, and catalogs on
SQLite and on the PostgreSQL at 127.0.0.1:5432 (a fresh database per test, dropped afterwards).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters_store.bases import TINY, BaseSignature, build_base, signature_of
from adapters_store.catalog import upgrade
from adapters_store.config import StoreSettings
from adapters_store.registry import Registry

PG_ADMIN_URL = os.environ.get(
    "DELTACLIP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny() -> tuple[nn.Module, BaseSignature]:
    net = build_base(*TINY)
    return net, signature_of(net, *TINY)


@pytest.fixture(scope="session")
def tiny_tower_state(tiny: tuple[nn.Module, BaseSignature]) -> dict[str, torch.Tensor]:
    from adapters_store.bases import tower_parameters

    return {k: p.detach().clone() for k, p in tower_parameters(tiny[0]).items()}


def _pg_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"deltaclip_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """An empty PostgreSQL database, dropped after the test."""
    yield from _pg_database()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty catalog database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        yield from _pg_database()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> StoreSettings:
    """Store settings over a migrated catalog on each backend, blobs under ``tmp_path``."""
    upgrade(db_url)
    return StoreSettings(
        home=tmp_path / "home", database_url=db_url, base_model=TINY[0], base_pretrained=TINY[1]
    )


@pytest.fixture
def registry(settings: StoreSettings) -> Iterator[Registry]:
    reg = Registry.from_settings(settings)
    yield reg
    reg.close()


# ------------------------------------------------------------------------------------ server

ADMIN_TOKEN = "test-admin-token"


def wait_ready(client, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"server not ready: {client.get('/readyz').json()}")


@pytest.fixture
def server_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Server settings on the tiny base over a migrated SQLite catalog under ``tmp_path``."""
    from server.config import ServerSettings

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    return ServerSettings(
        home=tmp_path / "home", database_url=url, base_model=TINY[0], base_pretrained=TINY[1],
        admin_token=ADMIN_TOKEN, max_wait_ms=1.0,
    )  # fmt: skip


@pytest.fixture
def client(server_settings):  # type: ignore[no-untyped-def]
    """A ready TestClient over an app on the tiny base (lifespan run, base loaded); every
    answer it gets is validated against the app's OpenAPI document."""
    from server.main import create_app
    from tests.openapi_check import checked_client

    with checked_client(create_app(server_settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def png_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A deterministic random RGB PNG."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def live_server(server_settings):  # type: ignore[no-untyped-def]
    """A real uvicorn server on a free loopback port, in a background thread; yields its URL."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from server.main import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(server_settings), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("live server did not become ready")
    yield url
    server.should_exit = True
    thread.join(10)


def app_routes(app) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Every ``(METHOD, path template)`` the app answers, walked from ``app.routes``.

    Not from the OpenAPI schema, which leaves out routes registered with
    ``include_in_schema=False``. FastAPI keeps included routers unflattened in ``app.routes``
    (each resolves its routes through ``effective_route_contexts``); a mounted app is walked
    with its prefix; any other kind of route fails the walk rather than being skipped.
    """
    from starlette.routing import Mount, Route

    found: list[tuple[str, str]] = []

    def walk(routes, prefix: str) -> None:  # type: ignore[no-untyped-def]
        for route in routes:
            if hasattr(route, "effective_route_contexts"):
                for ctx in route.effective_route_contexts():
                    methods = getattr(ctx.original_route, "methods", None)
                    assert methods, f"route {ctx.path} has no methods: {ctx.original_route!r}"
                    found.extend((m, prefix + ctx.path) for m in methods)
            elif isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif isinstance(route, Route) and route.methods:
                found.extend((m, prefix + route.path) for m in route.methods)
            else:
                raise AssertionError(f"cannot walk route {route!r}")

    walk(app.routes, "")
    return sorted(set(found))


def checkout_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: what a clean clone (and the next
    commit) holds, relative to the repository root."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (root / name).is_file()]
