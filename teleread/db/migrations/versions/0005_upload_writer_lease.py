"""the per-upload writer lease in the database (any hub process may resume an upload), and an
index on objects.storage_key for the clean-up sweep

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("writer", sa.String(64), nullable=True))
        batch.add_column(sa.Column("writer_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_objects_storage_key", "objects", ["storage_key"])


def downgrade() -> None:
    op.drop_index("ix_objects_storage_key", table_name="objects")
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("writer_until")
        batch.drop_column("writer")
