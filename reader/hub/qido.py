"""QIDO-RS over the hub's query index: studies, series and instances a caller may see, matched on
their attributes as PS3.18 §8.3.4 says (single values, UID lists, ``*``/``?`` wildcards on text,
date ranges), paged with ``limit`` and ``offset``, answered as DICOM JSON (PS3.18 F.2).

Who sees what: a site identity its own site's studies; a reader the studies whose first exam is
of the reader's hospital and specialty and readable (queued, in reading or reported); anyone else
nothing (``ROLE_DENIED``). Fuzzy matching is not offered: ``fuzzymatching=true`` is answered
without it and the caller is told so (the HTTP layer's Warning header). An attribute the level
does not index is refused (``QIDO_UNKNOWN_ATTRIBUTE``), naming it.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, bindparam, func, select

from teleread.auth import Principal, require_reader
from teleread.db.schema import dicom_metadata, dicom_series, dicom_studies, exams, objects
from teleread.errors import InvalidInput, PermissionDenied
from teleread.lifecycle import READABLE
from teleread.vocab import Role

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CHARSET = "ISO_IR 192"  # UTF-8: the hub keeps text as it was sent


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: str  # eight hex digits
    vr: str
    column: Any  # a column of the level's query, or None for a value computed per row
    matching: str = "single"  # "single" | "uid" | "text" | "date" | "none"


def _a(keyword: str, tag: str, vr: str, column: Any, matching: str = "single") -> Attribute:
    return Attribute(keyword, tag, vr, column, matching)


PATIENT = (
    _a("PatientName", "00100010", "PN", exams.c.patient_name, "text"),
    _a("PatientID", "00100020", "LO", exams.c.patient_id, "text"),
    _a("PatientBirthDate", "00100030", "DA", exams.c.patient_birth_date, "date"),
    _a("PatientSex", "00100040", "CS", exams.c.patient_sex),
)
STUDY = (
    _a("StudyInstanceUID", "0020000D", "UI", dicom_studies.c.study_instance_uid, "uid"),
    _a("StudyDate", "00080020", "DA", dicom_studies.c.study_date, "date"),
    _a("StudyTime", "00080030", "TM", dicom_studies.c.study_time),
    _a("AccessionNumber", "00080050", "SH", dicom_studies.c.accession_number, "text"),
    _a("ReferringPhysicianName", "00080090", "PN", exams.c.referring_physician, "text"),
    _a("StudyDescription", "00081030", "LO", dicom_studies.c.study_description, "text"),
    _a("StudyID", "00200010", "SH", dicom_studies.c.study_id, "text"),
    _a("ModalitiesInStudy", "00080061", "CS", None, "modalities"),
    _a("NumberOfStudyRelatedSeries", "00201206", "IS", None, "none"),
    _a("NumberOfStudyRelatedInstances", "00201208", "IS", None, "none"),
    *PATIENT,
)
SERIES = (
    _a("SeriesInstanceUID", "0020000E", "UI", dicom_series.c.series_instance_uid, "uid"),
    _a("Modality", "00080060", "CS", dicom_series.c.modality),
    _a("SeriesNumber", "00200011", "IS", dicom_series.c.series_number),
    _a("SeriesDescription", "0008103E", "LO", dicom_series.c.series_description, "text"),
    _a("BodyPartExamined", "00180015", "CS", dicom_series.c.body_part_examined),
    _a("SeriesDate", "00080021", "DA", dicom_series.c.series_date, "date"),
    _a("SeriesTime", "00080031", "TM", dicom_series.c.series_time),
    _a("NumberOfSeriesRelatedInstances", "00201209", "IS", None, "none"),
)
INSTANCE = (
    _a("SOPClassUID", "00080016", "UI", objects.c.sop_class_uid, "uid"),
    _a("SOPInstanceUID", "00080018", "UI", objects.c.sop_instance_uid, "uid"),
    _a("InstanceNumber", "00200013", "IS", objects.c.instance_number),
    _a("Rows", "00280010", "US", objects.c.pixel_rows),
    _a("Columns", "00280011", "US", objects.c.pixel_columns),
    _a("NumberOfFrames", "00280008", "IS", objects.c.number_of_frames),
    _a("AvailableTransferSyntaxUID", "00083002", "UI", objects.c.transfer_syntax_uid, "none"),
)
# What each level answers with, and may be matched on (a level also matches on the levels above it).
LEVELS: Mapping[str, tuple[Attribute, ...]] = {
    "studies": STUDY,
    "series": (*SERIES, *STUDY),
    "instances": (*INSTANCE, *SERIES, *STUDY),
}
RETURNED: Mapping[str, tuple[Attribute, ...]] = {
    "studies": STUDY,
    "series": (*SERIES, _a("StudyInstanceUID", "0020000D", "UI", dicom_studies.c.study_instance_uid, "uid")),
    "instances": (
        *INSTANCE,
        _a("SeriesInstanceUID", "0020000E", "UI", dicom_series.c.series_instance_uid, "uid"),
        _a("StudyInstanceUID", "0020000D", "UI", dicom_studies.c.study_instance_uid, "uid"),
        _a("Modality", "00080060", "CS", dicom_series.c.modality),
    ),
}
PAGING = {"limit", "offset", "includefield", "fuzzymatching"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


@dataclass(frozen=True)
class Query:
    level: str
    matches: tuple[tuple[Attribute, str], ...]
    limit: int
    offset: int
    fuzzy: bool
    study: str = ""  # from the path: /studies/{study}/series
    series: str = ""


def _find(level: str, key: str) -> Attribute:
    wanted = key.upper()
    for attr in LEVELS[level]:
        if key == attr.keyword or wanted == attr.tag:
            return attr
    raise InvalidInput(f"QIDO: {key!r} is not an attribute this hub matches on at the {level} level",
                       reason="QIDO_UNKNOWN_ATTRIBUTE", metadata={"attribute": key[:64]})  # fmt: skip


def _count(value: str, name: str, *, low: int, high: int, default: int) -> int:
    if value == "":
        return default
    if not value.isdigit():
        raise InvalidInput(f"QIDO: {name} must be a whole number", reason="QIDO_BAD_PAGING")
    return max(low, min(high, int(value)))


def parse(level: str, params: Sequence[tuple[str, str]], *, study: str = "", series: str = "") -> Query:
    """The query a request's parameters ask for (repeated keys, as HTTP allows them)."""
    matches: list[tuple[Attribute, str]] = []
    limit, offset, fuzzy = DEFAULT_LIMIT, 0, False
    for key, value in params:
        if key == "limit":
            limit = _count(value, "limit", low=1, high=MAX_LIMIT, default=DEFAULT_LIMIT)
        elif key == "offset":
            offset = _count(value, "offset", low=0, high=10**9, default=0)
        elif key == "fuzzymatching":
            fuzzy = value.lower() == "true"
        elif key == "includefield":
            for name in value.split(","):
                if name and name != "all":
                    _find("instances", name)  # every known attribute is returned: just check the name
        elif value != "":  # an empty value: return the attribute, match anything (we always return it)
            attr = _find(level, key)
            if attr.matching == "none":
                raise InvalidInput(f"QIDO: {attr.keyword} cannot be matched on", reason="QIDO_UNKNOWN_ATTRIBUTE",
                                   metadata={"attribute": attr.keyword})  # fmt: skip
            matches.append((attr, value))
    for uid in (study, series):
        if uid and not _UID.match(uid):
            raise InvalidInput("QIDO: the path holds an invalid UID", reason="BAD_UID")
    return Query(level, tuple(matches), limit, offset, fuzzy, study, series)


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _condition(attr: Attribute, value: str) -> ColumnElement[bool]:
    column = attr.column
    if attr.matching == "uid":
        uids = [u for u in re.split(r"[,\\]", value) if u]
        if not all(_UID.match(u) for u in uids):
            raise InvalidInput(f"QIDO: {attr.keyword} holds an invalid UID", reason="BAD_UID")
        return column.in_(uids)  # type: ignore[no-any-return]
    if attr.matching == "date":
        m = _DATE.match(value)
        if not m or value == "-":
            raise InvalidInput(f"QIDO: {attr.keyword} is not a date or a date range", reason="QIDO_BAD_DATE")
        if "-" not in value:
            return column == value  # type: ignore[no-any-return]
        start, end = m.group(1), m.group(3)
        parts = [column != ""]
        if start:
            parts.append(column >= start)
        if end:
            parts.append(column <= end)
        return and_(*parts)
    if attr.matching == "text" and ("*" in value or "?" in value):
        return column.like(_like(value), escape="\\")  # type: ignore[no-any-return]
    if attr.matching == "modalities":
        wanted = [m for m in re.split(r"[,\\]", value) if m]
        inner = select(dicom_series.c.id).where(
            dicom_series.c.site_id == dicom_studies.c.site_id,
            dicom_series.c.study_instance_uid == dicom_studies.c.study_instance_uid,
            dicom_series.c.modality.in_(wanted),
        )
        return inner.exists()
    if attr.vr == "IS" or attr.vr == "US":
        if not value.lstrip("-").isdigit():
            raise InvalidInput(f"QIDO: {attr.keyword} must be a whole number", reason="QIDO_BAD_VALUE")
        return column == int(value)  # type: ignore[no-any-return]
    return column == value  # type: ignore[no-any-return]


