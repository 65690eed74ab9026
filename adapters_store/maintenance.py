"""Store maintenance: garbage collection of unreferenced blobs and the catalog/blob consistency
check (``deltaclip adapters gc`` / ``fsck``), as :class:`~adapters_store.registry.Registry`
methods delegate them.

They work through the registry's public surface only (:class:`Store`), so this module does not
import the registry and the registry can import it.
"""

from __future__ import annotations

from typing import Protocol

from .blobs import BlobStore
from .dbblobs import DatabaseBlobStore
from .errors import BlobNotFound, ChecksumMismatch
from .records import AdapterRecord, FsckReport


class Store(Protocol):
    """What gc and fsck need of a registry."""

    @property
    def blobs(self) -> BlobStore | DatabaseBlobStore: ...

    def referenced_digests(self) -> set[str]: ...

    def entries(self) -> list[tuple[str, int, str]]: ...

    def find_by_digest(self, digest: str) -> AdapterRecord | None: ...

    def delete(self, task: str, version: int) -> AdapterRecord: ...


def gc(registry: Store, grace_seconds: float = 3600.0) -> list[str]:
    """Delete blobs no catalog row references and untouched for ``grace_seconds``."""
    referenced = registry.referenced_digests()
    removed = []
    for digest in list(registry.blobs.digests()):
        # Re-check the catalog right before deleting: a registration may have landed meanwhile.
        if (
            digest not in referenced
            and registry.blobs.age_seconds(digest) >= grace_seconds
            and registry.find_by_digest(digest) is None
            and registry.blobs.delete(digest)
        ):
            removed.append(digest)
    return removed


def fsck(registry: Store, repair: bool = False, grace_seconds: float = 3600.0) -> FsckReport:
    """Report (and with ``repair``, fix) disagreements between catalog and blobs.

    Repair removes temporary files and orphan blobs older than ``grace_seconds`` (a younger
    one may belong to a registration in flight, whose row is about to land), and deletes rows
    whose blob is missing or corrupted (their bytes are gone; re-register the file).
    """
    report = FsckReport()
    rows = registry.entries()
    referenced = {d for _, _, d in rows}
    for task, version, digest in rows:
        try:
            registry.blobs.get(digest)
        except BlobNotFound:
            report.dangling_rows.append((task, version, digest))
        except ChecksumMismatch:
            report.corrupt_blobs.append(digest)
            report.dangling_rows.append((task, version, digest))
    report.orphan_blobs = [d for d in registry.blobs.digests() if d not in referenced]
    report.temp_files = [str(p) for p in registry.blobs.temp_files()]
    if repair:
        for path in registry.blobs.temp_files():
            path.unlink(missing_ok=True)
            report.repaired.append(f"removed temporary file {path.name}")
        for digest in report.orphan_blobs:
            if (
                registry.blobs.age_seconds(digest) >= grace_seconds
                and registry.find_by_digest(digest) is None
            ):
                registry.blobs.delete(digest)
                report.repaired.append(f"removed orphan blob {digest}")
        for task, version, digest in report.dangling_rows:
            registry.delete(task, version)
            if digest in report.corrupt_blobs:
                registry.blobs.delete(digest)
            report.repaired.append(f"removed {task} v{version}: its blob was missing or corrupted")
    return report
