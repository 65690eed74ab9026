"""Usage per version in the catalog: requests, images, errors and when it was last served.

Each server replica counts in memory and adds its counts here in batches (``server/usage.py``);
:func:`add_usage` adds a batch with one upsert per version (``count = count + delta``), so every
replica's counts add up in one row per version over the shared catalog, whatever the order.
The reads sort and filter the listing by these columns (:data:`SORTS`, :func:`parse_age`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import case, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .catalog import Catalog
from .errors import AlreadyExists, InvalidRequest
from .models import AdapterRow, UsageRow

AGE_PATTERN = r"^[0-9]{1,6}[smhdw]$"
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Sort = Literal["task", "requests", "images", "errors", "last_served"]

SORTS: dict[str, tuple[Any, ...]] = {
    "task": (),
    "requests": (UsageRow.requests.desc().nulls_last(),),
    "images": (UsageRow.images.desc().nulls_last(),),
    "errors": (UsageRow.errors.desc().nulls_last(),),
    "last_served": (UsageRow.last_served_at.desc().nulls_last(),),
}
"""Listing orders: each sorts by its column, then by task and newest version first."""
assert set(SORTS) == set(get_args(Sort))


def parse_age(text: str) -> float:
    """``"30d"`` as seconds: a count and one unit of ``s m h d w``."""
    if not re.fullmatch(AGE_PATTERN, text):
        raise InvalidRequest(f"{text!r}: give a count and a unit of s, m, h, d, w (e.g. 30d)")
    return float(int(text[:-1]) * _UNIT_SECONDS[text[-1]])


def check_sort(sort: str) -> tuple[Any, ...]:
    if sort not in SORTS:
        raise InvalidRequest(f"sort must be one of {', '.join(SORTS)}")
    return SORTS[sort]


@dataclass
class UsageDelta:
    """What one replica counted for one version since its last batch."""

    requests: int = 0
    images: int = 0
    errors: int = 0
    last_served_at: dt.datetime | None = None

    def merge(self, other: UsageDelta) -> None:
        self.requests += other.requests
        self.images += other.images
        self.errors += other.errors
        if other.last_served_at is not None and (
            self.last_served_at is None or other.last_served_at > self.last_served_at
        ):
            self.last_served_at = other.last_served_at


def _upsert(session: Session, rows: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    table: Any = UsageRow.__table__
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table).values(rows)
    new, old = ins.excluded.last_served_at, table.c.last_served_at
    latest = case((new.is_(None), old), (old.is_(None), new), (new > old, new), else_=old)
    session.execute(
        ins.on_conflict_do_update(
            index_elements=["task", "version"],
            set_={
                "requests": table.c.requests + ins.excluded.requests,
                "images": table.c.images + ins.excluded.images,
                "errors": table.c.errors + ins.excluded.errors,
                "last_served_at": latest,
            },
        )
    )


def add_usage(catalog: Catalog, deltas: Mapping[tuple[str, int], UsageDelta]) -> int:
    """Add ``deltas`` to the catalog in one transaction; versions deleted meanwhile are skipped.
    Returns how many versions were updated. All or nothing: on an error nothing was added."""
    if not deltas:
        return 0
    for attempt in range(2):
        try:
            with catalog.write() as s:
                keys = list(deltas)
                found = s.execute(
                    select(AdapterRow.task, AdapterRow.version).where(
                        tuple_(AdapterRow.task, AdapterRow.version).in_(keys)
                    )
                )
                live = {(task, version) for task, version in found}
                rows = [_row(key, deltas[key]) for key in keys if key in live]
                if rows:
                    _upsert(s, rows)
                return len(rows)
        except AlreadyExists:  # a version deleted between the check and the write (PostgreSQL)
            if attempt:
                raise
    raise AssertionError("unreachable")


def _row(key: tuple[str, int], delta: UsageDelta) -> dict[str, Any]:
    last = delta.last_served_at
    if last is not None:  # as UTC: SQLite keeps the fields and drops the zone
        last = last.astimezone(dt.UTC)
    return {
        "task": key[0],
        "version": key[1],
        "requests": delta.requests,
        "images": delta.images,
        "errors": delta.errors,
        "last_served_at": last,
    }
