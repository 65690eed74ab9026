"""Fixtures of the reliability and security suite (the tiny base and stores come from the root
``tests/conftest.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_store.catalog import upgrade
from server.main import create_app
from tests.conftest import wait_ready
from tests.security.helpers import store_settings


@contextlib.contextmanager
def serving(settings: Any) -> Iterator[TestClient]:
    """A ready in-process app over ``settings`` (lifespan run, base loaded)."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def store(tmp_path: Path) -> Any:
    """Server settings over a fresh migrated SQLite catalog, blobs under ``tmp_path/home``."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    return store_settings(tmp_path / "home", url)


@pytest.fixture
def api(store: Any) -> Iterator[TestClient]:
    """A ready in-process app over ``store`` that turns unexpected errors into 500s (as
    production does) instead of raising them into the test."""
    with serving(store) as client:
        yield client
