"""dataset profiles and label counts (rapha.hub.profiles)

Revision ID: 0002
Revises: 0001
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
        "node_profiles",
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("body_part", sa.String(length=16), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("price_per_record", sa.BigInteger(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"]),
        sa.PrimaryKeyConstraint("node_id"),
    )
    with op.batch_alter_table("node_profiles", schema=None) as batch_op:
        batch_op.create_index(
            "ix_node_profiles_cohort_price",
            ["modality", "body_part", "price_per_record"],
            unique=False,
        )
        batch_op.create_index(
            "ix_node_profiles_cohort_records", ["modality", "body_part", "records"], unique=False
        )

    op.create_table(
        "node_label_counts",
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("positives", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["node_profiles.node_id"]),
        sa.PrimaryKeyConstraint("node_id", "label"),
    )
    with op.batch_alter_table("node_label_counts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_node_label_counts_label", ["label", "positives", "node_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("node_label_counts", schema=None) as batch_op:
        batch_op.drop_index("ix_node_label_counts_label")

    op.drop_table("node_label_counts")
    with op.batch_alter_table("node_profiles", schema=None) as batch_op:
        batch_op.drop_index("ix_node_profiles_cohort_records")
        batch_op.drop_index("ix_node_profiles_cohort_price")

    op.drop_table("node_profiles")
