"""Server settings (``DELTACLIP_*``), extending the store's settings."""

from __future__ import annotations

import json
import os
import socket
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from adapters_store.config import StoreSettings

from .costs import CostModel
from .preload import parse_preload


class ServerSettings(StoreSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    admin_token: SecretStr | None = None
    max_batch: int = Field(16, ge=1, le=1024, description="images per forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long the worker waits to fill a batch")
    queue_size: int = Field(256, ge=1, description="waiting requests before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="waiting longer than this gives 504")
    cache_bytes: int = Field(1 << 30, ge=0, description="prepared adapters kept in memory (LRU)")
    pin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="tasks preloaded and never evicted: comma-separated (a JSON list works too)",
    )
    pin_refresh_s: float = Field(
        10.0, gt=0, description="pinned tasks are re-resolved this often (aliases moved elsewhere)"
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="adapters prepared before the server turns ready, within cache_bytes: "
        "top:N (the N most requested) and/or alias:NAME (every version the alias names)",
    )
    usage_flush_s: float = Field(
        5.0, gt=0, description="usage counts are added to the catalog this often (in batches)"
    )
    metrics_tasks: int = Field(
        50,
        ge=0,
        le=10_000,
        description='tasks with their own latency series; the rest: task="_other"',
    )
    base_check_s: float = Field(
        60.0, gt=0, description="the live weights are checked at most this often, between rounds"
    )
    max_request_bytes: int = Field(32 << 20, ge=1, description="largest /predict body")
    max_upload_bytes: int = Field(256 << 20, ge=1, description="largest adapter upload")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest decoded image (Pillow's own limit is ~89 M)"
    )
    max_images: int = Field(64, ge=1, description="images per /predict request")
    max_request_pixels: int = Field(
        200_000_000, ge=1, description="decoded pixels per /predict request, all images together"
    )
    retry_after_s: int = 1
    read_timeout_s: float = Field(
        10.0, gt=0, description="a client silent this long mid-head or mid-body gets 408, closed"
    )
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed")
    max_head_bytes: int = Field(
        64 << 10, ge=1024, description="request line + headers; larger heads get 431 (or 400)"
    )
    deterministic: bool = Field(
        False,
        description="every forward pass at the fixed batch shape max_batch (padded), so an "
        "image's answer does not depend on what it is batched with",
    )
    batch_mode: Literal["auto", "patched", "mixed"] = Field(
        "patched",
        description="patched (default): always patch (bit-exact); mixed: mix whatever can be "
        "mixed (within 1e-5 of patched; ahead of grouped swapping from ~16 tasks per round on "
        "CPU, docs/BENCHMARKS.md); auto: per round, the planner runs each task group patched or "
        "in mixed-task forwards, whichever its cost model says is faster (deterministic mode is "
        "always patched)",
    )
    mix_costs: dict[str, Any] | None = Field(
        None,
        description="the planner's cost model instead of measuring it at start-up: JSON with "
        "server/costs.py CostModel's fields (seconds; batch_s maps batch sizes to the seconds of "
        "one forward); the measured model is logged at start-up in this form",
    )
    replica_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        description="sent as X-Deltaclip-Replica on every response (which replica answered)",
    )

    @field_validator("mix_costs")
    @classmethod
    def _check_mix_costs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            CostModel.parse(value)  # ValueError names the field
        return value

    @field_validator("preload")
    @classmethod
    def _check_preload(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_preload(spec)
        return value

    @field_validator("pin", "preload", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """``DELTACLIP_PIN=a,b`` as the docs show it; a JSON list (``["a", "b"]``) too."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
