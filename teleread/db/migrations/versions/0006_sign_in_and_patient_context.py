"""sign-in: a password hash per principal and the sessions table; the patient context of an exam
(the site's patient ID, name, sex, birth date, age, requesting clinician, patient class) with an
index for the patient's earlier exams

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PATIENT = [
    ("patient_id", 64),
    ("patient_name", 200),
    ("patient_sex", 1),
    ("patient_birth_date", 8),
    ("patient_age", 4),
    ("referring_physician", 200),
    ("patient_class", 16),
]


def upgrade() -> None:
    with op.batch_alter_table("principals") as batch:
        batch.add_column(sa.Column("password_hash", sa.String(200), nullable=True))
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("principal_id", sa.Integer, nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("client", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name="fk_sessions_principal_id_principals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.UniqueConstraint("token_sha256", name="uq_sessions_token_sha256"),
    )
    op.create_index("ix_sessions_principal", "sessions", ["principal_id"])
    with op.batch_alter_table("exams") as batch:
        for name, length in PATIENT:
            batch.add_column(sa.Column(name, sa.String(length), nullable=False, server_default=sa.text("''")))
    op.create_index("ix_exams_site_patient", "exams", ["site_id", "patient_id"])


def downgrade() -> None:
    op.drop_index("ix_exams_site_patient", table_name="exams")
    with op.batch_alter_table("exams") as batch:
        for name, _ in reversed(PATIENT):
            batch.drop_column(name)
    op.drop_index("ix_sessions_principal", table_name="sessions")
    op.drop_table("sessions")
    with op.batch_alter_table("principals") as batch:
        batch.drop_column("password_hash")
