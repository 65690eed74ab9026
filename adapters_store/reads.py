"""The registry's read side: catalog rows as records, resolved, listed and counted.

:class:`CatalogReads` holds every query of :class:`~adapters_store.registry.Registry`, which
adds the writes (registration, aliases, deletion), the blobs and maintenance on top of it.
"""

from __future__ import annotations

import builtins
import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, func, or_, select, tuple_
from sqlalchemy.orm import Session

from .blobs import check_digest
from .catalog import Catalog
from .errors import AdapterNotFound, InvalidRequest
from .format.schema import META_FIELDS, head_meta
from .models import AdapterRow, AliasRow, BaseModelRow, UsageRow
from .names import check_name
from .records import AdapterRecord, Page, iso_utc
from .splits import Share, heaviest, pick
from .usage import check_sort

DEFAULT_ALIAS = "production"


def _detached(value: Any) -> Any:
    """A copy of a JSON column's list or dict, so records share nothing with the session."""
    return type(value)(value) if isinstance(value, list | dict) else value


class CatalogReads:
    """Reads of the catalog, as records (each with its aliases and its base's names)."""

    catalog: Catalog

    def _query(self) -> Any:
        return (
            select(
                AdapterRow,
                BaseModelRow.model,
                BaseModelRow.pretrained,
                BaseModelRow.embed_dim,
                UsageRow,
            )
            .join(BaseModelRow, BaseModelRow.fingerprint == AdapterRow.base_fingerprint)
            .outerjoin(UsageRow, _usage_of_adapter())
        )

    def _records(self, s: Session, stmt: Any) -> builtins.list[AdapterRecord]:
        rows = s.execute(stmt).all()
        if not rows:
            return []
        tasks = {r[0].task for r in rows}
        splits: dict[tuple[str, str], list[Share]] = defaultdict(list)
        for a in s.execute(
            select(AliasRow).where(AliasRow.task.in_(tasks)).order_by(AliasRow.alias)
        ).scalars():
            splits[(a.task, a.alias)].append(Share(a.version, a.weight))
        shares: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
        for (task, alias), named in splits.items():
            total = sum(share.weight for share in named)
            for share in named:
                shares[(task, share.version)][alias] = round(100 * share.weight / total, 2)
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
                aliases=list(shares.get((r.task, r.version), {})),
                alias_shares=dict(shares.get((r.task, r.version), {})),
                **_usage_fields(usage),
            )
            for r, model, pretrained, dim, usage in rows
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
        self,
        task: str,
        version: int | None = None,
        alias: str | None = None,
        key: str | None = None,
    ) -> AdapterRecord:
        """``version``, else ``alias``, else alias ``production`` if set, else the newest version.

        A weighted alias picks one of its versions for the client ``key`` (the same one for the
        same key, :func:`~adapters_store.splits.pick`), or at random by weight without one."""
        return self._resolve(
            task, version, alias, lambda name, shares: pick(task, name, shares, key)
        )

    def pinned(self, task: str) -> AdapterRecord:
        """What a pin of ``task`` holds: :meth:`resolve` without a version or an alias, but of a
        weighted ``production`` alias its heaviest version (the one most clients get), never a
        random one."""
        return self._resolve(task, None, None, lambda _, shares: heaviest(shares).version)

    def _resolve(
        self,
        task: str,
        version: int | None,
        alias: str | None,
        choose: Callable[[str, builtins.list[Share]], int],
    ) -> AdapterRecord:
        check_name(task, "task")
        if version is not None and alias is not None:
            raise InvalidRequest("give a version or an alias, not both")
        if version is not None:
            return self.get(task, version)
        if alias is not None:
            check_name(alias, "alias")
        name = alias if alias is not None else DEFAULT_ALIAS
        with self.catalog.read(snapshot=True) as s:  # the alias and its version read together
            shares = _shares(s, task, name)
            target: int | None
            if shares:
                target = choose(name, shares)
            elif alias is not None:
                raise AdapterNotFound(f"task {task!r} has no alias {alias!r}")
            else:
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
        alias: str | None = None,
        sort: str = "task",
        unused_since: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page:
        """Adapters newest first within each task, tasks in name order; filters combine with AND.

        Args:
            base: a base model name or a base fingerprint.
            domain: matches the source or the target domain.
            alias: only the versions this alias names (in any task).
            sort: ``task`` (the order above), or ``requests``, ``images``, ``errors``,
                ``last_served``: most first, then the order above.
            unused_since: only versions not served in the last this many seconds (or never).
        """
        if not (1 <= limit <= 1000) or offset < 0:
            raise InvalidRequest("limit must be 1..1000 and offset >= 0")
        order = (*check_sort(sort), AdapterRow.task, AdapterRow.version.desc())
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
        if alias is not None:
            named = select(AliasRow.task, AliasRow.version).where(AliasRow.alias == alias)
            conds.append(tuple_(AdapterRow.task, AdapterRow.version).in_(named))
        if unused_since is not None:
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=unused_since)
            conds.append(or_(UsageRow.last_served_at.is_(None), UsageRow.last_served_at < cutoff))
        # Page first (ordered on the (task, version) index, or on a usage column), then join the
        # base names for just that page; the count never joins the bases.
        page = select(AdapterRow.id).outerjoin(UsageRow, _usage_of_adapter()).where(*conds)
        ids = page.order_by(*order).limit(limit).offset(offset).subquery()
        stmt = self._query().join(ids, ids.c.id == AdapterRow.id).order_by(*order)
        count = (
            select(func.count())
            .select_from(AdapterRow)
            .outerjoin(UsageRow, _usage_of_adapter())
            .where(*conds)
        )
        with self.catalog.read() as s:
            return Page(self._records(s, stmt), int(s.execute(count).scalar_one()), limit, offset)

    def versions(self, task: str) -> builtins.list[AdapterRecord]:
        with self.catalog.read() as s:
            return self._records(
                s, self._query().where(AdapterRow.task == task).order_by(AdapterRow.version)
            )

    def aliases(self, task: str) -> dict[str, int]:
        """Alias → its version; for a weighted alias, its heaviest (the lowest among equals)."""
        return {alias: heaviest(shares).version for alias, shares in self.splits(task).items()}

    def splits(self, task: str) -> dict[str, builtins.list[Share]]:
        """Alias → the versions it names with their weights, in version order."""
        out: dict[str, builtins.list[Share]] = {}
        with self.catalog.read() as s:
            rows = s.execute(
                select(AliasRow.alias, AliasRow.version, AliasRow.weight)
                .where(AliasRow.task == task)
                .order_by(AliasRow.alias, AliasRow.version)
            ).all()
        for alias, version, weight in rows:
            out.setdefault(alias, []).append(Share(version, weight))
        return out


def _usage_of_adapter() -> Any:
    return and_(UsageRow.task == AdapterRow.task, UsageRow.version == AdapterRow.version)


def _usage_fields(usage: UsageRow | None) -> dict[str, Any]:
    if usage is None:
        return {}
    return {
        "requests": usage.requests,
        "images": usage.images,
        "errors": usage.errors,
        "last_served_at": iso_utc(usage.last_served_at) or None,
    }


def _shares(s: Session, task: str, alias: str) -> builtins.list[Share]:
    rows = s.execute(
        select(AliasRow.version, AliasRow.weight).where(
            AliasRow.task == task, AliasRow.alias == alias
        )
    ).all()
    return [Share(version, weight) for version, weight in rows]
