"""What the technician or the clinic gateway says of the patient reaches the exam's readers: the
``teleread upload`` patient options (refused for files of several exams, never printed), the upload
API's ``patient``, and the gateway's patient class setting."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from helpers import copy_testdata, wait_for, wait_for_state, write_synthetic_wfdb
from teleread.app.cli import main
from teleread.errors import InvalidInput
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.clinic.service import Gateway
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.patient import PatientContext
from teleread.settings import GatewaySettings, Settings
from teleread.v1 import common_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)
PN = "Wang^Xiaoming=王^小明"


def _conn(stack, who: str) -> list[str]:
    return ["--hub", stack.address, "--token", stack.tokens[who]]


def _claimed_patient(stack, who: str) -> common_pb2.Patient:
    claim = worklist_pb2_grpc.WorklistStub(stack.channel(who)).ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    return claim.exam.patient


def _wait_for_the_queue(stack, who: str) -> None:
    reader = worklist_pb2_grpc.WorklistStub(stack.channel(who))
    wait_for(lambda: reader.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams, timeout=60)


def test_the_upload_command_sends_what_the_technician_knows(embedded_stack, tmp_path: Path, capsys) -> None:
    header, _ = write_synthetic_wfdb(tmp_path / "rec", rhythm="normal", name="rec-1")
    header.write_text(header.read_text() + "# Age: 63 Sex: male\n")
    options = [
        "--patient-id", "CLINIC-77", "--patient-name", PN, "--patient-sex", "F", "--patient-birth-date", "19630201",
        "--referring-physician", "Li^Wei=李^伟", "--patient-class", "emergency",
    ]  # fmt: skip
    rc = main(["upload", str(tmp_path / "rec"), "--site", "clinic-a", *options, *_conn(embedded_stack, "tech_a")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "CLINIC-77" not in out and "Wang" not in out and "李" not in out  # nothing of the patient is printed
    _wait_for_the_queue(embedded_stack, "cardio")
    assert _claimed_patient(embedded_stack, "cardio") == common_pb2.Patient(
        id="CLINIC-77", name=PN, sex="M", birth_date="19630201", age="063Y",  # the header's age and sex win
        referring_physician="Li^Wei=李^伟", patient_class="emergency",
    )  # fmt: skip


def test_patient_options_are_refused_for_files_of_several_exams(embedded_stack, tmp_path: Path, capsys) -> None:
    write_synthetic_wfdb(tmp_path / "two", rhythm="normal", name="rec-1")
    write_synthetic_wfdb(tmp_path / "two", rhythm="brady", name="rec-2", seed=2)
    rc = main(
        ["upload", str(tmp_path / "two"), "--site", "clinic-a", "--patient-id", "ONE-PATIENT",
         *_conn(embedded_stack, "tech_a")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2 and "one patient" in captured.err and "ONE-PATIENT" not in captured.out + captured.err
    reader = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("cardio"))
    assert list(reader.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams) == []  # nothing sent


@pytest.mark.parametrize(
    "option, value", [("--patient-birth-date", "1963-02-31"), ("--patient-age", "sixty"), ("--patient-sex", "X")]
)
def test_an_invalid_patient_option_is_refused_before_anything_is_sent(
    embedded_stack, tmp_path: Path, option: str, value: str
) -> None:
    write_synthetic_wfdb(tmp_path / "rec", rhythm="normal")
    with pytest.raises(SystemExit) as refused:
        main(["upload", str(tmp_path / "rec"), "--site", "clinic-a", option, value, *_conn(embedded_stack, "tech_a")])
    assert refused.value.code == 2


def test_the_upload_api_takes_a_patient_and_the_files_win(embedded_stack, tmp_path: Path) -> None:
    (ct,) = copy_testdata(tmp_path / "in", "CT_small.dcm")
    ds = pydicom.dcmread(ct)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName = "FILE-ID", PN
    ds.save_as(ct, enforce_file_format=True)
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    patient = PatientContext(id="TYPED-ID", referring_physician="Zhao^Min", patient_class="inpatient")
    [outcome] = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams, patient=patient)
    assert outcome.ok, outcome.errors
    wait_for_state(ingest, outcome.exam_id, "queued")
    seen = _claimed_patient(embedded_stack, "radio")
    assert (seen.id, seen.name, seen.referring_physician, seen.patient_class) == (
        "FILE-ID", PN, "Zhao^Min", "inpatient",
    )  # fmt: skip


def test_the_gateway_sends_its_patient_class(embedded_stack, tmp_path: Path) -> None:
    (ecg,) = copy_testdata(tmp_path / "in", "waveform_ecg.dcm")
    box = Outbox(tmp_path / "outbox")
    ds = pydicom.dcmread(ecg, stop_before_pixels=True)
    with open(ecg, "rb") as f:
        box.receive(f, group_key=ds.StudyInstanceUID, instance_key=ds.SOPInstanceUID, kind="ecg")
    box.complete(ds.StudyInstanceUID)
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    (result,) = Forwarder(box, ingest, patient_class="emergency").drain()
    assert result.outcome == "committed"
    wait_for_state(ingest, result.detail, "queued")
    seen = _claimed_patient(embedded_stack, "cardio")
    assert seen.patient_class == "emergency" and seen.id == str(ds.PatientID)  # the rest from the file

    wrong = Settings(data_dir=tmp_path / "gw", gateway=GatewaySettings(patient_class="ward"))
    with pytest.raises(InvalidInput) as refused:
        Gateway(wrong, ingest=ingest, results=None)
    assert refused.value.reason == "BAD_SETTING"
