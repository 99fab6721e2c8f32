"""Conversion between database rows (mappings) and ``teleread.v1`` messages."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping

from google.protobuf import timestamp_pb2

from teleread.db.engine import as_utc
from teleread.v1 import common_pb2
from teleread.vocab import ExamKind, Level, Priority

LEVELS = {
    Level.CRITICAL: common_pb2.LEVEL_CRITICAL,
    Level.URGENT: common_pb2.LEVEL_URGENT,
    Level.ROUTINE: common_pb2.LEVEL_ROUTINE,
}
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
    if not raw:
        return None
    data = json.loads(raw)
    findings = [
        common_pb2.Finding(
            code=f.get("code", ""),
            title=f.get("title", ""),
            level=LEVELS.get(f.get("level", ""), 0),
            evidence=[
                common_pb2.Evidence(
                    name=e.get("name", ""),
                    value=float(e.get("value") or 0.0),
                    unit=e.get("unit", "") or "",
                    lead=e.get("lead", "") or "",
                    threshold=float(e.get("threshold") or 0.0),
                )
                for e in f.get("evidence", [])
            ],
        )
        for f in data.get("findings", [])
    ]
    return common_pb2.Triage(
        level=LEVELS.get(data.get("level", ""), 0),
        score=float(data.get("score", 0.0)),
        findings=findings,
        rules_version=data.get("rules_version", ""),
        summary=data.get("summary", ""),
        models=[str(x) for x in data.get("models", [])],
    )


def exam_message(row: Mapping[str, Any], *, site_code: str = "") -> common_pb2.Exam:
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
    return msg
