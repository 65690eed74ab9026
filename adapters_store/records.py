"""What the registry hands out: detached catalog records, pages, registration and fsck results."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdapterRecord:
    """A catalog entry, detached from any database session."""

    task: str
    version: int
    digest: str
    base_fingerprint: str
    base_model: str
    base_pretrained: str
    source_domain: str
    target_domain: str
    method: str
    class_names: list[str]
    residual_dtype: str
    nnz: int
    eligible_params: int
    density: float
    size_bytes: int
    metrics: dict[str, Any]
    train_config: dict[str, Any]
    param_counts: dict[str, int]
    created_at: str
    registered_at: str
    aliases: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The listing view (no per-parameter counts, no train config)."""
        out = self.to_dict()
        for key in ("param_counts", "train_config", "class_names"):
            out.pop(key)
        out["num_classes"] = len(self.class_names)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


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
