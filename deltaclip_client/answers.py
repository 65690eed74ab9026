"""The one answer this client reads without a model of :mod:`deltaclip_api`: a catalog page.

Predictions, registrations, deletions, aliases, health and the error body are read with the
models the server declares in its OpenAPI document (:mod:`deltaclip_api`). A catalog entry
carries every metadata field of the adapter format, which grows with the format, so a page
keeps its entries as the JSON objects the server sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterPage:
    """``GET /adapters``: one page of version summaries (dicts, as the server lists them)."""

    total: int
    limit: int
    offset: int
    items: list[dict[str, Any]]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AdapterPage:
        return cls(int(body["total"]), int(body["limit"]), int(body["offset"]), body["items"])
