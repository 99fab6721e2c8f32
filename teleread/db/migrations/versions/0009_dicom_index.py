"""the DICOMweb query index: an instance's study, number, size, frames and transfer syntax on its
object row; the site's DICOM studies and series as their first stored instance says

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("objects") as batch:
        batch.add_column(sa.Column("study_instance_uid", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("instance_number", sa.Integer, nullable=True))
        batch.add_column(sa.Column("pixel_rows", sa.Integer, nullable=True))
        batch.add_column(sa.Column("pixel_columns", sa.Integer, nullable=True))
        batch.add_column(sa.Column("number_of_frames", sa.Integer, nullable=True))
        batch.add_column(sa.Column("transfer_syntax_uid", sa.String(64), nullable=False, server_default=""))
        batch.create_index("ix_objects_site_series", ["site_id", "series_instance_uid"])
        batch.create_index("ix_objects_site_study", ["site_id", "study_instance_uid"])
    op.create_table(
        "dicom_studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("exam_id", sa.String(32), sa.ForeignKey("exams.id"), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.Column("study_id", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("site_id", "study_instance_uid", name="uq_dicom_studies_site_study"),
    )
    op.create_index("ix_dicom_studies_site_date", "dicom_studies", ["site_id", "study_date"])
    op.create_table(
        "dicom_series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer, nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("body_part_examined", sa.String(16), nullable=False),
        sa.Column("series_date", sa.String(8), nullable=False),
        sa.Column("series_time", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("site_id", "series_instance_uid", name="uq_dicom_series_site_series"),
    )
    op.create_index("ix_dicom_series_site_study", "dicom_series", ["site_id", "study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_dicom_series_site_study", table_name="dicom_series")
    op.drop_table("dicom_series")
    op.drop_index("ix_dicom_studies_site_date", table_name="dicom_studies")
    op.drop_table("dicom_studies")
    with op.batch_alter_table("objects") as batch:
        batch.drop_index("ix_objects_site_study")
        batch.drop_index("ix_objects_site_series")
        batch.drop_column("transfer_syntax_uid")
        batch.drop_column("number_of_frames")
        batch.drop_column("pixel_columns")
        batch.drop_column("pixel_rows")
        batch.drop_column("instance_number")
        batch.drop_column("study_instance_uid")
