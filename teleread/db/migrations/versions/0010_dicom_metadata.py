"""each stored DICOM instance's DICOM JSON without its bulk data, kept at ingest for WADO-RS
metadata, and where its native pixel data lies in the file with its digest, for frames read by
range (instances stored before this revision are parsed from their files when asked)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_metadata",
        sa.Column("object_id", sa.String(32), sa.ForeignKey("objects.id"), primary_key=True),
        sa.Column("json", sa.Text, nullable=False),
        sa.Column("pixel_offset", sa.BigInteger, nullable=True),
        sa.Column("pixel_length", sa.BigInteger, nullable=True),
        sa.Column("pixel_sha256", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("dicom_metadata")
