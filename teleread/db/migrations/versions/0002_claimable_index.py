"""claim-next index in queue order, partial on the queue's states

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

QUEUED = sa.text("state IN ('queued', 'in_reading')")


def upgrade() -> None:
    with op.batch_alter_table("exams") as batch:
        batch.drop_index("ix_exams_queue")
    op.create_index(
        "ix_exams_claimable",
        "exams",
        ["hospital", "specialty", "level_rank", "deadline", "received_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )


def downgrade() -> None:
    op.drop_index("ix_exams_claimable", table_name="exams")
    op.create_index(
        "ix_exams_queue", "exams", ["hospital", "specialty", "state", "level_rank", "deadline", "received_at"]
    )
