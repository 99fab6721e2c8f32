"""Patient data never reaches logs or error messages: a canary patient goes through ingest (valid
and malformed files), triage and the printed report (rendered after the signature, fetched by the
site and the reader, pulled by the gateway, rendered again after a loss and by the clean-up pass),
and neither the JSON logs nor the gRPC errors carry it.

The canary's name, ID and requesting clinician come in DICOM headers, WFDB header comments and the
upload request (some of them in fields whose values the hub drops as invalid); the exam's reader
receives them, and still no log line or error message holds one."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import grpc
import pydicom
import pytest

from helpers import copy_testdata, error_reason, wait_for, write_synthetic_wfdb
from teleread.logs import configure_logging
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

CANARY = "PHI_CANARY_张三"
CANARY_ID = "PHI-ID-99887766"
CANARY_CLINICIAN = "PHI_DOCTOR^李医生"
WFDB_CANARY = "PHI_CANARY_WFDB_ZHANGSAN"  # wfdb reads headers as ASCII
REQUEST = common_pb2.Patient(
    id=CANARY_ID,
    name=CANARY,
    referring_physician=CANARY_CLINICIAN,
    birth_date="PHI_CANARY_DATE",  # invalid: dropped, and the log says so by field name only
    patient_class="PHI_CANARY_CLASS",
)


def _dicom_with_canary(path: Path, *, corrupt: bool) -> bytes:
    ds = pydicom.dcmread(path)
    ds.PatientName = CANARY
    ds.PatientID = CANARY_ID
    ds.PatientBirthDate = "19500101"
    ds.ReferringPhysicianName = CANARY_CLINICIAN
    ds.SpecificCharacterSet = "ISO_IR 192"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if corrupt:  # a broken length right after the patient module: the parser fails near the canary
        at = data.index(CANARY.encode()) + len(CANARY.encode())
        data = data[:at] + b"\x10\x00\x30\x00DA\xff\xff" + data[at:]
    return data


def _wfdb_with_canary(folder: Path, *, short: bool) -> tuple[bytes, bytes]:
    """A WFDB record whose comments carry the canary (and an age and sex the hub reads); ``short``
    cuts the signal file, so the exam is refused at commit with the header in hand."""
    header, signal = write_synthetic_wfdb(folder, rhythm="normal", name="canary-short" if short else "canary")
    text = header.read_text() + f"# <age>: 63  <sex>: F\n# patient: {WFDB_CANARY} id: {WFDB_CANARY}-ID\n"
    data = signal.read_bytes()
    return text.encode(), data[: len(data) // 2] if short else data


def _upload(
    ingest, key: str, data: bytes, *, role: str = "dicom", more: tuple[tuple[str, bytes], ...] = (),
    kind: int = common_pb2.EXAM_KIND_IMAGING, patient: common_pb2.Patient | None = None,
) -> grpc.RpcError | ingest_pb2.UploadStatus:  # fmt: skip
    exam = ingest.OpenExam(
        ingest_pb2.OpenExamRequest(
            client_exam_key=key,
            kind=kind,
            priority=common_pb2.PRIORITY_ROUTINE,
            indication="fever",
            patient=patient,
        ),
        timeout=10,
    )
    try:
        for object_role, body in ((role, data), *more):
            status = ingest.BeginUpload(
                ingest_pb2.BeginUploadRequest(
                    exam_id=exam.exam_id, size=len(body), sha256=hashlib.sha256(body).hexdigest(), role=object_role
                ),
                timeout=10,
            )
            result = ingest.Upload(
                iter([ingest_pb2.UploadChunk(upload_id=status.upload_id, offset=0, data=body)]), timeout=30
            )
        ingest.CommitExam(
            ingest_pb2.CommitExamRequest(exam_id=exam.exam_id, expected_objects=1 + len(more)), timeout=10
        )
        wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam.exam_id), timeout=10).state == "queued")
        return result
    except grpc.RpcError as err:
        return err


def _through_the_printed_report(stack, tmp_path: Path) -> str:
    """Sign the canary CT, and take its printed report through every path: the rendering after the
    signature, the site's and the reader's fetch, the gateway's pull, a fetch after the stored bytes
    were lost and the clean-up pass after the row forgot them; the PDF's text."""
    from sqlalchemy import update

    from teleread.db.schema import reports
    from teleread.gateway.clinic.results import ResultsInbox
    from teleread.storage import report_pdf_key
    from teleread.v1 import results_pb2_grpc

    radio = worklist_pb2_grpc.WorklistStub(stack.channel("radio"))
    claim = radio.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=120), timeout=10)
    radio.SaveReport(
        worklist_pb2.SaveReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence, text="No focal lesion."),
        timeout=10,
    )
    radio.SignReport(worklist_pb2.SignReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10)
    assert stack.hub.pdfs.flush(timeout=30)
    exam_id = claim.exam.exam_id
    site = results_pb2_grpc.ResultsStub(stack.channel("site_a"))
    request = common_pb2.GetReportPdfRequest(exam_id=exam_id)
    data = b"".join(c.data for c in site.GetReportPdf(request, timeout=30))
    assert b"".join(c.data for c in radio.GetReportPdf(request, timeout=30)) == data
    assert ResultsInbox(tmp_path / "results").poll(site) == 1
    key = report_pdf_key(tenant_id=1, exam_id=exam_id, version=1)
    assert stack.hub.store.exists(key)
    stack.hub.store.delete(key)
    assert not stack.hub.store.exists(key)
    assert b"".join(c.data for c in site.GetReportPdf(request, timeout=30)) == data
    with stack.hub.engine.begin() as conn:
        conn.execute(update(reports).where(reports.c.exam_id == exam_id).values(pdf_sha256=None, pdf_size=None))
    assert stack.hub.janitor.run_once().pdfs_rendered == 1
    import pypdf

    return "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(data)).pages)