def _scope(p: Principal) -> ColumnElement[bool]:
    """The studies ``p`` may see, as a condition on ``dicom_studies`` joined to its first exam."""
    if p.role is Role.SITE and p.site_id is not None:
        return dicom_studies.c.site_id == p.site_id
    if p.is_reader:
        hospital, specialty = require_reader(p)
        return and_(exams.c.hospital == hospital, exams.c.specialty == specialty, exams.c.state.in_(READABLE))
    raise PermissionDenied("DICOMweb answers sites and readers", reason="ROLE_DENIED")


def _base(q: Query, p: Principal) -> Select[Any]:
    studies = dicom_studies.join(exams, exams.c.id == dicom_studies.c.exam_id)
    if q.level == "studies":
        source: Any = studies
    elif q.level == "series":
        source = studies.join(
            dicom_series,
            and_(dicom_series.c.site_id == dicom_studies.c.site_id,
                 dicom_series.c.study_instance_uid == dicom_studies.c.study_instance_uid),
        )  # fmt: skip
    else:
        source = studies.join(
            objects,
            and_(objects.c.site_id == dicom_studies.c.site_id,
                 objects.c.study_instance_uid == dicom_studies.c.study_instance_uid),
        ).join(
            dicom_series,
            and_(dicom_series.c.site_id == objects.c.site_id,
                 dicom_series.c.series_instance_uid == objects.c.series_instance_uid),
        )  # fmt: skip
    columns = [a.column.label(a.keyword) for a in RETURNED[q.level] if a.column is not None]
    query = select(*columns, dicom_studies.c.site_id.label("site_id")).select_from(source).where(_scope(p))
    if q.study:
        query = query.where(dicom_studies.c.study_instance_uid == q.study)
    if q.series:
        query = query.where(dicom_series.c.series_instance_uid == q.series)
    for attr, value in q.matches:
        query = query.where(_condition(attr, value))
    return query


