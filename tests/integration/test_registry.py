"""The registry on SQLite and PostgreSQL: register, resolve, alias, delete, gc, fsck, races."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from adapters_store.blobs import sha256_hex
from adapters_store.errors import (
    AdapterNotFound,
    ChecksumMismatch,
    IncompatibleBase,
    InvalidAdapter,
    InvalidName,
)
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter


def _file(tiny, task: str, seed: int = 0, **kw) -> bytes:  # type: ignore[no-untyped-def]
    net, sig = tiny
    return encode_adapter(random_adapter(net, sig, task, seed=seed, **kw))


def test_register_then_list_and_show(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    data = _file(tiny, "real2sketch")
    result = registry.register(data, ServingBase.of(*tiny))
    assert result.created
    rec = result.record
    assert (rec.task, rec.version, rec.size_bytes) == ("real2sketch", 1, len(data))
    assert rec.base_model == "deltaclip-tiny"
    assert rec.nnz == sum(rec.param_counts.values()) > 0
    page = registry.list()
    assert page.total == 1 and page.items[0].digest == rec.digest
    assert registry.get_by_digest(rec.digest) == rec
    assert registry.read_bytes(rec) == data


def test_same_bytes_twice_is_one_version(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    data = _file(tiny, "t")
    first = registry.register(data, ServingBase.of(*tiny))
    second = registry.register(data, ServingBase.of(*tiny))
    assert first.created and not second.created
    assert second.record.version == first.record.version == 1
    assert registry.list(task="t").total == 1


def test_versions_aliases_and_resolution(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    for seed in range(3):
        registry.register(_file(tiny, "t", seed), ServingBase.of(*tiny))
    assert registry.resolve("t").version == 3  # newest without a production alias
    registry.set_alias("t", "production", 2)
    assert registry.resolve("t").version == 2
    registry.set_alias("t", "canary", 3)
    assert registry.resolve("t", alias="canary").version == 3
    assert registry.resolve("t", version=1).version == 1
    assert registry.aliases("t") == {"canary": 3, "production": 2}
    registry.set_alias("t", "production", 3)
    assert registry.resolve("t").aliases == ["canary", "production"]
    registry.remove_alias("t", "canary")
    with pytest.raises(AdapterNotFound, match="no alias 'canary'"):
        registry.resolve("t", alias="canary")
    with pytest.raises(AdapterNotFound):
        registry.set_alias("t", "x", 99)
    with pytest.raises(InvalidName):
        registry.set_alias("t", "../evil", 1)


def test_register_with_alias(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    rec = registry.register(_file(tiny, "t"), ServingBase.of(*tiny), alias="production").record
    assert rec.aliases == ["production"]


def test_delete_is_hard_and_versions_are_never_reused(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    registry.register(_file(tiny, "t", 0), ServingBase.of(*tiny), alias="production")
    registry.register(_file(tiny, "t", 1), ServingBase.of(*tiny))
    registry.delete("t", 1)
    with pytest.raises(AdapterNotFound):
        registry.get("t", 1)
    assert registry.aliases("t") == {}
    assert registry.resolve("t").version == 2
    assert registry.register(_file(tiny, "t", 2), ServingBase.of(*tiny)).record.version == 3
    with pytest.raises(AdapterNotFound):
        registry.delete("t", 1)


def test_list_filters_and_pagination(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    for i in range(5):
        registry.register(_file(tiny, f"task{i % 2}", i), ServingBase.of(*tiny))
    assert registry.list(task="task0").total == 3
    assert registry.list(base="deltaclip-tiny").total == 5
    assert registry.list(base=tiny[1].fingerprint).total == 5
    assert registry.list(base="ViT-B-16").total == 0
    assert registry.list(domain="synthetic-target").total == 5
    assert registry.list(domain="sketch").total == 0
    pages = [registry.list(limit=2, offset=o) for o in (0, 2, 4)]
    keys = [(r.task, r.version) for p in pages for r in p.items]
    assert keys == [("task0", 3), ("task0", 2), ("task0", 1), ("task1", 2), ("task1", 1)]
    with pytest.raises(ValueError):
        registry.list(limit=0)


def test_invalid_files_leave_nothing_behind(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidAdapter):
        registry.register(b"not an adapter", ServingBase.of(*tiny))
    other = tiny[1].__class__(**{**tiny[1].__dict__, "fingerprint": "0" * 64})
    with pytest.raises(IncompatibleBase):
        registry.register(_file(tiny, "t"), ServingBase(other, ServingBase.of(*tiny).weights))
    adapter = random_adapter(*tiny, "t")
    misnamed = dataclasses.replace(
        adapter, meta=dataclasses.replace(adapter.meta, base_model="no-such-model")
    )
    with pytest.raises(
        InvalidAdapter
    ) as refused:  # the right fingerprint under another base's name
        registry.register(encode_adapter(misnamed), ServingBase.of(*tiny))
    assert refused.value.rule == "base-names"
    assert registry.list().total == 0
    assert list(registry.blobs.digests()) == []


def corrupt(registry: Registry, digest: str) -> None:
    """Flip a byte of the stored copy that the store trusts (file, or database row + cache)."""
    from sqlalchemy import update

    from adapters_store.dbblobs import DatabaseBlobStore
    from adapters_store.models import BlobRow

    if isinstance(registry.blobs, DatabaseBlobStore):
        data = bytearray(registry.blobs.get(digest))
        data[-3] ^= 0xFF
        with registry.catalog.write() as s:
            s.execute(update(BlobRow).where(BlobRow.digest == digest).values(data=bytes(data)))
        registry.blobs.cache.delete(digest)
        return
    path = registry.blobs.path_for(digest)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_blob_is_detected_on_read(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    rec = registry.register(_file(tiny, "t"), ServingBase.of(*tiny)).record
    corrupt(registry, rec.digest)
    with pytest.raises(ChecksumMismatch):
        registry.load(rec, ServingBase.of(*tiny))
    report = registry.fsck()
    assert report.corrupt_blobs == [rec.digest] and not report.clean
    registry.fsck(repair=True, grace_seconds=0)
    assert registry.fsck().clean
    assert registry.list().total == 0


def test_gc_and_fsck_find_orphans(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    rec = registry.register(_file(tiny, "t"), ServingBase.of(*tiny)).record
    orphan = registry.blobs.put(b"left by a crash between blob and row")
    (registry.blobs.path_for(orphan).parent / ".tmp-abc").write_bytes(b"half")
    report = registry.fsck()
    assert report.orphan_blobs == [orphan] and len(report.temp_files) == 1
    assert registry.gc(grace_seconds=3600) == []  # too young
    assert registry.gc(grace_seconds=0) == [orphan]
    assert registry.blobs.exists(rec.digest)
    registry.delete("t", 1)
    assert registry.gc(grace_seconds=0) == [rec.digest]
    registry.fsck(repair=True, grace_seconds=0)
    assert registry.fsck().clean


def test_dangling_row_is_reported(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    data = _file(tiny, "t")
    rec = registry.register(data, ServingBase.of(*tiny)).record
    registry.blobs.delete(rec.digest)
    assert registry.fsck().dangling_rows == [("t", 1, rec.digest)]
    # Registering the same bytes again restores the missing blob.
    assert not registry.register(data, ServingBase.of(*tiny)).created
    assert registry.fsck().clean


def test_merged_state_reproduces_the_task_model(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    from adapters_store.adapter import AdapterInfo, build_adapter
    from adapters_store.head import TaskHead
    from adapters_store.synthetic import random_task_state

    net, sig = tiny
    base, task_state = random_task_state(net, 0.01, seed=5)
    adapter = build_adapter(
        base,
        task_state,
        AdapterInfo(
            task="exact",
            base_model=sig.model,
            base_pretrained=sig.pretrained,
            base_fingerprint=sig.fingerprint,
            class_names=["a", "b"],
        ),
        head_state=TaskHead(sig.embed_dim, 2).state_dict(),
    )
    rec = registry.register(encode_adapter(adapter), ServingBase.of(net, sig)).record
    merged = registry.merged_state(rec, net, sig)
    for key, value in task_state.items():
        assert torch.equal(merged[key], value), key
    assert merged["head.fc.weight"].shape == (2, sig.embed_dim)


def test_sixteen_threads_get_versions_1_to_16(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    files = [_file(tiny, "contended", seed) for seed in range(16)]
    versions: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def work(data: bytes) -> None:
        try:
            barrier.wait()
            versions.append(registry.register(data, ServingBase.of(*tiny)).record.version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == list(range(1, 17))


def test_concurrent_identical_registrations_yield_one_version(registry: Registry, tiny) -> None:  # type: ignore[no-untyped-def]
    data = _file(tiny, "same")
    results = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        results.append(registry.register(data, ServingBase.of(*tiny)))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert {r.record.version for r in results} == {1}
    assert sum(r.created for r in results) == 1


def test_fsck_repair_spares_a_fresh_orphan(registry: Registry) -> None:
    """A blob without a row for a moment is a registration in flight: repair must not take it."""
    fresh = registry.blobs.put(b"a registration whose row is about to land")
    report = registry.fsck(repair=True)
    assert report.orphan_blobs == [fresh] and registry.blobs.exists(fresh)
    assert registry.fsck(repair=True, grace_seconds=0).repaired == [f"removed orphan blob {fresh}"]
    assert not registry.blobs.exists(fresh)


@pytest.mark.parametrize("alias", [None, "production"])
def test_resolve_is_one_snapshot_under_a_concurrent_move_and_delete(
    registry: Registry, settings, tiny, alias: str | None
) -> None:  # type: ignore[no-untyped-def]
    """Another replica moves the alias to v2 and deletes v1 exactly between resolve's alias read
    and its version read: resolve answers from one snapshot (v1, as the alias stood when it
    began), never a 404 for a version it was just pointed at (issue 24)."""
    from sqlalchemy import event

    registry.register(_file(tiny, "t", 1), ServingBase.of(*tiny))
    registry.register(_file(tiny, "t", 2), ServingBase.of(*tiny))
    registry.set_alias("t", "production", 1)
    other = Registry.from_settings(settings)  # the other replica: its own engine and connections
    resolving = threading.get_ident()
    statements: list[str] = []
    moved = threading.Event()

    def move_and_delete() -> None:
        other.set_alias("t", "production", 2)
        other.delete("t", 1)
        moved.set()

    def before(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if threading.get_ident() != resolving or moved.is_set():
            return
        if not statement.lstrip().upper().startswith("SELECT"):
            return
        statements.append(statement)
        if len(statements) == 2:  # the alias was read; the version is read next
            mover = threading.Thread(target=move_and_delete)
            mover.start()
            mover.join(30)

    engine = registry.catalog.read_engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        record = registry.resolve("t", alias=alias)
    finally:
        event.remove(engine, "before_cursor_execute", before)
        other.close()
    assert moved.is_set(), "the concurrent move and delete did not run"
    assert "aliases" in statements[0].lower()
    assert record.version == 1 and record.task == "t"
    assert registry.resolve("t", alias=alias).version == 2  # and afterwards the move is seen
    with pytest.raises(AdapterNotFound):
        registry.get("t", 1)


def test_a_failure_between_the_version_and_its_alias_leaves_neither(
    registry: Registry, tiny
) -> None:  # type: ignore[no-untyped-def]
    """Base row, task counter, version and alias are one transaction: a failure injected after
    the version row is written and before the alias is leaves the catalog as it was."""
    from sqlalchemy import event, func, select

    from adapters_store.models import AdapterRow, AliasRow, BaseModelRow, TaskRow

    class Injected(RuntimeError):
        pass

    inserted: list[str] = []

    def version_written(mapper, connection, target) -> None:  # type: ignore[no-untyped-def]
        inserted.append(target.task)

    def fail_before_the_alias(mapper, connection, target) -> None:  # type: ignore[no-untyped-def]
        assert inserted == ["atomic"], "the version row is written before the alias"
        raise Injected("crash between the version and its alias")

    data = _file(tiny, "atomic")
    event.listen(AdapterRow, "after_insert", version_written)
    event.listen(AliasRow, "before_insert", fail_before_the_alias)
    try:
        with pytest.raises(Injected):
            registry.register(data, ServingBase.of(*tiny), alias="production")
    finally:
        event.remove(AliasRow, "before_insert", fail_before_the_alias)
        event.remove(AdapterRow, "after_insert", version_written)
    assert inserted == ["atomic"]
    with registry.catalog.read() as s:
        counts = [s.execute(select(func.count()).select_from(t)).scalar_one()
                  for t in (AdapterRow, AliasRow, TaskRow, BaseModelRow)]  # fmt: skip
    assert counts == [0, 0, 0, 0], "nothing of the failed registration is in the catalog"
    assert registry.find_by_digest(sha256_hex(data)) is None

    result = registry.register(data, ServingBase.of(*tiny), alias="production")
    assert result.created and (result.record.version, result.record.aliases) == (1, ["production"])
