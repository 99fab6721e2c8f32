"""Table definitions (SQLAlchemy Core) of the metadata database.

Every row that belongs to a tenant carries ``site_id``. The ``events`` table is the audit trail and
the feed that streams updates to queue clients; ``results`` gives each site a gapless cursor.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UtcDateTime = DateTime(timezone=True)
# SQLite has no BIGINT autoincrement; INTEGER PRIMARY KEY is its 64-bit rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

sites = Table(
    "sites",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("code", String(32), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("lead_hospital", String(32), nullable=False),
    Column("result_seq", BigInteger, nullable=False, default=0),
    Column("created_at", UtcDateTime, nullable=False),
)

principals = Table(
    "principals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(32), nullable=False),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=True),
    Column("hospital", String(32), nullable=True),
    Column("specialty", String(32), nullable=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", UtcDateTime, nullable=False),
    # argon2id hash (PHC string) of the person's password; none: the identity signs in by token only
    Column("password_hash", String(200), nullable=True),
)

# A reader's place on the roster: grade, subspecialties, and what they are credentialed for
# (comma-separated site codes and modalities; empty: every site of their hospital, every modality
# of their specialty). A reader with no row is an attending credentialed for everything, always on duty.
reader_profiles = Table(
    "reader_profiles",
    metadata,
    Column("principal_id", Integer, ForeignKey("principals.id"), primary_key=True),
    Column("grade", String(24), nullable=False, default="attending"),
    Column("subspecialties", Text, nullable=False, default=""),
    Column("sites", Text, nullable=False, default=""),
    Column("modalities", Text, nullable=False, default=""),
    Column("updated_at", UtcDateTime, nullable=False),
)

# A reader's recurring shifts: days by the working-hours calendar (workdays, restdays, daily, mon..sun
# or a date, comma-separated), local times HH:MM (an end before the start runs past midnight).
shifts = Table(
    "shifts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("days", String(200), nullable=False),
    Column("starts", String(5), nullable=False),
    Column("ends", String(5), nullable=False),
    Column("kind", String(16), nullable=False, default="duty"),
    Index("ix_shifts_principal", "principal_id"),
)

# A signed-in person's session: a short-lived bearer token (only its SHA-256 kept), renewed while it
# is used, ended by sign-out or by lapsing.
sessions = Table(
    "sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("client", String(32), nullable=False, default=""),  # station, cli
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_used_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True),
    Index("ix_sessions_principal", "principal_id"),
)

exams = Table(
    "exams",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("client_exam_key", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("modality", String(16), nullable=False, default=""),
    Column("study_instance_uid", String(64), nullable=False, default=""),
    Column("state", String(24), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("indication", Text, nullable=False, default=""),
    Column("specialty", String(32), nullable=False, default=""),
    Column("hospital", String(32), nullable=False, default=""),
    Column("level", String(16), nullable=False, default=""),
    Column("level_rank", Integer, nullable=False, default=9),
    Column("score", Float, nullable=False, default=0.0),
    Column("triage_json", Text, nullable=False, default=""),
    Column("deadline", UtcDateTime, nullable=True),
    Column("received_at", UtcDateTime, nullable=True),
    Column("object_count", Integer, nullable=False, default=0),
    Column("total_bytes", BigInteger, nullable=False, default=0),
    Column("reject_reason", String(64), nullable=False, default=""),
    # committed without some of what was uploaded: those objects were refused (see refusals)
    Column("incomplete", Boolean, nullable=False, default=False, server_default=text("false")),
    Column("refused_count", Integer, nullable=False, default=0, server_default=text("0")),
    Column("follow_up_of", String(32), nullable=False, default="", server_default=text("''")),
    Column("claimed_by", Integer, ForeignKey("principals.id"), nullable=True),
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("fence", BigInteger, nullable=False, default=0),
    # Patient context, recorded at ingest from the files' headers or the upload request. Readers of
    # the exam see it; it never goes into a log or an error message.
    Column("patient_id", String(64), nullable=False, default="", server_default=text("''")),  # the site's ID
    Column("patient_name", String(200), nullable=False, default="", server_default=text("''")),
    Column("patient_sex", String(1), nullable=False, default="", server_default=text("''")),  # M, F, O or ''
    Column("patient_birth_date", String(8), nullable=False, default="", server_default=text("''")),  # YYYYMMDD
    Column("patient_age", String(4), nullable=False, default="", server_default=text("''")),  # DICOM AS: 045Y
    Column("referring_physician", String(200), nullable=False, default="", server_default=text("''")),
    Column("patient_class", String(16), nullable=False, default="", server_default=text("''")),  # vocab
    # routing: the subspecialty that reads it ('' none), and the first offer (a reader, until when)
    Column("subspecialty", String(32), nullable=False, default="", server_default=text("''")),
    Column("offered_to", Integer, nullable=True),
    Column("offer_until", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    UniqueConstraint("site_id", "client_exam_key", name="uq_exams_site_key"),
    # Claim-next walks this index in queue order; only exams in the queue are in it.
    Index(
        "ix_exams_claimable",
        "hospital",
        "specialty",
        "level_rank",
        "deadline",
        "received_at",
        "id",
        postgresql_where=text("state IN ('queued', 'in_reading')"),
        sqlite_where=text("state IN ('queued', 'in_reading')"),
    ),
    Index("ix_exams_site_state", "site_id", "state"),
    Index("ix_exams_site_study", "site_id", "study_instance_uid"),
    Index("ix_exams_site_patient", "site_id", "patient_id"),  # the patient's earlier exams (priors)
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("exam_id", String(32), ForeignKey("exams.id"), nullable=False),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("role", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("object_id", String(32), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # the stream writing the upload's bytes now: "<hub instance>:<stream>", until its lease lapses
    Column("writer", String(64), nullable=True),
    Column("writer_until", UtcDateTime, nullable=True),
    UniqueConstraint("exam_id", "sha256", "role", name="uq_uploads_exam_content"),
)

objects = Table(
    "objects",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("exam_id", String(32), ForeignKey("exams.id"), nullable=False),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("role", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("storage_key", String(128), nullable=False),
    Column("sop_instance_uid", String(64), nullable=True),
    Column("sop_class_uid", String(64), nullable=False, default=""),
    Column("series_instance_uid", String(64), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    # A DICOM instance's attributes for DICOMweb queries (None: not given, or not DICOM)
    Column("study_instance_uid", String(64), nullable=False, default=""),
    Column("instance_number", Integer, nullable=True),
    Column("pixel_rows", Integer, nullable=True),
    Column("pixel_columns", Integer, nullable=True),
    Column("number_of_frames", Integer, nullable=True),
    Column("transfer_syntax_uid", String(64), nullable=False, default=""),
    UniqueConstraint("site_id", "sop_instance_uid", name="uq_objects_site_instance"),
    Index("ix_objects_exam", "exam_id"),
    Index("ix_objects_storage_key", "storage_key"),
    Index("ix_objects_site_series", "site_id", "series_instance_uid"),
    Index("ix_objects_site_study", "site_id", "study_instance_uid"),
)

# A stored DICOM instance's DICOM JSON (PS3.18 F.2) without its bulk data, written at ingest so that
# WADO-RS metadata is answered from the database, not by parsing every file of a series again, and
# its native frames are read by range.
dicom_metadata = Table(
    "dicom_metadata",
    metadata,
    Column("object_id", String(32), ForeignKey("objects.id"), primary_key=True),
    Column("json", Text, nullable=False),
    # where native (little-endian, unencapsulated) pixel data lies in the stored file, and its digest
    Column("pixel_offset", BigInteger, nullable=True),
    Column("pixel_length", BigInteger, nullable=True),
    Column("pixel_sha256", String(64), nullable=True),
    # the viewer's copy of a large JPEG 2000 frame as HTJ2K lossless (teleread/pixels.py), once made
    Column("rendition_key", String(128), nullable=True),
    Column("rendition_sha256", String(64), nullable=True),
    Column("rendition_size", BigInteger, nullable=True),
)

# Durable deadlines (reader/hub/timers.py): one row per deadline, on the database's time; each
# fires once, whichever hub process sweeps it.
timers = Table(
    "timers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("subject", String(64), nullable=False),  # an exam id
    Column("step", Integer, nullable=False, default=0),  # the escalation step it stands for
    Column("due_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),  # pending | fired | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(64), nullable=True),
    Column("detail", Text, nullable=False, default=""),
    Column("fired_at", UtcDateTime, nullable=True),
    UniqueConstraint("kind", "subject", "step", name="uq_timers_kind_subject_step"),
    Index("ix_timers_due", "status", "due_at"),
)

# Notifications to the hooks (reader/hub/notify.py): written in the transaction of what makes them
# necessary, delivered by whichever hub process takes them, each once (at least once if a hub stops
# mid-delivery: the hook gets the same Idempotency-Key again).
notifications = Table(
    "notifications",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(32), nullable=False),  # critical_alert | escalation
    Column("exam_id", String(32), nullable=False),
    Column("step", Integer, nullable=False, default=0),
    Column("audience", String(32), nullable=False),  # readers | on-call | department-head ...
    Column("payload", Text, nullable=False),  # JSON, never patient data
    Column("status", String(16), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("last_error", String(64), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("sent_at", UtcDateTime, nullable=True),
    Column("ref", String(32), nullable=False, default="", server_default=text("''")),  # e.g. a result's id
    UniqueConstraint("kind", "exam_id", "step", "ref", name="uq_notifications_kind_exam_id_step_ref"),
    Index("ix_notifications_due", "status", "next_attempt_at"),
)

# The simulation clock: an offset in seconds added to the database's time by every hub process on
# the database (teleread/clock.py); no row is no offset. For drills, replays and tests.
clock_offset = Table(
    "clock_offset",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seconds", Float, nullable=False),
)

# The DICOM study and series a site's instances belong to, as their first stored instance says
# (the DICOMweb query index; a study may span several exams of the site: its follow-ups).
dicom_studies = Table(
    "dicom_studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("exam_id", String(32), ForeignKey("exams.id"), nullable=False),  # the first exam of the study
    Column("study_date", String(8), nullable=False, default=""),  # DA, '' when absent or invalid
    Column("study_time", String(16), nullable=False, default=""),  # TM
    Column("accession_number", String(16), nullable=False, default=""),
    Column("study_description", String(64), nullable=False, default=""),
    Column("study_id", String(16), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("site_id", "study_instance_uid", name="uq_dicom_studies_site_study"),
    Index("ix_dicom_studies_site_date", "site_id", "study_date"),
)

dicom_series = Table(
    "dicom_series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("modality", String(16), nullable=False, default=""),
    Column("series_number", Integer, nullable=True),
    Column("series_description", String(64), nullable=False, default=""),
    Column("body_part_examined", String(16), nullable=False, default=""),
    Column("series_date", String(8), nullable=False, default=""),
    Column("series_time", String(16), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("site_id", "series_instance_uid", name="uq_dicom_series_site_series"),
    Index("ix_dicom_series_site_study", "site_id", "study_instance_uid"),
)

conflicts = Table(
    "conflicts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("exam_id", String(32), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("existing_sha256", String(64), nullable=False),
    Column("offered_sha256", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# One row per refused object (validation, an instance UID conflict, a WFDB pair that does not match):
# what and why. The bytes are deleted; the record stays, and a retry of the same bytes gets the
# same error at once.
refusals = Table(
    "refusals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("exam_id", String(32), nullable=False),
    Column("upload_id", String(32), nullable=True),
    Column("role", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False, default=0),
    Column("sop_instance_uid", String(64), nullable=True),
    Column("code", String(32), nullable=False),
    Column("reason", String(64), nullable=False),
    # "content": the bytes themselves are unfit (any exam gets the same answer); "exam": unfit in
    # this exam (another study, a WFDB header that names another size, a conflict with a stored instance)
    Column("scope", String(16), nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_refusals_exam", "exam_id"),
    Index("ix_refusals_content", "site_id", "sha256", "role"),
)

reports = Table(
    "reports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("exam_id", String(32), ForeignKey("exams.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(32), nullable=False),  # teleread.lifecycle.REPORT
    Column("text", Text, nullable=False),
    Column("impression", Text, nullable=False, default=""),
    Column("critical", Boolean, nullable=False, default=False),
    Column("author_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("signed_by", Integer, ForeignKey("principals.id"), nullable=True),
    Column("signed_at", UtcDateTime, nullable=True),
    # a critical version's second reader, or a trainee's version's countersigner (then signed_by)
    Column("checked_by", Integer, ForeignKey("principals.id"), nullable=True),
    Column("checked_at", UtcDateTime, nullable=True),
    Column("amends_reason", Text, nullable=False, default=""),
    Column("sha256", String(64), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    # the printed report of a signed version, rendered by the hub after the signature and kept in the
    # object store under a key made of the exam id and the version; NULL until it is rendered
    Column("pdf_sha256", String(64), nullable=True),
    Column("pdf_size", BigInteger, nullable=True),
    # an ECG report's statements (a JSON list of {code, text, text_zh, source, confirmed}) and the
    # reader's measurements (a JSON object {"values": {name: value}, "edited": [name...]}); NULL: none
    Column("statements_json", Text, nullable=True),
    Column("measurements_json", Text, nullable=True),
    UniqueConstraint("exam_id", "version", name="uq_reports_exam_version"),
)

results = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("exam_id", String(32), ForeignKey("exams.id"), nullable=False),
    Column("report_id", Integer, ForeignKey("reports.id"), nullable=False),
    Column("critical", Boolean, nullable=False, default=False),
    Column("critical_state", String(16), nullable=False, default="", server_default=text("''")),  # lifecycle.CRITICAL
    Column("published_at", UtcDateTime, nullable=False),
    # a critical result's acknowledgement by a named person at the site (migration 0013)
    Column("ack_name", String(100), nullable=False, default="", server_default=text("''")),
    Column("ack_role", String(50), nullable=False, default="", server_default=text("''")),
    Column("ack_method", String(16), nullable=False, default="", server_default=text("''")),
    Column("ack_read_back", Text, nullable=False, default="", server_default=text("''")),
    Column("acknowledged_at", UtcDateTime, nullable=True),
    Column("acknowledged_by", Integer, ForeignKey("principals.id"), nullable=True),  # the site identity that sent it
    UniqueConstraint("site_id", "seq", name="uq_results_site_seq"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("exam_id", String(32), nullable=True),
    Column("site_id", Integer, nullable=True),
    Column("hospital", String(32), nullable=False, default=""),
    Column("specialty", String(32), nullable=False, default=""),
    Column("type", String(32), nullable=False),
    Column("actor_id", Integer, nullable=True),
    Column("detail", Text, nullable=False, default=""),
    Column("at", UtcDateTime, nullable=False),
    Index("ix_events_feed", "hospital", "specialty", "id"),
)