def _order(q: Query) -> list[Any]:
    if q.level == "studies":
        return [dicom_studies.c.study_date.desc(), dicom_studies.c.study_time.desc(), dicom_studies.c.id]
    if q.level == "series":
        return [dicom_series.c.series_number, dicom_series.c.id]
    return [objects.c.instance_number, objects.c.id]


def _counts(conn: Connection, rows: Sequence[Any], level: str) -> dict[tuple[int, str], dict[str, Any]]:
    """Per study (or series) on the page: its series and instance counts and modalities."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    if not rows:
        return out
    if level == "studies":
        keys = {(int(r.site_id), str(r.StudyInstanceUID)) for r in rows}
        uids = sorted({k[1] for k in keys})
        series = conn.execute(
            select(dicom_series.c.site_id, dicom_series.c.study_instance_uid, dicom_series.c.modality).where(
                dicom_series.c.study_instance_uid.in_(uids)
            )
        ).all()
        instances = conn.execute(
            select(objects.c.site_id, objects.c.study_instance_uid, func.count())
            .where(objects.c.study_instance_uid.in_(uids))
            .group_by(objects.c.site_id, objects.c.study_instance_uid)
        ).all()
        mods: dict[tuple[int, str], set[str]] = {}
        n_series: Counter[tuple[int, str]] = Counter()
        for s in series:
            key = (int(s.site_id), str(s.study_instance_uid))
            n_series[key] += 1
            if s.modality:
                mods.setdefault(key, set()).add(str(s.modality))
        n_instances = {(int(site), str(uid)): int(c) for site, uid, c in instances}
        for key in keys:
            out[key] = {"ModalitiesInStudy": sorted(mods.get(key, ())), "NumberOfStudyRelatedSeries": n_series[key],
                        "NumberOfStudyRelatedInstances": n_instances.get(key, 0)}  # fmt: skip
    elif level == "series":
        uids = sorted({r.SeriesInstanceUID for r in rows})
        counted = conn.execute(
            select(objects.c.site_id, objects.c.series_instance_uid, func.count())
            .where(objects.c.series_instance_uid.in_(uids))
            .group_by(objects.c.site_id, objects.c.series_instance_uid)
        ).all()
        for site, uid, n in counted:
            out[(site, uid)] = {"NumberOfSeriesRelatedInstances": int(n)}
    return out


def _element(attr: Attribute, value: Any) -> dict[str, Any] | None:
    if value is None or value == "" or value == []:
        return {"vr": attr.vr}
    values = value if isinstance(value, list) else [value]
    if attr.vr == "PN":
        groups = str(value).split("=")
        name = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups) if g}
        return {"vr": "PN", "Value": [name]}
    if attr.vr in ("IS", "US"):
        return {"vr": attr.vr, "Value": [int(v) for v in values]}
    return {"vr": attr.vr, "Value": [str(v) for v in values]}


def search(conn: Connection, p: Principal, q: Query, *, base_url: str) -> list[dict[str, Any]]:
    """The DICOM JSON datasets of one page of matches, in a stable order."""
    query = _base(q, p).order_by(*_order(q)).limit(q.limit).offset(q.offset)
    rows = conn.execute(query).all()
    counts = _counts(conn, rows, q.level)
    out = []
    for r in rows:
        m = r._mapping
        key_uid = str(m["StudyInstanceUID"] if q.level == "studies" else m.get("SeriesInstanceUID") or "")
        extra = counts.get((int(m["site_id"]), key_uid), {})
        item: dict[str, Any] = {"00080005": {"vr": "CS", "Value": [CHARSET]}}
        for attr in RETURNED[q.level]:
            value = m[attr.keyword] if attr.column is not None else extra.get(attr.keyword)
            element = _element(attr, value)
            if element is not None:
                item[attr.tag] = element
        study = m["StudyInstanceUID"]
        url = f"{base_url}/studies/{study}"
        if q.level in ("series", "instances"):
            url += f"/series/{m['SeriesInstanceUID']}"
        if q.level == "instances":
            url += f"/instances/{m['SOPInstanceUID']}"
        item["00081190"] = {"vr": "UR", "Value": [url]}
        out.append(dict(sorted(item.items())))
    return out


def any_visible(conn: Connection, p: Principal, study: str) -> bool:
    """Whether ``p`` may see the study (for a 404 that says nothing of other sites' studies)."""
    query = (
        select(dicom_studies.c.id)
        .select_from(dicom_studies.join(exams, exams.c.id == dicom_studies.c.exam_id))
        .where(_scope(p), dicom_studies.c.study_instance_uid == study)
        .limit(1)
    )
    return conn.execute(query).first() is not None


__all__ = ["Query", "parse", "search", "any_visible"]


def stored_instances(conn: Connection, p: Principal, *, study: str, series: str = "", instance: str = "") -> list[Any]:
    """The stored DICOM objects of a study (a series, an instance) that ``p`` may see, in series
    and instance order: their storage key, digest, size, UIDs, frames, (when ingest kept it) the
    place of their native pixel data and (once made) the viewer's copy, for WADO-RS."""
    for uid in (study, series, instance):
        if uid and not _UID.match(uid):
            raise InvalidInput("WADO: the path holds an invalid UID", reason="BAD_UID")
    if p.role is Role.SITE and p.site_id is not None:
        params: dict[str, Any] = {"site_id": p.site_id}
    elif p.is_reader:
        hospital, specialty = require_reader(p)
        params = {"hospital": hospital, "specialty": specialty}
    else:
        raise PermissionDenied("DICOMweb answers sites and readers", reason="ROLE_DENIED")
    statement = _instances_statement(reader="hospital" in params, series=bool(series), instance=bool(instance))
    return list(conn.execute(statement, {**params, "study": study, "series": series, "instance": instance}).all())


@functools.cache
def _instances_statement(*, reader: bool, series: bool, instance: bool) -> Select[Any]:
    """The query of :func:`stored_instances`, built once per shape (a frame request per image of a
    series runs it: building it each time cost more than running it)."""
    if reader:  # as _scope says, with the reader's values bound
        scope = and_(exams.c.hospital == bindparam("hospital"), exams.c.specialty == bindparam("specialty"),
                     exams.c.state.in_(READABLE))  # fmt: skip
    else:
        scope = dicom_studies.c.site_id == bindparam("site_id")
    query = (
        select(
            objects.c.id,
            objects.c.study_instance_uid,
            objects.c.storage_key,
            objects.c.sha256,
            objects.c.size,
            objects.c.sop_instance_uid,
            objects.c.series_instance_uid,
            objects.c.transfer_syntax_uid,
            objects.c.number_of_frames,
            dicom_metadata.c.pixel_offset,
            dicom_metadata.c.pixel_length,
            dicom_metadata.c.pixel_sha256,
            dicom_metadata.c.rendition_key,
            dicom_metadata.c.rendition_sha256,
            dicom_metadata.c.rendition_size,
        )  # fmt: skip
        .select_from(
            dicom_studies.join(exams, exams.c.id == dicom_studies.c.exam_id)
            .join(
                objects,
                and_(
                    objects.c.site_id == dicom_studies.c.site_id,
                    objects.c.study_instance_uid == dicom_studies.c.study_instance_uid,
                ),
            )
            .outerjoin(dicom_metadata, dicom_metadata.c.object_id == objects.c.id)
        )
        .where(scope, dicom_studies.c.study_instance_uid == bindparam("study"), objects.c.role == "dicom")
        .order_by(objects.c.series_instance_uid, objects.c.instance_number, objects.c.id)
    )
    if series:
        query = query.where(objects.c.series_instance_uid == bindparam("series"))
    if instance:
        query = query.where(objects.c.sop_instance_uid == bindparam("instance"))
    return query


def kept_metadata(conn: Connection, object_ids: Sequence[str]) -> dict[str, str]:
    """The DICOM JSON ingest kept for these objects, by object id (an object stored before it was
    kept has none)."""
    kept: dict[str, str] = {}
    for start in range(0, len(object_ids), 500):
        batch = list(object_ids[start : start + 500])
        query = select(dicom_metadata.c.object_id, dicom_metadata.c.json).where(dicom_metadata.c.object_id.in_(batch))
        kept.update({str(r.object_id): str(r.json) for r in conn.execute(query)})
    return kept
