"""each stored DICOM instance's DICOM JSON without its bulk data, kept at ingest for WADO-RS
metadata (instances stored before this revision are parsed from their files when asked)

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
    )


def downgrade() -> None:
    op.drop_table("dicom_metadata")
