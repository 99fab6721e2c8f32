"""The DICOMweb query index kept at ingest, on both databases: a study's and its series' rows from
their first stored instance, each instance's number, size, frames and transfer syntax on its row;
one row per study and series however many exams and streams bring its instances."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from conftest import HubStack
from helpers import wait_for_state
from teleread.db.schema import dicom_series, dicom_studies, objects
from teleread.v1 import common_pb2, ingest_pb2_grpc
from test_patient_context import upload


def _instance(folder: Path, name: str, *, study: str, series: str, number: int, **values: object) -> Path:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def test_a_studys_series_and_instances_are_indexed_once_from_their_first_instance(
    hub_stack: HubStack, tmp_path: Path
) -> None:
    study, lung, soft = generate_uid(), generate_uid(), generate_uid()
    study_values = {
        "StudyDate": "20261203",
        "StudyTime": "0912",
        "AccessionNumber": "ACC-1",
        "StudyDescription": "CT CHEST",
    }
    files = [
        _instance(tmp_path, "1.dcm", study=study, series=lung, number=1, SeriesNumber=2, SeriesDescription="Lung",
                  BodyPartExamined="CHEST", **study_values),
        _instance(tmp_path, "2.dcm", study=study, series=lung, number=2, SeriesNumber=2, SeriesDescription="Lung",
                  **study_values),
        _instance(tmp_path, "3.dcm", study=study, series=soft, number=1, SeriesNumber=3, SeriesDescription="Soft",
                  StudyDate="19990101", **{k: v for k, v in study_values.items() if k != "StudyDate"}),
    ]  # fmt: skip
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam = upload(ingest, [(f, "dicom") for f in files], kind=common_pb2.EXAM_KIND_IMAGING, study=study)
    wait_for_state(ingest, exam.exam_id, "queued")
    late = _instance(tmp_path / "late", "4.dcm", study=study, series=lung, number=3, SeriesNumber=2)
    follow_up = upload(ingest, [(late, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=study)

    with hub_stack.hub.engine.connect() as conn:
        studies = conn.execute(select(dicom_studies)).all()
        series = {r.series_instance_uid: r for r in conn.execute(select(dicom_series))}
        rows = conn.execute(select(objects).where(objects.c.study_instance_uid == study)).all()
    assert len(studies) == 1
    s = studies[0]
    assert (s.study_instance_uid, s.exam_id, s.study_date, s.study_time, s.accession_number, s.study_description) == (
        study, exam.exam_id, "20261203", "0912", "ACC-1", "CT CHEST",
    )  # fmt: skip
    assert follow_up.exam_id != exam.exam_id  # the late instance's exam follows the study, which stays one
    assert set(series) == {lung, soft}
    assert (series[lung].series_number, series[lung].series_description, series[lung].modality) == (2, "Lung", "CT")
    assert series[lung].body_part_examined == "CHEST" and series[soft].series_number == 3
    assert all(r.study_instance_uid == study for r in series.values())
    assert sorted((r.series_instance_uid == lung, r.instance_number) for r in rows) == [
        (False, 1), (True, 1), (True, 2), (True, 3),
    ]  # fmt: skip
    ct = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")), stop_before_pixels=True)
    for r in rows:
        assert (r.pixel_rows, r.pixel_columns, r.number_of_frames) == (ct.Rows, ct.Columns, 1)
        assert r.transfer_syntax_uid == str(ct.file_meta.TransferSyntaxUID) and r.site_id == s.site_id
