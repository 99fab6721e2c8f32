"""refused objects kept as records, exams committed incomplete, follow-up exams of a study

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exams") as batch:
        batch.add_column(sa.Column("incomplete", sa.Boolean(), nullable=False, server_default=sa.text("false")))
        batch.add_column(sa.Column("refused_count", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("follow_up_of", sa.String(32), nullable=False, server_default=sa.text("''")))
    op.create_index("ix_exams_site_study", "exams", ["site_id", "study_instance_uid"])
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("sites.id", name="fk_refusals_site_id_sites"), nullable=False),
        sa.Column("exam_id", sa.String(32), nullable=False),
        sa.Column("upload_id", sa.String(32), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_refusals"),
    )
    op.create_index("ix_refusals_exam", "refusals", ["exam_id"])
    op.create_index("ix_refusals_content", "refusals", ["site_id", "sha256", "role"])


def downgrade() -> None:
    op.drop_index("ix_refusals_content", table_name="refusals")
    op.drop_index("ix_refusals_exam", table_name="refusals")
    op.drop_table("refusals")
    op.drop_index("ix_exams_site_study", table_name="exams")
    with op.batch_alter_table("exams") as batch:
        batch.drop_column("follow_up_of")
        batch.drop_column("refused_count")
        batch.drop_column("incomplete")
