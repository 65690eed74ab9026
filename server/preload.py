"""Warm restarts: which adapters to prepare before the server turns ready (``--preload``).

``top:N`` takes the N versions with the most requests in the catalog (all replicas together),
``alias:NAME`` every version the alias names (each version of a weighted alias), most requested
first; only adapters of the serving base. They are prepared in that order into the cache while
they fit in its budget (:meth:`~server.cache.AdapterCache.preload` never evicts for them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adapters_store.records import AdapterRecord
from adapters_store.registry import Registry

log = logging.getLogger("deltaclip.server")

_SPEC = re.compile(r"(top):([1-9][0-9]{0,4})|(alias):([A-Za-z0-9][A-Za-z0-9._-]{0,127})")
_PAGE = 1000


@dataclass(frozen=True)
class PreloadSpec:
    kind: str  # "top" or "alias"
    count: int = 0
    alias: str = ""


def parse_preload(spec: str) -> PreloadSpec:
    """``top:N`` (1..99999) or ``alias:NAME``; anything else is a :class:`ValueError`."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"preload {spec!r}: give top:N or alias:NAME")
    if match[1]:
        return PreloadSpec("top", count=int(match[2]))
    return PreloadSpec("alias", alias=match[4])


def _pages(
    registry: Registry, fingerprint: str, alias: str | None, most: int
) -> list[AdapterRecord]:
    found: list[AdapterRecord] = []
    while len(found) < most:
        limit = min(_PAGE, most - len(found))
        page = registry.list(
            base=fingerprint, alias=alias, sort="requests", limit=limit, offset=len(found)
        )
        found.extend(page.items)
        if len(page.items) < limit:
            break
    return found


def plan(registry: Registry, specs: Sequence[str], fingerprint: str) -> list[AdapterRecord]:
    """The versions ``specs`` name, in order, each digest once."""
    records: dict[str, AdapterRecord] = {}
    for text in specs:
        spec = parse_preload(text)
        if spec.kind == "top":
            chosen = _pages(registry, fingerprint, None, spec.count)
        else:
            chosen = _pages(registry, fingerprint, spec.alias, 10**9)
        for record in chosen:
            records.setdefault(record.digest, record)
    return list(records.values())


def preload(
    records: Sequence[AdapterRecord],
    keep: Callable[[AdapterRecord], bool],
    progress: Callable[[int, int], None],
) -> int:
    """Prepare ``records`` in order with ``keep`` (False: it did not fit); returns how many
    were kept. An adapter that fails to load is logged and passed over."""
    kept = 0
    for done, record in enumerate(records):
        progress(done, len(records))
        try:
            if keep(record):
                kept += 1
        except Exception as exc:
            log.warning("preload: %s v%d not loaded: %s", record.task, record.version, exc)
    progress(len(records), len(records))
    log.info("preloaded %d of %d adapters", kept, len(records))
    return kept
