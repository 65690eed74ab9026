"""The registry: catalog rows joined with content-addressed blobs.

Registration runs validate → blob → row, in that order, so a failure or crash at any step leaves
no catalog row pointing at a missing blob (at worst an unreferenced blob, which :meth:`gc`
removes). Deletion is *hard*: the row and its aliases go at once, the version number is never
handed out again, and the blob stays until :meth:`gc` finds it unreferenced and older than a
grace period (so a concurrent re-registration of the same bytes can never lose its blob).
"""

from __future__ import annotations

import builtins
from typing import Any, cast

import torch
from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from . import maintenance
from .adapter import Adapter, merge_state
from .bases import BaseSignature
from .blobs import BlobStore, check_digest, sha256_hex
from .catalog import Catalog
from .config import StoreSettings
from .dbblobs import DatabaseBlobStore
from .errors import (
    AdapterNotFound,
    AlreadyExists,
    IncompatibleBase,
    InvalidAdapter,
)
from .format.codec import DEFAULT_LIMITS, Limits, check_against_base, decode_adapter
from .models import AdapterRow, AliasRow, BaseModelRow, TaskRow
from .names import check_name
from .records import AdapterRecord, FsckReport, Page, Registration, iso_utc

DEFAULT_ALIAS = "production"
# Free-text metadata kept in catalog columns of these sizes (models.py). The file format allows
# any text; the catalog refuses what it cannot store faithfully on every backend (PostgreSQL
# rejects NUL in text and over-long VARCHARs) or show safely (control characters in pages, logs).
_CATALOG_TEXT = {"source_domain": 256, "target_domain": 256, "method": 128, "created_at": 64}


def _check_catalog_text(adapter: Adapter) -> None:
    for key, longest in _CATALOG_TEXT.items():
        value: str = getattr(adapter.meta, key)
        if len(value) > longest or any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in value):
            shown = repr(value) if len(value) <= 80 else repr(value[:80]) + "…"
            raise InvalidAdapter(
                "metadata",
                f"{key} {shown} must be at most {longest} characters, none of them control characters",
            )


def _insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    session.execute(ins.values(**values).on_conflict_do_nothing())


