"""the printed report of each signed report version: its SHA-256 and size (the bytes are in the
object store under a key made of the exam id and the version; NULL until rendered)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("pdf_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("pdf_size", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("pdf_size")
        batch.drop_column("pdf_sha256")
