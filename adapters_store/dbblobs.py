"""Blobs stored in the catalog database, with a per-replica local cache verified by digest.

Why in the database: adapters are a few MB, every replica already reaches the catalog, and a
blob row can be written in its own transaction *before* the catalog row that references it, so
the registry's validate → blob → row order (no row without its blob) holds across hosts with no
second storage system to run, secure and back up. Reads go to the local cache first; a cache
file is only trusted if it hashes to its name, otherwise the row is read again and re-cached.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .blobs import BlobStore, announced, check_digest, readable, sha256_hex
from .catalog import Catalog
from .errors import BlobNotFound, ChecksumMismatch
from .models import BlobRow


class DatabaseBlobStore:
    """The :class:`~adapters_store.blobs.BlobStore` interface over the ``blobs`` table."""

    def __init__(self, catalog: Catalog, cache_root: Path) -> None:
        self.catalog = catalog
        self.cache = BlobStore(cache_root)
        self.root = cache_root

    def path_for(self, digest: str) -> Path:
        """Where the local cached copy lives (it may be absent)."""
        return self.cache.path_for(digest)

    def put(
        self, data: bytes | memoryview, digest: str | None = None, *, hashed: bool = False
    ) -> str:
        """Store ``data`` (see :meth:`BlobStore.put`); bytes the database already holds under
        their digest are not sent again (the row's ``touched_at`` is refreshed)."""
        actual = announced(data, digest, hashed)
        with self.catalog.write() as s:
            touched = s.execute(
                update(BlobRow).where(BlobRow.digest == actual).values(touched_at=func.now())
            )
            if cast(CursorResult[Any], touched).rowcount:
                if not self.cache.exists(actual):
                    self.cache.put(data, actual, hashed=True)
                return actual
            dialect = s.get_bind().dialect.name
            ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(BlobRow)
            values = {"digest": actual, "size": len(data), "data": bytes(data)}
            s.execute(
                ins.values(**values).on_conflict_do_update(
                    index_elements=["digest"], set_={"touched_at": func.now()}
                )
            )
        self.cache.put(data, actual, hashed=True)
        return actual

    def get(self, digest: str) -> bytes:
        check_digest(digest)
        try:
            return self.cache.get(digest)
        except (BlobNotFound, ChecksumMismatch):
            pass
        with self.catalog.read() as s:
            data = s.execute(select(BlobRow.data).where(BlobRow.digest == digest)).scalar()
        if data is None:
            raise BlobNotFound(f"blob {digest} is not in the store")
        actual = sha256_hex(data)
        if actual != digest:
            raise ChecksumMismatch(
                f"blob {digest} is corrupted in the database (its bytes hash to {actual})"
            )
        self.cache.put(data, digest)
        return bytes(data)

    def exists(self, digest: str) -> bool:
        check_digest(digest)
        with self.catalog.read() as s:
            return (
                s.execute(select(BlobRow.digest).where(BlobRow.digest == digest)).scalar()
                is not None
            )

    def delete(self, digest: str) -> bool:
        check_digest(digest)
        with self.catalog.write() as s:
            gone = s.execute(delete(BlobRow).where(BlobRow.digest == digest)).rowcount  # type: ignore[attr-defined]
        self.cache.delete(digest)
        return bool(gone)

    def digests(self) -> Iterator[str]:
        with self.catalog.read() as s:
            yield from list(s.execute(select(BlobRow.digest).order_by(BlobRow.digest)).scalars())

    def temp_files(self) -> list[Path]:
        return self.cache.temp_files()

    def age_seconds(self, digest: str) -> float:
        with self.catalog.read() as s:
            touched = s.execute(select(BlobRow.touched_at).where(BlobRow.digest == digest)).scalar()
        if touched is None:
            raise BlobNotFound(f"blob {digest} is not in the store")
        if touched.tzinfo is None:
            touched = touched.replace(tzinfo=dt.UTC)
        return (dt.datetime.now(dt.UTC) - touched).total_seconds()

    def verify(self, digest: str) -> bool:
        return readable(self, digest)
