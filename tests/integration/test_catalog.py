"""Migrations and the schema check, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from adapters_store.catalog import (
    Catalog,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    make_engines,
    upgrade,
)
from adapters_store.errors import SchemaOutOfDate
from adapters_store.models import Base
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase


def test_migrations_have_one_head() -> None:
    from alembic.script import ScriptDirectory

    assert len(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()) == 1


def test_unmigrated_catalog_is_refused_with_the_fix(db_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match="deltaclip db upgrade"):
        Catalog(db_url)


def test_upgrade_downgrade_upgrade_empty(db_url: str) -> None:
    upgrade(db_url)
    Catalog(db_url).dispose()
    downgrade(db_url, "base")
    engine, _ = make_engines(db_url)
    assert current_revision(engine) is None
    engine.dispose()
    with pytest.raises(SchemaOutOfDate):
        Catalog(db_url)
    upgrade(db_url)
    Catalog(db_url).dispose()


def test_upgrade_downgrade_upgrade_populated(registry: Registry, tiny, db_url: str) -> None:  # type: ignore[no-untyped-def]
    from adapters_store.format.codec import encode_adapter
    from adapters_store.synthetic import random_adapter

    net, sig = tiny
    registry.register(
        encode_adapter(random_adapter(net, sig, "populated", seed=1)),
        ServingBase.of(net, sig),
        alias="production",
    )
    registry.close()
    # Downgrading one step from the only revision empties the schema; upgrading restores it.
    downgrade(db_url, "base")
    upgrade(db_url)
    reg = Registry(Catalog(db_url), registry.blobs)
    assert reg.list().total == 0
    reg.register(
        encode_adapter(random_adapter(net, sig, "populated", seed=2)), ServingBase.of(net, sig)
    )
    assert [r.version for r in reg.versions("populated")] == [1]
    reg.close()


def test_autogenerate_finds_no_difference(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    upgrade(db_url)
    engine, _ = make_engines(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_head_is_current_after_upgrade(db_url: str) -> None:
    upgrade(db_url)
    engine, _ = make_engines(db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_sqlite_connections_use_wal_fk_and_busy_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    cat = Catalog(url)
    with cat.read() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert s.execute(text("PRAGMA busy_timeout")).scalar() >= 10_000
    cat.dispose()


def test_write_scope_rolls_back_on_error(registry: Registry) -> None:
    from adapters_store.models import TaskRow

    with pytest.raises(RuntimeError), registry.catalog.write() as s:
        s.add(TaskRow(name="ghost", last_version=0))
        s.flush()
        raise RuntimeError("boom")
    with registry.catalog.read() as s:
        assert s.get(TaskRow, "ghost") is None
