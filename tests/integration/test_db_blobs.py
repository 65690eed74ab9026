"""Blobs in the catalog database: shared by replicas on different hosts, cached locally by digest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters_store.bases import TINY
from adapters_store.catalog import upgrade
from adapters_store.config import StoreSettings
from adapters_store.dbblobs import DatabaseBlobStore
from adapters_store.errors import BlobNotFound
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter


def _replica(url: str, home: Path, backend: str = "auto") -> Registry:
    return Registry.from_settings(StoreSettings(home=home, database_url=url, blob_backend=backend,
                                                base_model=TINY[0], base_pretrained=TINY[1]))  # fmt: skip


@pytest.mark.postgres
def test_postgres_defaults_to_database_blobs_shared_across_hosts(
    pg_url: str, tmp_path: Path, tiny
) -> None:  # type: ignore[no-untyped-def]
    upgrade(pg_url)
    a, b = _replica(pg_url, tmp_path / "host-a"), _replica(pg_url, tmp_path / "host-b")
    assert isinstance(a.blobs, DatabaseBlobStore)
    data = encode_adapter(random_adapter(*tiny, "shared"))
    rec = a.register(data, ServingBase.of(*tiny)).record
    assert not (tmp_path / "host-b" / "blobs").exists()  # nothing on host b's disk yet
    assert b.read_bytes(b.resolve("shared")) == data  # fetched from the database, verified
    assert b.blobs.path_for(rec.digest).read_bytes() == data  # and cached locally by digest
    # A damaged cache file is never trusted: the row is read again and the cache rewritten.
    b.blobs.path_for(rec.digest).write_bytes(b"rotten")
    assert b.read_bytes(rec) == data and b.blobs.path_for(rec.digest).read_bytes() == data
    a.delete("shared", 1)
    assert b.gc(grace_seconds=0) == [rec.digest]
    with pytest.raises(BlobNotFound):
        DatabaseBlobStore(b.catalog, tmp_path / "host-c" / "blobs").get(rec.digest)
    assert a.fsck(repair=True, grace_seconds=0).orphan_blobs == [] and b.fsck().clean
    a.close()
    b.close()


def test_database_backend_also_works_on_sqlite(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    reg = _replica(url, tmp_path / "home", backend="database")
    data = encode_adapter(random_adapter(*tiny, "t"))
    rec = reg.register(data, ServingBase.of(*tiny)).record
    assert reg.register(data, ServingBase.of(*tiny)).record.version == rec.version == 1
    assert list(reg.blobs.digests()) == [rec.digest]
    reg.blobs.cache.delete(rec.digest)
    assert reg.load(rec, ServingBase.of(*tiny)).meta.task == "t"
    reg.close()


@pytest.mark.parametrize("backend", ["database", "filesystem"])
def test_registered_bytes_are_hashed_once_and_never_sent_twice(
    tmp_path: Path, tiny, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Registration hashes the file once (the blob store trusts that digest, and a blob already
    stored is compared, not hashed again), and bytes the database already holds are not sent to
    it again."""
    from sqlalchemy import event

    from adapters_store import blobs

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    reg = _replica(url, tmp_path / "home", backend=backend)
    data = encode_adapter(random_adapter(*tiny, "t"))
    base = ServingBase.of(*tiny)
    hashed: list[int] = []  # the size of each SHA-256 computed by the store (files included)

    def counting(payload: bytes | memoryview = b"") -> Any:
        hashed.append(len(payload))
        return hashlib.sha256(payload)

    monkeypatch.setattr(blobs, "hashlib", SimpleNamespace(sha256=counting))
    sent: list[int] = []

    def record_sent(conn, cursor, statement, parameters, context, many) -> None:  # type: ignore[no-untyped-def]
        rows = parameters if many else [parameters]
        flat = [v for row in rows for v in (row.values() if isinstance(row, dict) else row)]
        sent.extend(len(v) for v in flat if isinstance(v, bytes | memoryview) and bytes(v) == data)

    engines = {reg.catalog.write_engine, reg.catalog.read_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record_sent)
    try:
        assert reg.register(data, base).created
        assert hashed == [len(data)], "the incoming bytes are hashed once"
        assert sent == ([len(data)] if backend == "database" else [])
        hashed.clear()
        assert not reg.register(data, base, alias="production").created
        assert hashed == [len(data)]
        assert sent == ([len(data)] if backend == "database" else []), "not sent again"
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record_sent)
    assert reg.read_bytes(reg.resolve("t", alias="production")) == data
    reg.close()
