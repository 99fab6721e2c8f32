"""The DICOMweb index values read from a header: kept when of their VR's form, '' or None
otherwise, never a refusal; text on one line, cut to its VR's length."""

from __future__ import annotations

import warnings

from pydicom.dataset import Dataset

from teleread.dicom_index import DicomIndex, index_of


def _ds(**values: object) -> Dataset:
    ds = Dataset()
    with warnings.catch_warnings():  # invalid values are set on purpose
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def test_the_study_series_and_instance_values_are_read() -> None:
    ds = _ds(
        StudyDate="20261203", StudyTime="134501.25", AccessionNumber="ACC-7", StudyDescription="CT CHEST",
        StudyID="S9", SeriesNumber="3", SeriesDescription="Lung 1.0", BodyPartExamined="CHEST",
        SeriesDate="20261203", SeriesTime="1346", InstanceNumber="42",
    )  # fmt: skip
    assert index_of(ds) == DicomIndex(
        study_date="20261203", study_time="134501.25", accession_number="ACC-7", study_description="CT CHEST",
        study_id="S9", series_number=3, series_description="Lung 1.0", body_part_examined="CHEST",
        series_date="20261203", series_time="1346", instance_number=42,
    )  # fmt: skip


def test_values_not_of_their_form_are_dropped_and_text_is_one_line_cut_to_its_length() -> None:
    ds = _ds(
        StudyDate="20261345", StudyTime="256000", SeriesDate="2026-12-03", SeriesTime="12a0", AccessionNumber="A" * 40,
        StudyDescription="CT\nCHEST\u2028\u202eLUNG", BodyPartExamined=["CHEST", "ABDOMEN"],
    )  # fmt: skip
    ds.add_new(0x00200011, "LO", "three")  # SeriesNumber, as a sender wrote it (IS would refuse it here)
    ds.add_new(0x00200013, "LO", "99999999999")  # InstanceNumber beyond IS's range
    index = index_of(ds)
    assert (index.study_date, index.study_time, index.series_date, index.series_time) == ("", "", "", "")
    assert index.series_number is None and index.instance_number is None
    assert index.accession_number == "A" * 16
    assert index.study_description == "CT CHEST LUNG"  # line breaks and direction overrides: spaces
    assert index.body_part_examined == "CHEST"  # the first of several values


def test_an_empty_header_gives_an_empty_index() -> None:
    assert index_of(Dataset()) == DicomIndex()
