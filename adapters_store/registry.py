"""The registry: catalog rows joined with content-addressed blobs.

Registration runs validate → blob → rows, in that order, so a failure or crash at any step leaves
no catalog row pointing at a missing blob (at worst an unreferenced blob, which :meth:`gc`
removes); the rows (base, version, alias) are one transaction. Deletion is *hard*: the row and its aliases go at once, the version number is never
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
from .admission import admit
from .bases import BaseSignature
from .blobs import BlobStore, check_digest, sha256_hex
from .catalog import Catalog
from .config import StoreSettings
from .dbblobs import DatabaseBlobStore
from .errors import (
    AdapterNotFound,
    AlreadyExists,
    IncompatibleBase,
    InvalidRequest,
)
from .format.codec import DEFAULT_LIMITS, Limits, check_against_base, decode_adapter
from .format.schema import META_FIELDS, catalog_values, head_meta
from .format.servable import check_servable
from .models import AdapterRow, AliasRow, BaseModelRow, TaskRow
from .names import check_name
from .records import AdapterRecord, FsckReport, Page, Registration, iso_utc
from .serving_base import ServingBase

DEFAULT_ALIAS = "production"


def _detached(value: Any) -> Any:
    """A copy of a JSON column's list or dict, so records share nothing with the session."""
    return type(value)(value) if isinstance(value, list | dict) else value


def _point_alias(session: Session, task: str, alias: str, version: int) -> None:
    row = session.get(AliasRow, (task, alias))
    if row is None:
        session.add(AliasRow(task=task, alias=alias, version=version))
    else:
        row.version = version


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
                **catalog_values(meta), version=version, digest=digest, size_bytes=size,
                num_classes=len(meta.class_names), param_counts=adapter.change_counts(),
            ))  # fmt: skip
            if alias is not None:
                s.flush()  # the version row exists before the alias names it
                _point_alias(s, meta.task, alias, version)
        return self.get(meta.task, version)

    # ------------------------------------------------------------------------------ queries

    def _query(self) -> Any:
        return select(
            AdapterRow, BaseModelRow.model, BaseModelRow.pretrained, BaseModelRow.embed_dim
        ).join(BaseModelRow, BaseModelRow.fingerprint == AdapterRow.base_fingerprint)

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
        # The metadata comes from the row's columns as the schema maps them; the base's names
        # from the joined base row, and the head from the class count and the base's width
        # (check_against_base made the file's head agree with both before the row was written).
        return [
            AdapterRecord(
                **{f.name: _detached(getattr(r, f.column)) for f in META_FIELDS if f.column},
                base_model=model,
                base_pretrained=pretrained,
                head=head_meta(dim, r.num_classes),
                version=r.version,
                digest=r.digest,
                size_bytes=r.size_bytes,
                param_counts=dict(r.param_counts),
                registered_at=iso_utc(r.registered_at),
                aliases=aliases.get((r.task, r.version), []),
            )
            for r, model, pretrained, dim in rows
        ]

    def find_by_digest(self, digest: str) -> AdapterRecord | None:
        """The adapter whose file hashes to ``digest``, or None when none is catalogued."""
        check_digest(digest)
        with self.catalog.read() as s:
            found = self._records(s, self._query().where(AdapterRow.digest == digest))
        return found[0] if found else None

    def get_by_digest(self, digest: str) -> AdapterRecord:
        record = self.find_by_digest(digest)
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
            raise InvalidRequest("give a version or an alias, not both")
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
            raise InvalidRequest("limit must be 1..1000 and offset >= 0")
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
            _point_alias(s, task, alias, version)

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
