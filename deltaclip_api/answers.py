"""The JSON bodies of the HTTP API (docs/API.md), one model per answer.

Readers ignore fields they do not know, so a server may add fields without breaking older
clients; removing or retyping one is a breaking change of API v1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Label(BaseModel):
    """One label and its probability."""

    label: str
    score: float = Field(ge=0, le=1, description="Probability, rounded to 6 decimals.")


class Prediction(BaseModel):
    """``POST /predict``: the adapter that answered and, per image, its labels best first."""

    task: str
    version: int = Field(ge=1)
    digest: str = Field(description="SHA-256 of the adapter file that answered.")
    path: Literal["patched", "mixed"] = Field(
        description="How it was served: the adapter patched into the weights (bit-identical to "
        "the merged model), or a mixed-task forward with its residual as a correction on its rows "
        '(docs/API.md, "Predictions"); also in the X-Deltaclip-Path header.'
    )
    predictions: list[list[Label]] = Field(description="One list per image, best label first.")


class BaseInfo(BaseModel):
    """The base model that answered a zero-shot request."""

    model: str
    pretrained: str
    fingerprint: str | None = Field(description="The base's fingerprint as loaded.")


class ZeroShot(BaseModel):
    """``POST /predict/zero-shot``: the base that answered and, per image, its labels."""

    base: BaseInfo
    predictions: list[list[Label]] = Field(description="One list per image, best label first.")


class Registration(BaseModel):
    """``POST /admin/adapters``: the version the file is (``created`` false: it already was)."""

    task: str
    version: int = Field(ge=1)
    digest: str
    created: bool = Field(description="False when the same bytes were already registered.")
    aliases: list[str] = Field(description="The aliases now pointing at this version.")
    nnz: int = Field(ge=0, description="Changed weights stored.")
    density: float = Field(ge=0, description="nnz / the base tower's weights.")
    size_bytes: int = Field(ge=0)


class AdapterRef(BaseModel):
    """One version of a task, by number and file digest."""

    task: str
    version: int = Field(ge=1)
    digest: str


class Deleted(BaseModel):
    """``DELETE /admin/adapters/{task}/versions/{version}``: what was deleted."""

    deleted: AdapterRef


class AliasShare(BaseModel):
    """One version of a weighted alias and its weight (its share is weight / the weights' sum)."""

    version: int = Field(ge=1, le=2**31 - 1)
    weight: int = Field(ge=1, le=10_000)


class AliasSet(BaseModel):
    """``PUT /admin/adapters/{task}/aliases/{alias}``: where the alias points now."""

    task: str
    alias: str
    version: int = Field(ge=1, description="The version; of a weighted alias, its heaviest.")
    split: list[AliasShare] = Field(
        description="Every version the alias names with its weight, in version order (one "
        "version of weight 100 for a plain alias)."
    )


class AliasRemoved(BaseModel):
    """``DELETE /admin/adapters/{task}/aliases/{alias}``."""

    task: str
    alias: str
    removed: bool


class Health(BaseModel):
    """``GET /healthz``: ``ok`` while the process runs, ``failed`` once the base failed to load."""

    status: Literal["ok", "failed"]
    error: str | None = Field(None, description="Why the base failed to load.")


class Readiness(BaseModel):
    """``GET /readyz``: ``ready`` with the base's fingerprint, or ``not ready`` and why."""

    status: Literal["ready", "not ready"]
    fingerprint: str | None = Field(None, description="The loaded base's fingerprint.")
    reason: str | None = Field(None, description="Why the server is not ready yet.")
    adapters_loaded: int | None = Field(
        None, ge=0, description="Prepared adapters in the cache now (once ready)."
    )
    preloaded: int | None = Field(
        None, ge=0, description="Adapters --preload prepared before the server turned ready."
    )


class BaseStatus(BaseModel):
    """``GET /base``: the serving base, and whether its live weights equal the served ones."""

    model: str
    pretrained: str
    device: str
    dtype: str
    fingerprint: str | None = Field(description="The base as loaded (docs/FORMAT.md §8).")
    serving_fingerprint: str = Field(description="The weights after the serving dtype cast.")
    live_fingerprint: str = Field(description="The weights at the last check, between batches.")
    unchanged: bool = Field(description="live_fingerprint == serving_fingerprint.")
    consistent: bool = Field(
        description="At that check, the live weights were exactly what the record of the patched "
        "adapter says (read before anything was restored; never repaired silently)."
    )
    checked_at: float = Field(description="When the live weights were last checked (Unix time).")
    age_s: float = Field(ge=0, description="Seconds since that check (the proof is cached).")
    mismatches: int = Field(ge=0, description="Checks that found the weights not as recorded.")
    swaps: int = Field(ge=0, description="Adapters patched into the live weights so far.")
    cached_adapters: int = Field(ge=0)
    cache_bytes: int = Field(ge=0)


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``code`` for programs and a ``message`` for people."""

    code: str = Field(description="Stable; docs/API.md lists every code with its status.")
    message: str


class ErrorBody(BaseModel):
    """Every error answer of the API, whatever raised it."""

    error: ErrorDetail