class Registry:
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

    def register(self, data: bytes, base: BaseSignature, alias: str | None = None) -> Registration:
        """Validate ``data`` against ``base``, store it, catalogue it; idempotent for equal bytes.

        Raises:
            InvalidAdapter: the file breaks a format rule (``rule`` says which).
            IncompatibleBase: it was trained against other base weights.
        """
        if alias is not None:
            check_name(alias, "alias")
        digest = sha256_hex(data)
        existing = self._find_digest(digest)
        if existing is None:
            adapter = decode_adapter(data, self.limits)
            check_against_base(adapter, base, self.limits)
            _check_catalog_text(adapter)
            self.blobs.put(data, digest)
            try:
                record = self._insert(adapter, digest, len(data), base)
            except AlreadyExists:
                # The same bytes were registered concurrently; that registration won.
                existing = self._find_digest(digest)
                if existing is None:
                    raise
        if existing is not None:
            self.blobs.put(data, digest)  # re-create a blob lost to an interrupted gc or disk loss
            if alias is not None:
                self.set_alias(existing.task, alias, existing.version)
                existing = self.get(existing.task, existing.version)
            return Registration(existing, created=False)
        if alias is not None:
            self.set_alias(record.task, alias, record.version)
            record = self.get(record.task, record.version)
        return Registration(record, created=True)

    def _insert(
        self, adapter: Adapter, digest: str, size: int, base: BaseSignature
    ) -> AdapterRecord:
        meta = adapter.meta
        with self.catalog.write() as s:
            _insert_ignore(s, BaseModelRow.__table__, {
                "fingerprint": base.fingerprint, "model": base.model, "pretrained": base.pretrained,
                "embed_dim": base.embed_dim, "eligible_params": base.eligible_params,
            })  # fmt: skip
            _insert_ignore(s, TaskRow.__table__, {"name": meta.task, "last_version": 0})
            version = s.execute(
                update(TaskRow)
                .where(TaskRow.name == meta.task)
                .values(last_version=TaskRow.last_version + 1)
                .returning(TaskRow.last_version)
            ).scalar_one()
            s.add(AdapterRow(
                task=meta.task, version=version, digest=digest, base_fingerprint=base.fingerprint,
                source_domain=meta.source_domain, target_domain=meta.target_domain, method=meta.method,
                class_names=meta.class_names, num_classes=len(meta.class_names),
                residual_dtype=meta.residual_dtype, nnz=meta.nnz, eligible_params=meta.eligible_params,
                density=meta.density, size_bytes=size, metrics=meta.metrics, train_config=meta.train_config,
                param_counts=adapter.change_counts(), adapter_created_at=meta.created_at,
            ))  # fmt: skip
        return self.get(meta.task, version)

    # ------------------------------------------------------------------------------ queries

    def _query(self) -> Any:
        return select(AdapterRow, BaseModelRow.model, BaseModelRow.pretrained).join(
            BaseModelRow, BaseModelRow.fingerprint == AdapterRow.base_fingerprint
        )

    def _records(self, s: Session, stmt: Any) -> builtins.list[AdapterRecord]:
        rows = s.execute(stmt).all()
        if not rows:
            return []
        keys = {(r[0].task, r[0].version) for r in rows}
        aliases: dict[tuple[str, int], list[str]] = {}
        tasks = {t for t, _ in keys}
        for a in s.execute(
            select(AliasRow).where(AliasRow.task.in_(tasks)).order_by(AliasRow.alias)
        ).scalars():
            aliases.setdefault((a.task, a.version), []).append(a.alias)
        return [
            AdapterRecord(
                task=r.task,
                version=r.version,
                digest=r.digest,
                base_fingerprint=r.base_fingerprint,
                base_model=model,
                base_pretrained=pretrained,
                source_domain=r.source_domain,
                target_domain=r.target_domain,
                method=r.method,
                class_names=list(r.class_names),
                residual_dtype=r.residual_dtype,
                nnz=r.nnz,
                eligible_params=r.eligible_params,
                density=r.density,
                size_bytes=r.size_bytes,
                metrics=dict(r.metrics),
                train_config=dict(r.train_config),
                param_counts=dict(r.param_counts),
                created_at=r.adapter_created_at,
                registered_at=iso_utc(r.registered_at),
                aliases=aliases.get((r.task, r.version), []),
            )
            for r, model, pretrained in rows
        ]

    def _find_digest(self, digest: str) -> AdapterRecord | None:
        with self.catalog.read() as s:
            found = self._records(s, self._query().where(AdapterRow.digest == digest))
        return found[0] if found else None

    def get_by_digest(self, digest: str) -> AdapterRecord:
        check_digest(digest)
        record = self._find_digest(digest)
        if record is None:
            raise AdapterNotFound(f"no adapter with digest {digest}")
        return record

    def get(self, task: str, version: int) -> AdapterRecord:
        with self.catalog.read() as s:
            found = self._records(
                s, self._query().where(AdapterRow.task == task, AdapterRow.version == version)
            )
        if not found:
            raise AdapterNotFound(f"task {task!r} has no version {version}")
        return found[0]

    def resolve(
        self, task: str, version: int | None = None, alias: str | None = None
    ) -> AdapterRecord:
        """``version``, else ``alias``, else alias ``production`` if set, else the newest version."""
        check_name(task, "task")
        if version is not None and alias is not None:
            raise ValueError("give a version or an alias, not both")
        if version is not None:
            return self.get(task, version)
        with self.catalog.read() as s:
            if alias is not None:
                check_name(alias, "alias")
                target = s.execute(
                    select(AliasRow.version).where(AliasRow.task == task, AliasRow.alias == alias)
                ).scalar()
                if target is None:
                    raise AdapterNotFound(f"task {task!r} has no alias {alias!r}")
            else:
                target = s.execute(
                    select(AliasRow.version).where(
                        AliasRow.task == task, AliasRow.alias == DEFAULT_ALIAS
                    )
                ).scalar()
                if target is None:
                    target = s.execute(
                        select(func.max(AdapterRow.version)).where(AdapterRow.task == task)
                    ).scalar()
                if target is None:
                    raise AdapterNotFound(f"no adapter registered for task {task!r}")
            found = self._records(
                s, self._query().where(AdapterRow.task == task, AdapterRow.version == target)
            )
        if not found:
            raise AdapterNotFound(f"task {task!r} has no version {target}")
        return found[0]

    def list(
        self,
        *,
        task: str | None = None,
        base: str | None = None,
        domain: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page:
        """Adapters newest first within each task, tasks in name order; filters combine with AND.

        Args:
            base: a base model name or a base fingerprint.
            domain: matches the source or the target domain.
        """
        if not (1 <= limit <= 1000) or offset < 0:
            raise ValueError("limit must be 1..1000 and offset >= 0")
        conds = []
        if task is not None:
            conds.append(AdapterRow.task == task)
        if base is not None:  # resolved on the small base table, then an indexed IN on adapters
            fingerprints = select(BaseModelRow.fingerprint).where(
                or_(BaseModelRow.model == base, BaseModelRow.fingerprint == base)
            )
            conds.append(AdapterRow.base_fingerprint.in_(fingerprints))
        if domain is not None:
            conds.append(
                or_(AdapterRow.source_domain == domain, AdapterRow.target_domain == domain)
            )
        # Page first (ordered on the (task, version) index), then join the base names for
        # just that page; the count never joins.
        page = select(AdapterRow.id).where(*conds)
        page = page.order_by(AdapterRow.task, AdapterRow.version.desc()).limit(limit).offset(offset)
        ids = page.subquery()
        stmt = self._query().join(ids, ids.c.id == AdapterRow.id)
        stmt = stmt.order_by(AdapterRow.task, AdapterRow.version.desc())
        count = select(func.count()).select_from(AdapterRow).where(*conds)
        with self.catalog.read() as s:
            return Page(self._records(s, stmt), int(s.execute(count).scalar_one()), limit, offset)

    def versions(self, task: str) -> builtins.list[AdapterRecord]:
        with self.catalog.read() as s:
            return self._records(
                s, self._query().where(AdapterRow.task == task).order_by(AdapterRow.version)
            )

    def aliases(self, task: str) -> dict[str, int]:
        with self.catalog.read() as s:
            rows = s.execute(
                select(AliasRow.alias, AliasRow.version).where(AliasRow.task == task)
            ).all()
        return dict(sorted((a, v) for a, v in rows))

    # ------------------------------------------------------------------------------ mutations

    def set_alias(self, task: str, alias: str, version: int) -> None:
        check_name(alias, "alias")
        with self.catalog.write() as s:
            exists = s.execute(
                select(AdapterRow.id).where(AdapterRow.task == task, AdapterRow.version == version)
            ).scalar()
            if exists is None:
                raise AdapterNotFound(f"task {task!r} has no version {version}")
            row = s.get(AliasRow, (task, alias))
            if row is None:
                s.add(AliasRow(task=task, alias=alias, version=version))
            else:
                row.version = version

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

    # ------------------------------------------------------------------------------ blobs

    def read_bytes(self, record: AdapterRecord) -> bytes:
        """The adapter file, verified against its digest (:class:`ChecksumMismatch` if corrupted)."""
        return self.blobs.get(record.digest)

    def load(self, record: AdapterRecord, base: BaseSignature | None = None) -> Any:
        """Read, verify and decode an adapter; check it against ``base`` when given."""
        adapter = decode_adapter(self.read_bytes(record), self.limits)
        if base is not None:
            check_against_base(adapter, base, self.limits)
        return adapter

    def referenced_digests(self) -> set[str]:
        with self.catalog.read() as s:
            return set(s.execute(select(AdapterRow.digest)).scalars())

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
        adapter = self.load(record, base)
        state = merge_state(dict(net.state_dict()), adapter)
        state.update({f"head.{k}": v for k, v in adapter.head.items()})
        if adapter.class_embeddings is not None:
            state["text.class_embeddings"] = adapter.class_embeddings
        return state
