"""Conversion between database rows (mappings) and ``teleread.v1`` messages.

An exam's patient context goes into its message only when the caller asks (``patient=True``): the
reader paths do, what a site gets back from Ingest and Results never does."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any, Mapping

from google.protobuf import timestamp_pb2

from teleread.db.engine import as_utc
from teleread.patient import PatientContext, age_on
from teleread.triage_result import TriageResult
from teleread.v1 import common_pb2
from teleread.vocab import ExamKind, Priority

PRIORITIES = {
    Priority.STAT: common_pb2.PRIORITY_STAT,
    Priority.URGENT: common_pb2.PRIORITY_URGENT,
    Priority.ROUTINE: common_pb2.PRIORITY_ROUTINE,
}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
KINDS = {ExamKind.ECG: common_pb2.EXAM_KIND_ECG, ExamKind.IMAGING: common_pb2.EXAM_KIND_IMAGING}
KIND_NAMES = {v: k for k, v in KINDS.items()}


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    value = as_utc(value)
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def triage_message(raw: str) -> common_pb2.Triage | None:
    """The ``teleread.v1.Triage`` of an exam's ``triage_json`` (None before triage)."""
    return TriageResult.from_json(raw).to_proto() if raw else None


def exam_date(row: Mapping[str, Any]) -> date | None:
    """The day (UTC) an exam arrived at the hub, or was opened when it has not arrived yet."""
    when = as_utc(row.get("received_at")) or as_utc(row.get("created_at"))
    return when.date() if when is not None else None


def patient_message(row: Mapping[str, Any]) -> common_pb2.Patient | None:
    """The patient context of an exam row (None when it has none). The age is the recorded one, or,
    with only a birth date, the age on the exam's date (:func:`exam_date`)."""
    context = PatientContext.from_row(row)
    if not context:
        return None
    age = age_on(context, exam_date(row))
    return common_pb2.Patient(
        id=context.id,
        name=context.name,
        sex=context.sex,
        birth_date=context.birth_date,
        age=age,
        referring_physician=context.referring_physician,
        patient_class=context.patient_class,
    )


def exam_message(row: Mapping[str, Any], *, site_code: str = "", patient: bool = False) -> common_pb2.Exam:
    """The exam as a message; with ``patient`` (readers of the exam only) its patient context."""
    msg = common_pb2.Exam(
        exam_id=row["id"],
        site=site_code,
        kind=KINDS.get(row["kind"], 0),
        modality=row["modality"] or "",
        state=row["state"],
        priority=PRIORITIES.get(row["priority"], 0),
        indication=row["indication"] or "",
        specialty=row["specialty"] or "",
        study_instance_uid=row["study_instance_uid"] or "",
        object_count=int(row["object_count"] or 0),
        total_bytes=int(row["total_bytes"] or 0),
        claimed_by=row.get("claimed_by_name") or "",
        reject_reason=row["reject_reason"] or "",
        incomplete=bool(row.get("incomplete")),
        refused_count=int(row.get("refused_count") or 0),
        follow_up_of=row.get("follow_up_of") or "",
        stored_sha256=list(row.get("stored_sha256") or ()),  # the uploading site's view only
        refused=[  # the uploading site's view only
            common_pb2.RefusedObject(
                role=r["role"],
                sha256=r["sha256"],
                sop_instance_uid=r.get("sop_instance_uid") or "",
                reason=r["reason"],
                message=r["message"],
                code=r["code"],
            )
            for r in row.get("refused") or ()
        ],
    )
    triage = triage_message(row["triage_json"] or "")
    if triage is not None:
        msg.triage.CopyFrom(triage)
    context = patient_message(row) if patient else None
    if context is not None:
        msg.patient.CopyFrom(context)
    for field, key in (
        ("received_at", "received_at"),
        ("deadline", "deadline"),
        ("lease_expires_at", "lease_expires_at"),
    ):
        stamp = ts(row.get(key))
        if stamp is not None:
            getattr(msg, field).CopyFrom(stamp)
    return msg


def object_message(row: Mapping[str, Any]) -> common_pb2.StoredObject:
    media = (
        "application/dicom"
        if row["role"] == "dicom"
        else ("text/plain" if row["role"] == "wfdb_header" else "application/octet-stream")
    )
    return common_pb2.StoredObject(
        object_id=row["id"],
        role=row["role"],
        sha256=row["sha256"],
        size=int(row["size"]),
        sop_instance_uid=row.get("sop_instance_uid") or "",
        series_instance_uid=row.get("series_instance_uid") or "",
        modality=row.get("modality") or "",
        media_type=media,
    )


def report_message(row: Mapping[str, Any], *, author: str = "", signer: str = "") -> common_pb2.Report:
    msg = common_pb2.Report(
        exam_id=row["exam_id"],
        version=int(row["version"]),
        status="amended" if row.get("amends_reason") else row["status"],
        text=row["text"],
        impression=row.get("impression") or "",
        critical=bool(row.get("critical")),
        author=author,
        signed_by=signer,
        amends_reason=row.get("amends_reason") or "",
        sha256=row.get("sha256") or "",
    )
    stamp = ts(row.get("signed_at"))
    if stamp is not None:
        msg.signed_at.CopyFrom(stamp)
    for s in json.loads(row.get("statements_json") or "[]"):
        msg.statements.add(**statement_fields(s))
    measured = json.loads(row.get("measurements_json") or "{}")
    if measured.get("values"):
        msg.measurements.CopyFrom(common_pb2.EcgMeasurements(**measured["values"], method="reader"))
        msg.measurements_edited.extend(measured.get("edited") or ())
    return msg


def statement_fields(s: Mapping[str, Any]) -> dict[str, Any]:
    """A report statement's fields (``teleread.v1.ReportStatement``) from its stored form."""
    return {
        "code": str(s["code"]),
        "text": str(s.get("text") or ""),
        "text_zh": str(s.get("text_zh") or ""),
        "source": str(s.get("source") or "reader"),
        "confirmed": bool(s.get("confirmed")),
    }


def measurement_values(msg: common_pb2.EcgMeasurements | None) -> dict[str, float]:
    """The values set in an ``EcgMeasurements`` (absent ones left out), by field name."""
    if msg is None:
        return {}
    names = [f.name for f in msg.DESCRIPTOR.fields if f.has_presence and f.type == f.TYPE_DOUBLE]
    return {n: float(getattr(msg, n)) for n in names if msg.HasField(n)}
