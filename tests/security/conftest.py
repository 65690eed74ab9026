"""Fixtures of the reliability and security suite (the tiny base and stores come from the root
``tests/conftest.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_store.bases import TINY
from adapters_store.catalog import upgrade
from adapters_store.config import StoreSettings
from server.main import create_app
from tests.conftest import wait_ready
from tests.security.helpers import store_settings
from tests.synthetic_domains import make_domains
from trainer.config import RunOptions, TrainConfig
from trainer.pipeline import train


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


def train_tiny(root: Path, **change: Any) -> bytes:
    """A real adapter: CMKD + RST on the tiny base over synthetic day/night shapes."""
    source, target = make_domains(root / "data", per_class=4, size=32)
    cfg = TrainConfig(**{
        "source": str(source), "target": str(target), "task": "shapes", "base_model": TINY[0],
        "base_pretrained": TINY[1], "epochs": 1, "iters_per_epoch": 3, "batch_size": 4, "lr": 1e-4,
        "head_lr_mult": 100.0, "tau": 1e-6, "max_density": 0.05, **change,
    })  # fmt: skip
    options = RunOptions(
        output=root / "a.safetensors", run_dir=root / "run", register=False, num_workers=0,
        threads=1, progress=False, created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip
    path = train(cfg, options, StoreSettings(home=root / "home")).adapter_path
    assert path is not None
    return path.read_bytes()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real trained adapter of the tiny base (unstructured residual)."""
    return train_tiny(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def trained_blocks(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real trained adapter of the tiny base with a block residual (B = 4)."""
    return train_tiny(tmp_path_factory.mktemp("trained-blocks"), block_size=4)
