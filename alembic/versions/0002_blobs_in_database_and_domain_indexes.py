"""blobs in the catalog database, domain indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 17:14:21.360606
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column(
            "touched_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_adapters_source_domain"), ["source_domain"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_adapters_target_domain"), ["target_domain"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapters_target_domain"))
        batch_op.drop_index(batch_op.f("ix_adapters_source_domain"))

    op.drop_table("blobs")
