"""Usage per version in the catalog, on SQLite and PostgreSQL: replicas' batches add up, the
listing sorts and filters by it, the CLI shows it."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from adapters_store import cli
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from adapters_store.usage import UsageDelta

NOW = dt.datetime.now(dt.UTC)


def _register(registry: Registry, tiny, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    for seed, task in enumerate(names):
        data = encode_adapter(random_adapter(*tiny, task, seed=seed, density=0.01))
        registry.register(data, ServingBase.of(*tiny))


def test_two_replicas_batches_add_up(registry: Registry, settings, tiny) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, ["a", "b"])
    other = Registry.from_settings(settings)  # another replica: its own engine
    try:
        old, new = NOW - dt.timedelta(hours=2), NOW - dt.timedelta(minutes=1)
        assert registry.add_usage({("a", 1): UsageDelta(3, 7, 1, new)}) == 1
        assert (
            other.add_usage({("a", 1): UsageDelta(2, 2, 0, old), ("b", 1): UsageDelta(0, 0, 2)})
            == 2
        )
        assert registry.add_usage({("a", 1): UsageDelta(1, 1, 0, None)}) == 1
    finally:
        other.close()
    a, b = registry.get("a", 1), registry.get("b", 1)
    assert (a.requests, a.images, a.errors) == (6, 10, 1)
    assert a.last_served_at is not None
    assert abs(dt.datetime.fromisoformat(a.last_served_at) - new) < dt.timedelta(seconds=1)
    assert (b.requests, b.errors, b.last_served_at) == (0, 2, None)


def test_a_deleted_version_is_passed_over(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, ["a", "b"])
    registry.delete("b", 1)
    batch = {("a", 1): UsageDelta(1, 1, 0, NOW), ("b", 1): UsageDelta(5, 5, 0, NOW)}
    assert registry.add_usage(batch) == 1
    assert registry.get("a", 1).requests == 1


def test_the_listing_sorts_and_filters_by_usage(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, ["a", "b", "c", "d"])
    ago = {"a": dt.timedelta(days=40), "b": dt.timedelta(days=1), "c": dt.timedelta(hours=1)}
    counts = {"a": (5, 5, 0), "b": (50, 60, 3), "c": (10, 10, 9)}
    registry.add_usage({(t, 1): UsageDelta(*counts[t], NOW - ago[t]) for t in counts})

    def order(**kw: object) -> list[str]:
        return [r.task for r in registry.list(**kw).items]  # type: ignore[arg-type]

    assert order() == ["a", "b", "c", "d"]
    assert order(sort="requests") == ["b", "c", "a", "d"]  # never served: last
    assert order(sort="errors") == ["c", "b", "a", "d"]
    assert order(sort="last_served") == ["c", "b", "a", "d"]
    assert order(sort="requests", limit=2, offset=1) == ["c", "a"]
    page = registry.list(unused_since=30 * 86400, sort="requests")
    assert [r.task for r in page.items] == ["a", "d"] and page.total == 2
    assert registry.list(unused_since=3600 * 6).total == 3  # a, b, d


def test_the_cli_lists_by_usage(registry: Registry, settings, tiny, capsys) -> None:  # type: ignore[no-untyped-def]
    _register(registry, tiny, ["a", "b"])
    registry.add_usage({("b", 1): UsageDelta(4, 9, 1, NOW)})
    store = ["--home", str(settings.home), "--database-url", settings.database_url]
    assert cli.main(["adapters", "list", "--sort", "requests", "--json", *store]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert [(i["task"], i["requests"], i["images"], i["errors"]) for i in items] == [
        ("b", 4, 9, 1),
        ("a", 0, 0, 0),
    ]
    assert cli.main(["adapters", "list", "--unused-since", "30d", *store]) == 0
    out = capsys.readouterr().out
    assert "REQUESTS" in out and "LAST SERVED" in out and "(1 of 1)" in out
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["a"]
    assert cli.main(["adapters", "show", "b", "--json", *store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["requests"], shown["images"], shown["errors"]) == (4, 9, 1)
    assert shown["last_served_at"].endswith("Z")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["adapters", "list", "--unused-since", "30days", *store])
    assert exit_.value.code == 2
    assert "give a count and a unit" in capsys.readouterr().err