@pytest.mark.timeout(120)
def test_no_patient_data_in_logs_or_errors(embedded_stack, tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    ct, ecg = copy_testdata(tmp_path, "CT_small.dcm", "waveform_ecg.dcm")
    header, signal = _wfdb_with_canary(tmp_path / "wfdb", short=False)
    short_header, short_signal = _wfdb_with_canary(tmp_path / "wfdb-short", short=True)
    outcomes = [
        _upload(ingest, "canary-ok", _dicom_with_canary(ct, corrupt=False), patient=REQUEST),
        _upload(ingest, "canary-ecg", _dicom_with_canary(ecg, corrupt=False)),
        _upload(ingest, "canary-bad", _dicom_with_canary(ecg, corrupt=True), patient=REQUEST),
        _upload(ingest, "canary-wfdb", header, role="wfdb_header", more=(("wfdb_signal", signal),),
                kind=common_pb2.EXAM_KIND_ECG, patient=REQUEST),
        _upload(ingest, "canary-wfdb-short", short_header, role="wfdb_header", more=(("wfdb_signal", short_signal),),
                kind=common_pb2.EXAM_KIND_ECG, patient=REQUEST),
    ]  # fmt: skip
    assert isinstance(outcomes[0], ingest_pb2.UploadStatus)
    assert isinstance(outcomes[2], grpc.RpcError)  # the malformed one was refused
    assert outcomes[2].code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(outcomes[2]) == "TRUNCATED"
    assert isinstance(outcomes[3], ingest_pb2.UploadStatus)
    assert isinstance(outcomes[4], grpc.RpcError)  # the cut record is refused at commit, its header in hand
    assert error_reason(outcomes[4]) == "WFDB_SIGNAL_SIZE_MISMATCH"

    # The exams' readers receive the canary: from the DICOM headers, and for the WFDB record from the
    # request (its header gives age and sex only).
    seen = []
    for who in ("radio", "cardio"):
        worklist = worklist_pb2_grpc.WorklistStub(embedded_stack.channel(who))
        for exam in worklist.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams:
            details = worklist.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam.exam_id), timeout=10)
            seen.append(details.exam.patient)
    assert len(seen) == 3
    assert all((p.name, p.id, p.referring_physician) == (CANARY, CANARY_ID, CANARY_CLINICIAN) for p in seen)
    assert {(p.sex, p.age) for p in seen if p.age == "063Y"} == {("F", "063Y")}  # the WFDB header's
    assert all(p.patient_class == "" for p in seen)  # the request's invalid class was dropped
    printed = _through_the_printed_report(embedded_stack, tmp_path)
    assert CANARY in printed and CANARY_ID in printed and "李医生" in printed  # the PDF path carried the canary
    logging.getLogger("teleread.test").warning("flush marker")
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line.get("rpc") == "Upload" and line.get("status") for line in lines)  # logs were written
    assert all({"ts", "level", "msg"} <= set(line) for line in lines)
    assert "PATIENT_VALUE_INVALID" in text  # the dropped request values were logged, by field name
    for needle in (CANARY, CANARY_ID, CANARY_CLINICIAN, "李医生", WFDB_CANARY, "19500101", "PHI_CANARY", "PHI_DOCTOR"):
        assert needle not in text
        for outcome in outcomes:
            if isinstance(outcome, grpc.RpcError):
                assert needle not in (outcome.details() or "")
                assert needle not in str(outcome.trailing_metadata())
