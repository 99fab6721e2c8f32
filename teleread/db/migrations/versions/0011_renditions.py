"""the viewer's copy of a large JPEG 2000 frame as HTJ2K lossless: its storage key, digest and size

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dicom_metadata") as batch:
        batch.add_column(sa.Column("rendition_key", sa.String(128), nullable=True))
        batch.add_column(sa.Column("rendition_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("rendition_size", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dicom_metadata") as batch:
        batch.drop_column("rendition_size")
        batch.drop_column("rendition_sha256")
        batch.drop_column("rendition_key")
