"""Typed answers of the HTTP API (docs/API.md), read from its JSON.

Only what a program needs to act on is a field; each answer keeps its whole JSON in ``raw``
for the rest (catalog metadata grows with the format, and this client need not follow it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Label:
    """One label and its probability."""

    label: str
    score: float


def _rows(predictions: list[list[dict[str, Any]]]) -> list[list[Label]]:
    return [[Label(str(p["label"]), float(p["score"])) for p in row] for row in predictions]


@dataclass(frozen=True)
class Prediction:
    """``POST /predict``: the adapter that answered and, per image, its labels best first."""

    task: str
    version: int
    digest: str
    labels: list[list[Label]]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        return cls(body["task"], int(body["version"]), body["digest"],
                   _rows(body["predictions"]), body)  # fmt: skip


@dataclass(frozen=True)
class ZeroShot:
    """``POST /predict/zero-shot``: the base's fingerprint and, per image, its labels."""

    base_fingerprint: str
    labels: list[list[Label]]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ZeroShot:
        return cls(str(body["base"]["fingerprint"]), _rows(body["predictions"]), body)


@dataclass(frozen=True)
class Registration:
    """``POST /admin/adapters``: the version the file is (``created`` false: it already was)."""

    task: str
    version: int
    digest: str
    created: bool
    aliases: list[str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Registration:
        return cls(body["task"], int(body["version"]), body["digest"], bool(body["created"]),
                   list(body["aliases"]), body)  # fmt: skip


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
