"""the roster: readers' grades, subspecialties, credentials and shifts; an exam's subspecialty and
first offer; a report's second reader (critical) or countersigner (a trainee's report)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reader_profiles",
        sa.Column("principal_id", sa.Integer, nullable=False),
        sa.Column("grade", sa.String(24), nullable=False),
        sa.Column("subspecialties", sa.Text, nullable=False),
        sa.Column("sites", sa.Text, nullable=False),
        sa.Column("modalities", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("principal_id", name="pk_reader_profiles"),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name="fk_reader_profiles_principal_id_principals"
        ),
    )
    op.create_table(
        "shifts",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("principal_id", sa.Integer, nullable=False),
        sa.Column("days", sa.String(200), nullable=False),
        sa.Column("starts", sa.String(5), nullable=False),
        sa.Column("ends", sa.String(5), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_shifts"),
        sa.ForeignKeyConstraint(["principal_id"], ["principals.id"], name="fk_shifts_principal_id_principals"),
    )
    op.create_index("ix_shifts_principal", "shifts", ["principal_id"])
    with op.batch_alter_table("exams") as batch:
        batch.add_column(sa.Column("subspecialty", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("offered_to", sa.Integer, nullable=True))
        batch.add_column(sa.Column("offer_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("checked_by", sa.Integer, sa.ForeignKey("principals.id"), nullable=True))
        batch.add_column(sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("checked_at")
        batch.drop_column("checked_by")
    with op.batch_alter_table("exams") as batch:
        for column in ("offer_until", "offered_to", "subspecialty"):
            batch.drop_column(column)
    op.drop_index("ix_shifts_principal", "shifts")
    op.drop_table("shifts")
    op.drop_table("reader_profiles")
