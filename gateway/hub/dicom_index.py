"""The hub's DICOMweb query index, kept at ingest: the site's DICOM studies and series as their
first stored instance says (``teleread/dicom_index.py`` reads the values from its header).

In the transaction that stores an instance: its study's and its series' rows are inserted when the
site has none yet, and left as they are otherwise (``ON CONFLICT DO NOTHING``), so of the streams of
one upload storing a study's first instances at once, one row is written and none waits or fails.
The instance's DICOM JSON goes into ``dicom_metadata`` in the same transaction, and leaves with its
object row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, delete, insert
from sqlalchemy.dialects import postgresql, sqlite

from teleread.db.engine import utcnow
from teleread.db.schema import dicom_metadata, dicom_series, dicom_studies
from teleread.dicom_index import DicomIndex


def _insert_new(conn: Connection, table: Table, values: Mapping[str, Any], keys: list[str]) -> None:
    """Insert a row unless one with the same ``keys`` is there."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=keys))


def record(
    conn: Connection, *, row: Mapping[str, Any], index: DicomIndex, metadata: str = "",
    pixel_range: tuple[int, int, str] | None = None,
) -> None:  # fmt: skip
    """The study and series rows of a stored instance's object ``row``, and its DICOM JSON
    ``metadata`` and native pixel data's place (offset, length, SHA-256) when there are (in the
    caller's transaction)."""
    now = utcnow()
    if metadata:
        offset, length, sha256 = pixel_range or (None, None, None)
        conn.execute(insert(dicom_metadata).values(object_id=row["id"], json=metadata, pixel_offset=offset,
                                                   pixel_length=length, pixel_sha256=sha256))  # fmt: skip
    site_id, study = row["site_id"], str(row.get("study_instance_uid") or "")
    if study:
        values = {"site_id": site_id, "study_instance_uid": study, "exam_id": row["exam_id"], "created_at": now}
        _insert_new(conn, dicom_studies, {**values, **index.study_columns()}, ["site_id", "study_instance_uid"])
    series = {
        "site_id": site_id, "study_instance_uid": study, "series_instance_uid": row["series_instance_uid"],
        "modality": row.get("modality") or "", "created_at": now, **index.series_columns(),
    }  # fmt: skip
    _insert_new(conn, dicom_series, series, ["site_id", "series_instance_uid"])


def forget(conn: Connection, object_ids: Sequence[str]) -> None:
    """The kept DICOM JSON of objects whose rows go (in the caller's transaction, before they go)."""
    conn.execute(delete(dicom_metadata).where(dicom_metadata.c.object_id.in_(list(object_ids))))
