"""What the registry hands out: detached catalog records, pages, registration and fsck results."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from .format.schema import DOC, AdapterMeta

# Record fields the listing view leaves out (it adds ``num_classes`` instead of the names).
SUMMARY_OMITS = ("param_counts", "train_config", "class_names", "head")


@dataclass(kw_only=True)
class AdapterRecord(AdapterMeta):
    """A catalog entry, detached from any database session: the adapter's metadata (every field
    of the schema, :class:`~adapters_store.format.schema.AdapterMeta`) plus what the catalog adds.

    Write-once: records are shared between threads and caches, so after construction no field
    can be reassigned (as with a frozen dataclass, which cannot extend the mutable metadata).
    """

    version: int = field(metadata={DOC: "Version number within the task (never reused)."})
    digest: str = field(metadata={DOC: "SHA-256 of the adapter file."})
    size_bytes: int = field(metadata={DOC: "Size of the adapter file."})
    param_counts: dict[str, int] = field(metadata={DOC: "Changed weights per base parameter."})
    registered_at: str = field(metadata={DOC: "When the catalog registered it (UTC)."})
    aliases: list[str] = field(
        default_factory=list, metadata={DOC: "Aliases pointing at this version."}
    )
    alias_shares: dict[str, float] = field(
        default_factory=dict,
        metadata={
            DOC: "Per alias naming this version, the percentage of the alias's traffic it gets "
            "(100 for a plain alias; less for a weighted one)."
        },
    )
    requests: int = field(default=0, metadata={DOC: "Requests served, all replicas together."})
    images: int = field(default=0, metadata={DOC: "Images served, all replicas together."})
    errors: int = field(default=0, metadata={DOC: "Requests resolved to this version that failed."})
    last_served_at: str | None = field(
        default=None, metadata={DOC: "When a replica last served it (UTC); null if never."}
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def summary(self) -> dict[str, Any]:
        """The listing view (no per-parameter counts, no train config, no class names)."""
        out = self.to_dict()
        for key in SUMMARY_OMITS:
            out.pop(key)
        out["num_classes"] = len(self.class_names)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (type(v)(v) if isinstance(v, list | dict) else v) for k, v in self.__dict__.items()
        }


@dataclass(frozen=True)
class Registration:
    record: AdapterRecord
    created: bool


@dataclass(frozen=True)
class Page:
    items: list[AdapterRecord]
    total: int
    limit: int
    offset: int


@dataclass
class FsckReport:
    dangling_rows: list[tuple[str, int, str]] = field(
        default_factory=list
    )  # row whose blob is missing
    corrupt_blobs: list[str] = field(default_factory=list)
    orphan_blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.dangling_rows or self.corrupt_blobs or self.orphan_blobs or self.temp_files
        )


def iso_utc(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
