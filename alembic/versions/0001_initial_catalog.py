"""initial catalog

Revision ID: 0001
Revises:
Create Date: 2026-11-26 16:12:32.577633
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("pretrained", sa.String(length=1024), nullable=False),
        sa.Column("embed_dim", sa.Integer(), nullable=False),
        sa.Column("eligible_params", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_base_models")),
    )
    op.create_table(
        "tasks",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tasks")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("base_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("source_domain", sa.String(length=256), nullable=False),
        sa.Column("target_domain", sa.String(length=256), nullable=False),
        sa.Column("method", sa.String(length=128), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("residual_dtype", sa.String(length=16), nullable=False),
        sa.Column("nnz", sa.BigInteger(), nullable=False),
        sa.Column("eligible_params", sa.BigInteger(), nullable=False),
        sa.Column("density", sa.Float(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("train_config", sa.JSON(), nullable=False),
        sa.Column("param_counts", sa.JSON(), nullable=False),
        sa.Column("adapter_created_at", sa.String(length=64), nullable=False),
        sa.Column(
            "registered_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["base_fingerprint"],
            ["base_models.fingerprint"],
            name=op.f("fk_adapters_base_fingerprint_base_models"),
        ),
        sa.ForeignKeyConstraint(["task"], ["tasks.name"], name=op.f("fk_adapters_task_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("digest", name=op.f("uq_adapters_digest")),
        sa.UniqueConstraint("task", "version", name="uq_adapters_task_version"),
    )
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_adapters_base_fingerprint"), ["base_fingerprint"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_adapters_task"), ["task"], unique=False)

    op.create_table(
        "aliases",
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["task", "version"],
            ["adapters.task", "adapters.version"],
            name="fk_aliases_task_version_adapters",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task", "alias", name=op.f("pk_aliases")),
    )


def downgrade() -> None:
    op.drop_table("aliases")
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapters_task"))
        batch_op.drop_index(batch_op.f("ix_adapters_base_fingerprint"))

    op.drop_table("adapters")
    op.drop_table("tasks")
    op.drop_table("base_models")
