"""Catalog tables (SQLAlchemy 2). Migrations in ``alembic/`` must match these exactly."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class BaseModelRow(Base):
    """A base model that adapters in the catalog were validated against."""

    __tablename__ = "base_models"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    pretrained: Mapped[str] = mapped_column(String(1024))
    embed_dim: Mapped[int] = mapped_column(Integer)
    eligible_params: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class TaskRow(Base):
    """One row per task name; ``last_version`` hands out versions race-free and never reuses one."""

    __tablename__ = "tasks"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("task", "version", name="uq_adapters_task_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(ForeignKey("tasks.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    base_fingerprint: Mapped[str] = mapped_column(ForeignKey("base_models.fingerprint"), index=True)
    source_domain: Mapped[str] = mapped_column(String(256), default="", index=True)
    target_domain: Mapped[str] = mapped_column(String(256), default="", index=True)
    method: Mapped[str] = mapped_column(String(128), default="")
    class_names: Mapped[list[str]] = mapped_column(JSON)
    num_classes: Mapped[int] = mapped_column(Integer)
    residual_dtype: Mapped[str] = mapped_column(String(16))
    nnz: Mapped[int] = mapped_column(BigInteger)
    eligible_params: Mapped[int] = mapped_column(BigInteger)
    density: Mapped[float] = mapped_column(Float)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    train_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    param_counts: Mapped[dict[str, int]] = mapped_column(JSON)
    adapter_created_at: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class AliasRow(Base):
    """``(task, alias) → version``, one row per version the alias names: a plain alias has one
    row, a weighted alias (a traffic split) one per version with its ``weight``. A row is removed
    with the version it points at; the alias's other versions then share its traffic."""

    __tablename__ = "aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["task", "version"],
            ["adapters.task", "adapters.version"],
            name="fk_aliases_task_version_adapters",
            ondelete="CASCADE",
        ),
    )

    task: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    weight: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class UsageRow(Base):
    """What one version has served, summed over every replica (each adds its counts in batches).
    Removed with the version."""

    __tablename__ = "usage"
    __table_args__ = (
        ForeignKeyConstraint(
            ["task", "version"],
            ["adapters.task", "adapters.version"],
            name="fk_usage_task_version_adapters",
            ondelete="CASCADE",
        ),
    )

    task: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    last_served_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )


class BlobRow(Base):
    """Adapter bytes kept in the catalog database, for replicas that share no filesystem
    (``DELTACLIP_BLOB_BACKEND=database``, the default with PostgreSQL)."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    touched_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
