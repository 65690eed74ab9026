"""weighted aliases (one alias row per version, with a weight) and usage per version

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every existing alias becomes a one-version alias of weight 100: resolution is unchanged.
    with op.batch_alter_table("aliases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Integer(), server_default="100", nullable=False))
        batch_op.drop_constraint("pk_aliases", type_="primary")
        batch_op.create_primary_key("pk_aliases", ["task", "alias", "version"])
    op.create_table(
        "usage",
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("last_served_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["task", "version"],
            ["adapters.task", "adapters.version"],
            name="fk_usage_task_version_adapters",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task", "version", name=op.f("pk_usage")),
    )
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_usage_last_served_at"), ["last_served_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_last_served_at"))
    op.drop_table("usage")
    # A weighted alias keeps its heaviest version (the lowest number among equals).
    op.execute(
        "DELETE FROM aliases WHERE EXISTS (SELECT 1 FROM aliases AS o "
        "WHERE o.task = aliases.task AND o.alias = aliases.alias AND "
        "(o.weight > aliases.weight OR (o.weight = aliases.weight AND o.version < aliases.version)))"
    )
    with op.batch_alter_table("aliases", schema=None) as batch_op:
        batch_op.drop_constraint("pk_aliases", type_="primary")
        batch_op.create_primary_key("pk_aliases", ["task", "alias"])
        batch_op.drop_column("weight")
