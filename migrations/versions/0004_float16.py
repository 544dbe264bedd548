"""Descriptors stored as float16 (half the bytes, for a change in cosine of about 1e-4),
and an index on the images' status (counting and listing them without reading the rows).

Rows of float32 are rewritten in place, in id order, 10,000 at a time; nothing is
embedded again. The generation moves, so every FAISS file is rebuilt from them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
import json

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BATCH = 10_000


def _recast(table: str, key: str, dim: int, source: str, target: str) -> int:
    conn = op.get_bind()
    last, done = -1, 0
    while True:
        rows = conn.execute(sa.text(
            f"SELECT {key}, embedding FROM {table} WHERE {key} > :last AND length(embedding) = :size "
            f"ORDER BY {key} LIMIT {BATCH}"), {"last": last, "size": np.dtype(source).itemsize * dim}).fetchall()
        if not rows:
            return done
        conn.execute(sa.text(f"UPDATE {table} SET embedding = :blob WHERE {key} = :id"),
                     [{"id": r[0], "blob": np.frombuffer(r[1], source).astype(target).tobytes()} for r in rows])
        last, done = rows[-1][0], done + len(rows)


def _convert(source: str, target: str) -> None:
    conn = op.get_bind()
    recipe = conn.execute(sa.text("SELECT value FROM settings WHERE key = 'recipe'")).scalar()
    if not recipe:
        return
    dim = int(json.loads(recipe)["dim"])
    done = _recast("images", "id", dim, source, target) + _recast("retuned", "image_id", dim, source, target)
    if done:
        conn.execute(sa.text("UPDATE settings SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"))


def upgrade() -> None:
    op.create_index("ix_images_status", "images", ["status"])
    _convert("<f4", "<f2")


def downgrade() -> None:
    _convert("<f2", "<f4")
    op.drop_index("ix_images_status", table_name="images")
