"""an ECG report version's statements and the reader's measurements, as JSON text (NULL: none)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("statements_json", sa.Text, nullable=True))
        batch.add_column(sa.Column("measurements_json", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("measurements_json")
        batch.drop_column("statements_json")
