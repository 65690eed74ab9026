"""Response models of the catalog read routes, derived from the store's record.

:class:`~adapters_store.records.AdapterRecord` extends the adapter metadata schema
(``adapters_store/format/schema.py``) with what the catalog adds; these models take their fields,
types and descriptions from it, so OpenAPI documents exactly what the routes return and a new
metadata field appears here without an edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from pydantic import BaseModel, Field, create_model

from adapters_store.format.schema import DOC
from adapters_store.records import SUMMARY_OMITS, AdapterRecord
from deltaclip_api import AliasShare


def _record_fields(omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """``create_model`` field definitions for the record's fields, bar ``omit``."""
    hints = get_type_hints(AdapterRecord)
    return {
        f.name: (hints[f.name], Field(description=f.metadata.get(DOC)))
        for f in dataclasses.fields(AdapterRecord)
        if f.name not in omit
    }


_Detail: Any = create_model("AdapterDetail", **_record_fields())
_Summary: Any = create_model(
    "AdapterSummary",
    **_record_fields(SUMMARY_OMITS),
    num_classes=(int, Field(description="Number of classes.")),
)


class AdapterDetail(_Detail):
    """Every field of one adapter version, with its per-parameter change counts."""


class AdapterSummary(_Summary):
    """One adapter version in a listing (no class names, train config or change counts)."""


class AdapterPage(BaseModel):
    """One page of the catalog listing."""

    total: int = Field(description="Adapters matching the filters, over all pages.")
    limit: int
    offset: int
    items: list[AdapterSummary]


class TaskVersions(BaseModel):
    """A task's versions (oldest first) and its aliases."""

    task: str
    aliases: dict[str, int] = Field(
        description="Alias → version (for a weighted alias, its heaviest version)."
    )
    splits: dict[str, list[AliasShare]] = Field(
        description="Alias → every version it names with its weight (one for a plain alias)."
    )
    versions: list[AdapterSummary]
