"""The registry's read side: catalog rows as records, resolved, listed and counted.

:class:`CatalogReads` holds every query of :class:`~adapters_store.registry.Registry`, which
adds the writes (registration, aliases, deletion), the blobs and maintenance on top of it.
"""

from __future__ import annotations

import builtins
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from .blobs import check_digest
from .catalog import Catalog
from .errors import AdapterNotFound, InvalidRequest
from .format.schema import META_FIELDS, head_meta
from .models import AdapterRow, AliasRow, BaseModelRow
from .names import check_name
from .records import AdapterRecord, Page, iso_utc

DEFAULT_ALIAS = "production"


def _detached(value: Any) -> Any:
    """A copy of a JSON column's list or dict, so records share nothing with the session."""
    return type(value)(value) if isinstance(value, list | dict) else value


class CatalogReads:
    """Reads of the catalog, as records (each with its aliases and its base's names)."""

    catalog: Catalog

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
        with self.catalog.read(snapshot=True) as s:  # the alias and its version read together
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
