"""Store settings: flags override ``DELTACLIP_*`` environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .format.framing import Limits


class StoreSettings(BaseSettings):
    """Where the catalog and blobs live, which base to use, and adapter size limits."""

    model_config = SettingsConfigDict(env_prefix="DELTACLIP_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".deltaclip")
    database_url: str | None = None
    base_model: str = "deltaclip-efflite0"
    base_pretrained: str = "imagenet"
    blob_backend: Literal["auto", "filesystem", "database"] = "auto"
    device: str = "auto"  # "auto": CUDA when present, else CPU
    max_adapter_bytes: int = 1 << 30
    max_density: float = 0.5

    @property
    def resolved_database_url(self) -> str:
        """The configured URL, or the embedded SQLite catalog under ``home``."""
        return self.database_url or f"sqlite:///{self.home / 'catalog.db'}"

    @property
    def blob_root(self) -> Path:
        """The blob folder (the filesystem backend) or the local blob cache (database backend)."""
        return self.home / "blobs"

    @property
    def resolved_blob_backend(self) -> str:
        """``auto``: blobs in the catalog database with PostgreSQL (replicas on several hosts
        share it), in ``home/blobs`` with the embedded SQLite catalog."""
        if self.blob_backend != "auto":
            return self.blob_backend
        return "database" if self.resolved_database_url.startswith("postgresql") else "filesystem"

    @property
    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved: CUDA when present, else CPU."""
        if self.device in ("", "auto"):
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def limits(self) -> Limits:
        return Limits(max_file_bytes=self.max_adapter_bytes, max_density=self.max_density)
