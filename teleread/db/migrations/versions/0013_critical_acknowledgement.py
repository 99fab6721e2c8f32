"""a critical result's acknowledgement by a named person (who, role, method, read-back, when);
notifications told apart by what they refer to (a result of the exam)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("ack_name", sa.String(100), nullable=False, server_default=""))
        batch.add_column(sa.Column("ack_role", sa.String(50), nullable=False, server_default=""))
        batch.add_column(sa.Column("ack_method", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("ack_read_back", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("acknowledged_by", sa.Integer, sa.ForeignKey("principals.id"), nullable=True))
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("ref", sa.String(32), nullable=False, server_default=""))
        batch.drop_constraint("uq_notifications_kind_exam_id_step", type_="unique")
        batch.create_unique_constraint("uq_notifications_kind_exam_id_step_ref", ["kind", "exam_id", "step", "ref"])


def downgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.drop_constraint("uq_notifications_kind_exam_id_step_ref", type_="unique")
        batch.create_unique_constraint("uq_notifications_kind_exam_id_step", ["kind", "exam_id", "step"])
        batch.drop_column("ref")
    with op.batch_alter_table("results") as batch:
        for column in ("acknowledged_by", "acknowledged_at", "ack_read_back", "ack_method", "ack_role", "ack_name"):
            batch.drop_column(column)
