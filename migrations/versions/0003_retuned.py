"""Descriptors made again under a fine-tuned recipe, kept aside until all are there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retuned",
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retuned")
