"""the report's own track (statuses up to awaiting_countersignature; an amendment version is
``amended``) and a critical result's state on each result version

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.alter_column("status", type_=sa.String(32), existing_type=sa.String(16), existing_nullable=False)
    op.execute("UPDATE reports SET status = 'amended' WHERE status = 'final' AND amends_reason <> ''")
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("critical_state", sa.String(16), nullable=False, server_default=sa.text("''")))
    op.execute("UPDATE results SET critical_state = 'notified' WHERE critical")


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("critical_state")
    op.execute("UPDATE reports SET status = 'final' WHERE status = 'amended'")
    with op.batch_alter_table("reports") as batch:
        batch.alter_column("status", type_=sa.String(16), existing_type=sa.String(32), existing_nullable=False)
