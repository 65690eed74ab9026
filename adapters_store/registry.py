"""The registry: catalog rows joined with content-addressed blobs.

Registration runs validate → blob → rows, in that order, so a failure or crash at any step leaves
no catalog row pointing at a missing blob (at worst an unreferenced blob, which :meth:`gc`
removes); the rows (base, version, alias) are one transaction. Deletion is *hard*: the row and
its aliases go at once, the version number is never handed out again, and the blob stays until
:meth:`gc` finds it unreferenced and older than a grace period (so a concurrent
re-registration of the same bytes can never lose its blob). The reads are in
:mod:`adapters_store.reads`.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from . import maintenance
from .adapter import Adapter, merge_state
from .admission import admit
from .bases import BaseSignature
from .blobs import BlobStore, sha256_hex
from .catalog import Catalog
from .config import StoreSettings
from .dbblobs import DatabaseBlobStore
from .errors import (
    AdapterNotFound,
    AlreadyExists,
    IncompatibleBase,
)
from .format.codec import DEFAULT_LIMITS, Limits, check_against_base, decode_adapter
from .format.schema import catalog_values
from .format.servable import check_servable
from .models import AdapterRow, AliasRow, BaseModelRow, TaskRow
from .names import check_name
from .reads import CatalogReads
from .records import AdapterRecord, FsckReport, Registration
from .serving_base import ServingBase
from .splits import PLAIN_WEIGHT, Share, check_split
from .usage import UsageDelta, add_usage


def _point_alias(session: Session, task: str, alias: str, shares: Sequence[Share]) -> None:
    """Make ``alias`` name exactly ``shares`` (one version for a plain alias)."""
    session.execute(delete(AliasRow).where(AliasRow.task == task, AliasRow.alias == alias))
    session.add_all(
        AliasRow(task=task, alias=alias, version=sh.version, weight=sh.weight) for sh in shares
    )


def _insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    session.execute(ins.values(**values).on_conflict_do_nothing())


class Registry(CatalogReads):
    """The catalog's write side (registration, aliases, deletion), its blobs and maintenance;
    the reads come from :class:`~adapters_store.reads.CatalogReads`."""

    def __init__(
        self,
        catalog: Catalog,
        blobs: BlobStore | DatabaseBlobStore,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.limits = limits

    @classmethod
    def from_settings(
        cls, settings: StoreSettings | None = None, *, check_schema: bool = True
    ) -> Registry:
        settings = settings or StoreSettings()
        catalog = Catalog(settings.resolved_database_url, check_schema=check_schema)
        blobs: BlobStore | DatabaseBlobStore
        if settings.resolved_blob_backend == "database":
            blobs = DatabaseBlobStore(catalog, settings.blob_root)
        else:
            blobs = BlobStore(settings.blob_root)
        return cls(catalog, blobs, settings.limits)

    def close(self) -> None:
        self.catalog.dispose()

    # ------------------------------------------------------------------------------ registration

    def register(self, data: bytes, base: ServingBase, alias: str | None = None) -> Registration:
        """Validate ``data`` against ``base`` (every rule, ``merged-finite`` included), store it
        and catalogue it; idempotent for equal bytes. The base row, the version and the alias
        are written in one transaction: a failure leaves none of them.

        Raises:
            InvalidAdapter: the file breaks a format rule (``rule`` says which).
            IncompatibleBase: it was trained against other base weights.
        """
        if alias is not None:
            check_name(alias, "alias")
        digest = sha256_hex(data)
        existing = self.find_by_digest(digest)
        if existing is None:
            adapter = admit(data, base, self.limits)
            self.blobs.put(data, digest, hashed=True)
            try:
                record = self._insert(adapter, digest, len(data), base.signature, alias)
            except AlreadyExists:
                # The same bytes were registered concurrently; that registration won.
                existing = self.find_by_digest(digest)
                if existing is None:
                    raise
            else:
                return Registration(record, created=True)
        # Re-create a blob lost to an interrupted gc or disk loss (bytes the store holds intact
        # are not sent again).
        self.blobs.put(data, digest, hashed=True)
        if alias is not None:
            self.set_alias(existing.task, alias, existing.version)
            existing = self.get(existing.task, existing.version)
        return Registration(existing, created=False)

    def _insert(
        self, adapter: Adapter, digest: str, size: int, base: BaseSignature, alias: str | None
    ) -> AdapterRecord:
        meta = adapter.meta
        with self.catalog.write() as s:
            _insert_ignore(
                s,
                BaseModelRow.__table__,
                {
                    "fingerprint": base.fingerprint,
                    "model": base.model,
                    "pretrained": base.pretrained,
                    "embed_dim": base.embed_dim,
                    "eligible_params": base.eligible_params,
                },
            )
            _insert_ignore(s, TaskRow.__table__, {"name": meta.task, "last_version": 0})
            version = s.execute(
                update(TaskRow)
                .where(TaskRow.name == meta.task)
                .values(last_version=TaskRow.last_version + 1)
                .returning(TaskRow.last_version)
            ).scalar_one()
            s.add(
                AdapterRow(
                    **catalog_values(meta),
                    version=version,
                    digest=digest,
                    size_bytes=size,
                    num_classes=len(meta.class_names),
                    param_counts=adapter.change_counts(),
                )
            )
            if alias is not None:
                s.flush()  # the version row exists before the alias names it
                _point_alias(s, meta.task, alias, [Share(version, PLAIN_WEIGHT)])
        return self.get(meta.task, version)

    # ------------------------------------------------------------------------------ mutations

    def set_alias(self, task: str, alias: str, version: int) -> None:
        """Point ``alias`` at one version (a weighted alias becomes a plain one)."""
        self.set_split(task, alias, {version: PLAIN_WEIGHT})

    def set_split(self, task: str, alias: str, weights: Mapping[int, int]) -> list[Share]:
        """Make ``alias`` a weighted alias over ``weights`` (version → weight; one version makes
        a plain alias). Every version must exist; in one transaction, so a refusal changes
        nothing. Returns the shares in version order."""
        check_name(alias, "alias")
        shares = check_split(weights)
        with self.catalog.write() as s:
            # Alias writes of one task take turns on its task row (SQLite's writers take turns
            # already): two replicas naming a new alias at once must not leave both versions.
            s.execute(select(TaskRow.name).where(TaskRow.name == task).with_for_update())
            found = set(
                s.execute(
                    select(AdapterRow.version).where(
                        AdapterRow.task == task, AdapterRow.version.in_(list(weights))
                    )
                ).scalars()
            )
            missing = sorted(set(weights) - found)
            if missing:
                raise AdapterNotFound(
                    f"task {task!r} has no version {', '.join(map(str, missing))}"
                )
            _point_alias(s, task, alias, shares)
        return shares

    def remove_alias(self, task: str, alias: str) -> None:
        with self.catalog.write() as s:
            result = cast(
                CursorResult[Any],
                s.execute(delete(AliasRow).where(AliasRow.task == task, AliasRow.alias == alias)),
            )
            if result.rowcount == 0:
                raise AdapterNotFound(f"task {task!r} has no alias {alias!r}")

    def delete(self, task: str, version: int) -> AdapterRecord:
        """Hard-delete one version and its aliases (the blob is left for :meth:`gc`)."""
        record = self.get(task, version)
        with self.catalog.write() as s:
            s.execute(delete(AliasRow).where(AliasRow.task == task, AliasRow.version == version))
            s.execute(
                delete(AdapterRow).where(AdapterRow.task == task, AdapterRow.version == version)
            )
        return record

    def add_usage(self, deltas: Mapping[tuple[str, int], UsageDelta]) -> int:
        """Add one replica's counts per ``(task, version)`` (see :mod:`adapters_store.usage`)."""
        return add_usage(self.catalog, deltas)

    # ------------------------------------------------------------------------------ blobs

    def read_bytes(self, record: AdapterRecord) -> bytes:
        """The adapter file, verified against its digest (:class:`ChecksumMismatch` if corrupted)."""
        return self.blobs.get(record.digest)

    def load(self, record: AdapterRecord, base: ServingBase) -> Adapter:
        """Read, verify and decode an adapter and check it against ``base`` with every rule of
        registration (the store may hold files from before some of them)."""
        adapter = decode_adapter(self.read_bytes(record), self.limits)
        check_against_base(adapter, base.signature, self.limits)
        check_servable(adapter, base.signature, base.weights)
        return adapter

    def referenced_digests(self) -> set[str]:
        """Every digest a catalog row references."""
        with self.catalog.read() as s:
            return set(s.execute(select(AdapterRow.digest)).scalars())

    def entries(self) -> builtins.list[tuple[str, int, str]]:
        """``(task, version, digest)`` of every catalogued adapter (what fsck walks)."""
        with self.catalog.read() as s:
            rows = s.execute(select(AdapterRow.task, AdapterRow.version, AdapterRow.digest))
            return [(task, version, digest) for task, version, digest in rows]

    def gc(self, grace_seconds: float = 3600.0) -> builtins.list[str]:
        """Delete blobs no catalog row references and untouched for ``grace_seconds``."""
        return maintenance.gc(self, grace_seconds)

    def fsck(self, repair: bool = False, grace_seconds: float = 3600.0) -> FsckReport:
        """Report (and with ``repair``, fix) disagreements between catalog and blobs."""
        return maintenance.fsck(self, repair, grace_seconds)

    # ------------------------------------------------------------------------------ export

    def merged_state(
        self, record: AdapterRecord, net: torch.nn.Module, base: BaseSignature
    ) -> dict[str, torch.Tensor]:
        """The dense task model: the base's full ``state_dict`` with the residual merged in, plus
        the head under ``head.`` and the class embeddings under ``text.class_embeddings``."""
        if base.fingerprint != record.base_fingerprint:
            raise IncompatibleBase(
                f"{record.task} v{record.version} needs base {record.base_fingerprint[:12]}…"
            )
        adapter = self.load(record, ServingBase.of(net, base))
        state = merge_state(dict(net.state_dict()), adapter)
        state.update({f"head.{k}": v for k, v in adapter.head.items()})
        if adapter.class_embeddings is not None:
            state["text.class_embeddings"] = adapter.class_embeddings
        return state
