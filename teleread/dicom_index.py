"""What the DICOMweb queries ask of a stored instance's study and series, read from its header.

The hub's check of an arriving instance (``gateway/validate.py``) reads these with the rest of the
header, and ingest keeps them: on the object's row (instance number, size, frames, transfer
syntax) and, from a study's or series' first stored instance, on its ``dicom_studies`` and
``dicom_series`` row. A value that cannot be read, or is not of its VR's form, is '' (or None for a
number): the index never refuses a file. Text is kept on one line, cut to its VR's length.

The instance's DICOM JSON for WADO-RS metadata (:func:`metadata_json`) is written by the same check,
so a series' metadata is read from the database; the hub's DICOMweb builds the same JSON from the
file for an instance stored before it was kept.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

import pydicom.dataset

_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\u202a-\u202e\u2066-\u2069]+")
INT32 = 2**31 - 1
DICOMWEB_PREFIX = "/dicomweb"  # where the hub (and the station, passing it through) serves DICOMweb
BULK_BYTES = 1024  # a binary value larger than this is bulk data in metadata


@dataclass(frozen=True)
class DicomIndex:
    study_date: str = ""  # DA, YYYYMMDD
    study_time: str = ""  # TM
    accession_number: str = ""  # SH
    study_description: str = ""  # LO
    study_id: str = ""  # SH
    series_number: int | None = None  # IS
    series_description: str = ""  # LO
    body_part_examined: str = ""  # CS
    series_date: str = ""
    series_time: str = ""
    instance_number: int | None = None  # IS

    def study_columns(self) -> dict[str, str]:
        return {
            "study_date": self.study_date, "study_time": self.study_time, "accession_number": self.accession_number,
            "study_description": self.study_description, "study_id": self.study_id,
        }  # fmt: skip

    def series_columns(self) -> dict[str, Any]:
        return {
            "series_number": self.series_number, "series_description": self.series_description,
            "body_part_examined": self.body_part_examined, "series_date": self.series_date,
            "series_time": self.series_time,
        }  # fmt: skip


def _first(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
        if value is not None and not isinstance(value, (str, bytes, int, float)):  # a MultiValue
            value = value[0] if len(value) else None
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        return "" if value is None else str(value)
    except Exception:  # noqa: BLE001 - untrusted input: an unreadable value counts as absent
        return ""


def text(value: str, limit: int) -> str:
    """One line of at most ``limit`` characters."""
    return _CONTROL.sub(" ", value).strip()[:limit].strip()


def date_value(value: str) -> str:
    value = value.strip()
    if not _DA.match(value):
        return ""
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return ""
    return value


def time_value(value: str) -> str:
    value = value.strip()
    if not _TM.match(value):
        return ""
    hh, mm, ss = int(value[:2]), int(value[2:4] or 0), int(value[4:6] or 0)
    return value if hh < 24 and mm < 60 and ss < 61 else ""


def int_value(value: str) -> int | None:
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if -INT32 <= number <= INT32 else None


def index_of(ds: Any) -> DicomIndex:
    """The index values of a dataset (its header; pixel data is never read)."""
    return DicomIndex(
        study_date=date_value(_first(ds, "StudyDate")),
        study_time=time_value(_first(ds, "StudyTime")),
        accession_number=text(_first(ds, "AccessionNumber"), 16),
        study_description=text(_first(ds, "StudyDescription"), 64),
        study_id=text(_first(ds, "StudyID"), 16),
        series_number=int_value(_first(ds, "SeriesNumber")),
        series_description=text(_first(ds, "SeriesDescription"), 64),
        body_part_examined=text(_first(ds, "BodyPartExamined"), 16),
        series_date=date_value(_first(ds, "SeriesDate")),
        series_time=time_value(_first(ds, "SeriesTime")),
        instance_number=int_value(_first(ds, "InstanceNumber")),
    )


def instance_url(study: str, series: str, instance: str) -> str:
    """An instance's WADO-RS URL from the origin that serves DICOMweb."""
    return f"{DICOMWEB_PREFIX}/studies/{study}/series/{series}/instances/{instance}"


def bulk_paths(ds: Any) -> dict[int, str]:
    """Where each data element of ``ds`` sits, as the path of a bulk data URI: ``TTTTTTTT`` at the top
    level, ``SSSSSSSS/i/TTTTTTTT`` inside item ``i`` (from 0) of sequence ``SSSSSSSS``, and so on
    (keyed by the element object, so an icon's pixel data is told from the image's)."""
    paths: dict[int, str] = {}

    def walk(dataset: Any, prefix: str) -> None:
        for element in dataset:
            path = f"{prefix}{element.tag:08X}"
            paths[id(element)] = path
            if element.VR == "SQ":
                for i, item in enumerate(element.value):
                    walk(item, f"{path}/{i}/")

    walk(ds, "")
    return paths


def metadata_json(ds: Any, url: str) -> dict[str, Any]:
    """An instance's DICOM JSON without its bulk data (``ds`` read with its pixel data, or deferred
    values still readable): pixel data becomes the instance's first frame's URL, as viewers ask
    for it, and any other binary value over :data:`BULK_BYTES` a ``bulkdata/`` URI under ``url``."""
    ds.file_meta = pydicom.dataset.FileMetaDataset()  # the file meta group is not part of the dataset
    paths = bulk_paths(ds)

    def bulk(element: Any) -> str:
        return f"{url}/bulkdata/{paths.get(id(element), f'{element.tag:08X}')}"

    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=BULK_BYTES, bulk_data_element_handler=bulk)
    if "7FE00010" in out:
        out["7FE00010"] = {"vr": out["7FE00010"].get("vr", "OW"), "BulkDataURI": f"{url}/frames/1"}
    return out
