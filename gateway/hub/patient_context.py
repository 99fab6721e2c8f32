"""The patient context of an exam as ingest records it.

The upload request's values are written when the exam is opened. The files' values win over them,
field by field where a file carries one: for DICOM, those of the exam's first stored instance (a
duplicate of an instance another exam holds counts), and later instances never change them; for a
WFDB record, the age and sex of its header's comments, applied when the exam is committed. An
instance naming another patient ID than the first one is logged, without either value.

Nothing here logs a value or puts one in an error: log lines name fields and exams only.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from sqlalchemy import Connection, select, update

from teleread import lifecycle
from teleread.db.engine import locked_for_change
from teleread.db.schema import exams, uploads
from teleread.patient import COLUMNS, PatientContext, cleaned

log = logging.getLogger("teleread.ingest")

REQUEST_FIELDS = tuple(COLUMNS)  # the Patient message's fields


def from_request(raw: Mapping[str, str] | None) -> PatientContext:
    """The request's values, each cleaned; a dropped one is logged by field name."""
    if not raw:
        return PatientContext()
    context, dropped = cleaned(**{k: v for k, v in raw.items() if k in REQUEST_FIELDS})
    if dropped:
        log.info("patient values of the request dropped as invalid: %s", ", ".join(sorted(dropped)),
                 extra={"reason": "PATIENT_VALUE_INVALID"})  # fmt: skip
    return context


def holds_an_object(conn: Connection, *, exam_id: str) -> bool:
    """True once an upload of the exam is stored (or a duplicate): its first instance is known."""
    found = conn.execute(
        select(uploads.c.id)
        .where(uploads.c.exam_id == exam_id, uploads.c.state.in_(lifecycle.HOLDING_UPLOADS))
        .limit(1)
    ).first()
    return found is not None


def check_instance(
    exam: Mapping[str, Any], *, first: bool, patient: PatientContext, dropped: tuple[str, ...], upload_id: str
) -> None:
    """Log what a person should know of an instance's patient values (names of fields, never values):
    the first instance's invalid values, and a later instance naming another patient ID."""
    if first and dropped:
        log.info("patient values of the first instance dropped as invalid: %s", ", ".join(sorted(dropped)),
                 extra={"upload_id": upload_id, "exam_id": exam["id"], "reason": "PATIENT_VALUE_INVALID"})  # fmt: skip
    if not first and patient.id and exam.get("patient_id") and patient.id != exam["patient_id"]:
        log.warning(
            "an instance names another patient ID than the exam's first instance; the first one's are kept",
            extra={"upload_id": upload_id, "exam_id": exam["id"], "reason": "PATIENT_MISMATCH"},
        )


def record_first_instance(conn: Connection, *, exam_id: str, upload_id: str, patient: PatientContext) -> bool:
    """In the transaction that stores an upload: when no other upload of the exam is stored, the
    upload's values go over the exam's (the request's). The exam's row is locked first, so of two
    first instances stored at once the second sees the first (True when these values were taken).

    Every other stream's store holds a KEY SHARE lock on this row from its object's foreign key: the
    lock here lets it through (``locked_for_change``)."""
    row = conn.execute(locked_for_change(select(exams).where(exams.c.id == exam_id))).first()
    if row is None:
        return False
    earlier = conn.execute(
        select(uploads.c.id)
        .where(
            uploads.c.exam_id == exam_id,
            uploads.c.id != upload_id,
            uploads.c.state.in_(lifecycle.HOLDING_UPLOADS),
        )
        .limit(1)
    ).first()
    if earlier is not None:
        return False
    if patient:
        merged = patient.over(PatientContext.from_row(dict(row._mapping)))
        conn.execute(update(exams).where(exams.c.id == exam_id).values(**merged.columns()))
    return True


def committed_record(exam: Mapping[str, Any], header: PatientContext) -> dict[str, str]:
    """The patient columns of a WFDB exam at its commit: the header's age and sex over the request's."""
    return header.over(PatientContext.from_row(exam)).columns() if header else {}
