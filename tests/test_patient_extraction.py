"""What an arriving file says of its patient, read by the check every door applies
(``teleread.gateway.validate``): the DICOM patient module and the requesting clinician, a WFDB
header's age and sex comments. A malformed patient value never refuses the file: it is dropped."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from helpers import datasets_dir, needs_datasets
from teleread.gateway.validate import check_dicom_instance, inspect_wfdb_header
from teleread.patient import PatientContext

PN = "Wang^Xiaoming=王^小明"


def _dicom(tmp_path: Path, name: str = "ct.dcm", *, charset: str = "ISO_IR 192", **values: object) -> Path:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.SpecificCharacterSet = charset
    for keyword in ("PatientSex", "PatientAge", "PatientBirthDate", "ReferringPhysicianName"):
        if keyword in ds:
            del ds[keyword]
    path = tmp_path / name
    with warnings.catch_warnings():  # invalid values are written on purpose
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("charset", ["ISO_IR 192", "GB18030"])
def test_a_dicom_patient_module_is_read_as_given(tmp_path: Path, charset: str) -> None:
    path = _dicom(
        tmp_path,
        charset=charset,
        PatientID="P-0042",
        PatientName=PN,
        PatientSex="F",
        PatientBirthDate="19630201",
        PatientAge="063Y",
        ReferringPhysicianName="Li^Wei=李^伟",
    )
    info = check_dicom_instance(path)
    assert info.patient == PatientContext(
        id="P-0042", name=PN, sex="F", birth_date="19630201", age="063Y", referring_physician="Li^Wei=李^伟"
    )
    assert info.patient_dropped == ()
    assert "Wang" not in repr(info) and "P-0042" not in repr(info)  # never in a repr that may be logged


@pytest.mark.parametrize(
    "keyword, value, field",
    [
        ("PatientSex", "male?", "sex"),
        ("PatientSex", "X", "sex"),
        ("PatientBirthDate", "19630231", "birth_date"),
        ("PatientBirthDate", "abc", "birth_date"),
        ("PatientBirthDate", "29990101", "birth_date"),
        ("PatientAge", "63", "age"),
        ("PatientAge", "63 Y", "age"),
        ("PatientAge", "999Y", "age"),
    ],
)
def test_an_invalid_sex_date_or_age_is_dropped_and_the_file_accepted(
    tmp_path: Path, keyword: str, value: str, field: str
) -> None:
    info = check_dicom_instance(_dicom(tmp_path, PatientID="P-1", **{keyword: value}))
    assert getattr(info.patient, field) == ""
    assert info.patient_dropped == (field,)
    assert info.patient.id == "P-1"  # the rest is kept


def test_the_first_of_several_names_and_an_absent_module(tmp_path: Path) -> None:
    info = check_dicom_instance(_dicom(tmp_path, ReferringPhysicianName=["Li^Wei", "Zhao^Min"]))
    assert info.patient.referring_physician == "Li^Wei"
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    for keyword in ("PatientID", "PatientName", "PatientSex", "PatientAge", "PatientBirthDate"):
        if keyword in ds:
            del ds[keyword]
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, enforce_file_format=True)
    assert not check_dicom_instance(bare).patient


def test_the_bundled_ecg_and_ct_give_their_patient(tmp_path: Path) -> None:
    ecg = check_dicom_instance(Path(str(get_testdata_file("waveform_ecg.dcm"))))
    assert ecg.patient.name and ecg.patient.id  # as the file carries them
    ct = check_dicom_instance(Path(str(get_testdata_file("CT_small.dcm"))))
    assert ct.patient.age == "000Y" and ct.patient.sex == "O"


needs_wfdb = needs_datasets("wfdb")


@needs_wfdb
def test_mit_bih_and_ptb_xl_headers() -> None:
    mit = inspect_wfdb_header(datasets_dir() / "wfdb/mitdb-100-60s/100.hea")
    assert mit.patient == PatientContext(age="069Y", sex="M")  # "# 69 M 1085 1629 x1"
    ptbxl = inspect_wfdb_header(datasets_dir() / "wfdb/ptbxl-records100/00009_lr.hea")
    assert not ptbxl.patient  # PTB-XL keeps age and sex in its database, not in the header


HEADER = "rec 1 500 1000\nrec.dat 16 200/mV 16 0 0 0 0 I\n"


@pytest.mark.parametrize(
    "comments, expected",
    [
        ("# <age>: 63  <sex>: M  <diagnoses>: none\n", PatientContext(age="063Y", sex="M")),
        ("# Age: 63 Sex: male\n", PatientContext(age="063Y", sex="M")),
        ("# age: 81\n# sex: female\n# ECG date: 01/10/1990\n", PatientContext(age="081Y", sex="F")),
        ("# age: 300\n# sex: unknown\n", PatientContext()),  # malformed: dropped, the header accepted
        ("# age: 张三\n# sex: 男性\n", PatientContext()),  # non-ASCII comments (wfdb reads ASCII)
        ("", PatientContext()),
    ],
)
def test_wfdb_comments_give_age_and_sex(tmp_path: Path, comments: str, expected: PatientContext) -> None:
    path = tmp_path / "stored-header"
    path.write_text(HEADER + comments, encoding="utf-8")
    assert inspect_wfdb_header(path).patient == expected


@needs_wfdb
def test_a_header_stored_under_its_hash_keeps_its_comments(tmp_path: Path) -> None:
    stored = tmp_path / "0f" / "by-hash"
    stored.parent.mkdir()
    shutil.copy(datasets_dir() / "wfdb/mitdb-100-60s/100.hea", stored)
    assert inspect_wfdb_header(stored).patient.age == "069Y"
