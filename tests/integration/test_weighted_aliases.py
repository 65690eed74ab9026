"""Weighted aliases in the catalog, on SQLite and PostgreSQL: set, resolve per client key,
delete a weighted version, refusals that change nothing, and the migration of plain aliases."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from adapters_store.catalog import make_engines, upgrade
from adapters_store.errors import AdapterNotFound, InvalidRequest
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.splits import Share
from adapters_store.synthetic import random_adapter

KEYS = [f"user-{i}" for i in range(2000)]


def _register(registry: Registry, tiny, task: str, versions: int) -> None:  # type: ignore[no-untyped-def]
    for seed in range(versions):
        data = encode_adapter(random_adapter(*tiny, task, seed=seed, density=0.01))
        registry.register(data, ServingBase.of(*tiny))


def _versions(registry: Registry, keys: list[str], alias: str | None = None) -> dict[str, int]:
    return {key: registry.resolve("t", alias=alias, key=key).version for key in keys}


def test_a_weighted_alias_splits_clients_and_each_sticks(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, "t", 4)
    shares = registry.set_split("t", "production", {3: 80, 4: 20})
    assert shares == [Share(3, 80), Share(4, 20)]
    first = _versions(registry, KEYS)  # no alias named: the production alias decides
    assert len(first) == len(KEYS) and set(first.values()) == {3, 4}
    assert abs(list(first.values()).count(4) / len(KEYS) - 0.20) < 0.03
    assert _versions(registry, KEYS[:200]) == {k: first[k] for k in KEYS[:200]}  # sticky
    assert _versions(registry, KEYS[:200], "production") == {k: first[k] for k in KEYS[:200]}
    # What the catalog shows: each version's share of the alias, the heaviest as its version.
    assert registry.get("t", 3).alias_shares == {"production": 80.0}
    assert registry.get("t", 4).aliases == ["production"]
    assert registry.aliases("t") == {"production": 3}
    assert registry.splits("t") == {"production": [Share(3, 80), Share(4, 20)]}


def test_a_plain_alias_is_unchanged(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, "t", 3)
    registry.set_split("t", "production", {2: 50, 3: 50})
    registry.set_alias("t", "production", 1)  # a plain alias again: one version
    assert set(_versions(registry, KEYS[:100]).values()) == {1}
    assert registry.splits("t") == {"production": [Share(1, 100)]}
    assert registry.get("t", 1).alias_shares == {"production": 100.0}


def test_deleting_a_weighted_version_gives_its_traffic_to_the_others(
    registry: Registry, tiny
) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, "t", 4)
    registry.set_split("t", "canary", {2: 60, 3: 30, 4: 10})
    before = _versions(registry, KEYS, "canary")
    registry.delete("t", 4)
    after = _versions(registry, KEYS, "canary")
    assert set(after.values()) == {2, 3}
    assert abs(list(after.values()).count(3) / len(KEYS) - 1 / 3) < 0.04  # 30 of 90
    assert all(after[k] == before[k] for k in KEYS if before[k] == 2)  # v2's keys stay
    assert registry.splits("t") == {"canary": [Share(2, 60), Share(3, 30)]}
    registry.delete("t", 2)
    registry.delete("t", 3)  # the last version it named: the alias goes with it
    assert registry.splits("t") == {}
    with pytest.raises(AdapterNotFound):
        registry.resolve("t", alias="canary", key="user-1")
    assert registry.resolve("t", key="user-1").version == 1  # the default: the newest left


def test_a_refused_split_changes_nothing(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, "t", 2)
    registry.set_split("t", "production", {1: 90, 2: 10})
    with pytest.raises(AdapterNotFound, match="no version 7"):
        registry.set_split("t", "production", {1: 50, 7: 50})
    with pytest.raises(InvalidRequest):
        registry.set_split("t", "production", {1: 0, 2: 10})
    assert registry.splits("t") == {"production": [Share(1, 90), Share(2, 10)]}


def test_the_migration_keeps_plain_aliases_and_its_downgrade_keeps_the_heaviest(  # type: ignore[no-untyped-def]
    db_url: str, settings, tiny
) -> None:
    from adapters_store.catalog import downgrade

    registry = Registry.from_settings(settings)
    try:
        _register(registry, tiny, "t", 3)
        registry.set_split("t", "production", {2: 30, 3: 70})
        registry.set_alias("t", "canary", 1)
    finally:
        registry.close()
    downgrade(db_url, "0002")
    engine, _ = make_engines(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT alias, version FROM aliases ORDER BY alias")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("canary", 1), ("production", 3)]
    upgrade(db_url)
    registry = Registry.from_settings(settings)
    try:
        assert registry.splits("t") == {
            "canary": [Share(1, 100)],
            "production": [Share(3, 100)],
        }
        assert registry.resolve("t", key="anyone").version == 3
        assert registry.resolve("t", alias="canary").version == 1
    finally:
        registry.close()


def test_the_cli_sets_and_shows_a_split(registry: Registry, settings, tiny, capsys) -> None:  # type: ignore[no-untyped-def]
    from adapters_store import cli

    _register(registry, tiny, "t", 2)
    store = ["--home", str(settings.home), "--database-url", settings.database_url]
    assert cli.main(["adapters", "alias", "t", "production", "--weights", "1=90,2=10", *store]) == 0
    assert capsys.readouterr().out.strip() == "t@production -> v1 90%, v2 10%"
    assert registry.splits("t") == {"production": [Share(1, 90), Share(2, 10)]}
    assert cli.main(["adapters", "list", *store]) == 0
    listing = capsys.readouterr().out
    assert "production(90%)" in listing and "production(10%)" in listing
    assert cli.main(["adapters", "alias", "t", "production", "--weights", "1=90,9=10", *store]) == 1
    assert "no version 9" in capsys.readouterr().err
    assert cli.main(["adapters", "alias", "t", "production", "--weights", "1=0", *store]) == 1
    assert "weight of v1" in capsys.readouterr().err
    assert registry.splits("t") == {"production": [Share(1, 90), Share(2, 10)]}  # unchanged
    with pytest.raises(SystemExit):  # --version and --weights together: usage error
        cli.main(["adapters", "alias", "t", "p", "--version", "1", "--weights", "1=1", *store])
