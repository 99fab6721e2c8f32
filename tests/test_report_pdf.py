"""The printed report, from the hub, over real gRPC on both deployments: a signed (and an amended)
version's PDF is rendered after the signature, stored under the exam and version and recorded on
the version's row; the site (Results.GetReportPdf) and the exam's readers (Worklist.GetReportPdf)
get exactly those bytes, with the header a clinic files; another site, hospital or specialty does
not; a PDF lost from the store or never recorded is rendered again on the first fetch or by the
clean-up pass; and without a font signing still works and the fetch says what to install."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
import warnings
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pypdf
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from conftest import HubStack, make_settings, start_stack
from helpers import error_reason, wait_for, wait_for_state
from teleread.db.schema import reports
from teleread.storage import report_pdf_key
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2
from teleread.v1 import worklist_pb2_grpc

pytestmark = pytest.mark.timeout(240)
PATIENT = {
    "PatientName": "Zhang^San=张^三",
    "PatientID": "MRN-0042",
    "PatientSex": "M",
    "PatientBirthDate": "19620304",
    "ReferringPhysicianName": "Li^Wei=李^伟",
}


def ecg_with_patient(folder: Path, **values: object) -> Path:
    """pydicom's 12-lead ECG with fresh UIDs and these patient attributes."""
    ds = pydicom.dcmread(str(get_testdata_file("waveform_ecg.dcm")))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("PatientAge", "PatientName", "PatientID", "PatientSex", "PatientBirthDate"):
        if keyword in ds:
            del ds[keyword]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def upload_ecg(stack: HubStack, tmp_path: Path, *, site: str = "site_a", patient_class: str = "emergency") -> str:
    """A queued DICOM ECG of ``site`` carrying :data:`PATIENT` (the class from the request), once
    triage's second pass has measured it (so the printed measurements are the final ones)."""
    data = ecg_with_patient(tmp_path, **PATIENT).read_bytes()
    exam_id = upload(stack, data, kind=common_pb2.EXAM_KIND_ECG, site=site, patient_class=patient_class)
    wait_for(lambda: '"qt_ms"' in (triage_json(stack, exam_id) or ""), timeout=60)
    return exam_id


def upload(stack: HubStack, data: bytes, *, kind: int, site: str = "site_a", patient_class: str = "emergency") -> str:
    """A queued exam of one DICOM object."""
    ingest = ingest_pb2_grpc.IngestStub(stack.channel(site))
    opened = ingest.OpenExam(
        ingest_pb2.OpenExamRequest(
            client_exam_key=uuid.uuid4().hex, kind=kind, priority=common_pb2.PRIORITY_STAT,
            indication="胸闷 2 小时", patient=common_pb2.Patient(patient_class=patient_class),
        ),
        timeout=10,
    )  # fmt: skip
    begun = ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(
            exam_id=opened.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role="dicom"
        ),
        timeout=10,
    )
    ingest.Upload(iter([ingest_pb2.UploadChunk(upload_id=begun.upload_id, data=data)]), timeout=30)
    ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=opened.exam_id, expected_objects=1), timeout=10)
    wait_for_state(ingest, opened.exam_id, "queued")
    return str(opened.exam_id)


def triage_json(stack: HubStack, exam_id: str) -> str | None:
    from teleread.db.schema import exams

    with stack.hub.engine.connect() as conn:
        return conn.execute(select(exams.c.triage_json).where(exams.c.id == exam_id)).scalar_one()


def sign(
    stack: HubStack, exam_id: str, *, critical: bool = True, who: str = "cardio"
) -> worklist_pb2_grpc.WorklistStub:
    reader = worklist_pb2_grpc.WorklistStub(stack.channel(who))
    claim = reader.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id, lease_seconds=300), timeout=10)
    reader.SaveReport(
        worklist_pb2.SaveReportRequest(
            exam_id=exam_id, fence=claim.fence, critical=critical,
            text="窦性停搏 3.5 秒。\nSinus arrest, 3.5 s pause.", impression="病态窦房结综合征",
        ),
        timeout=10,
    )  # fmt: skip
    reader.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    return reader


def fetch(stub: Any, exam_id: str, version: int = 0) -> tuple[bytes, list[common_pb2.ReportPdfChunk]]:
    chunks = list(stub.GetReportPdf(common_pb2.GetReportPdfRequest(exam_id=exam_id, version=version), timeout=30))
    return b"".join(c.data for c in chunks), chunks


def refused(stub: Any, exam_id: str, version: int = 0) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        fetch(stub, exam_id, version)
    return caught.value


def text_of(data: bytes) -> str:
    return " ".join("\n".join(p.extract_text() for p in pypdf.PdfReader(io.BytesIO(data)).pages).split())


def row(stack: HubStack, exam_id: str, version: int) -> Any:
    with stack.hub.engine.connect() as conn:
        return conn.execute(
            select(reports.c.id, reports.c.pdf_sha256, reports.c.pdf_size).where(
                reports.c.exam_id == exam_id, reports.c.version == version
            )
        ).one()


def stored(stack: HubStack, exam_id: str, version: int) -> bytes:
    with stack.hub.engine.connect() as conn:
        sha, size = conn.execute(
            select(reports.c.pdf_sha256, reports.c.pdf_size).where(
                reports.c.exam_id == exam_id, reports.c.version == version
            )
        ).one()
    key = report_pdf_key(tenant_id=site_id(stack, exam_id), exam_id=exam_id, version=version)
    with stack.hub.store.open_verified(key, sha256=sha, size=size) as fh:
        return bytes(fh.read())


def site_id(stack: HubStack, exam_id: str) -> int:
    from teleread.db.schema import exams

    with stack.hub.engine.connect() as conn:
        return int(conn.execute(select(exams.c.site_id).where(exams.c.id == exam_id)).scalar_one())


def test_the_hub_renders_stores_and_serves_the_signed_report(hub_stack: HubStack, tmp_path: Path) -> None:
    exam_id = upload_ecg(hub_stack, tmp_path)
    reader = sign(hub_stack, exam_id)
    assert hub_stack.hub.pdfs.flush(timeout=30)
    recorded = row(hub_stack, exam_id, 1)
    data = stored(hub_stack, exam_id, 1)
    assert data.startswith(b"%PDF") and recorded.pdf_size == len(data)
    assert recorded.pdf_sha256 == hashlib.sha256(data).hexdigest()

    site = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a"))
    result = site.GetResult(results_pb2.GetResultRequest(exam_id=exam_id), timeout=10)
    assert (result.pdf.sha256, result.pdf.size) == (recorded.pdf_sha256, len(data))
    pulled, chunks = fetch(site, exam_id)
    assert pulled == data and (chunks[0].sha256, chunks[0].size, chunks[0].version) == (
        recorded.pdf_sha256,
        len(data),
        1,
    )
    assert fetch(reader, exam_id, 1)[0] == data  # the reader's copy is the clinic's

    text = text_of(data)
    for expected in (
        "姓名 Name 张三 (Zhang San)", "患者编号 Patient ID MRN-0042", "性别 Sex Male 男",
        "就诊类型 Class Emergency 急诊", "出生日期 Born 1962-03-04", "送检单位 Clinic Township clinic A (clinic-a)",
        "送检医生 Clinician 李伟 (Li Wei)",
        "诊断医生 Reader dr-heart", "签发医生 Signer dr-heart", "报告版本 Version 1 (final)",
        "CRITICAL RESULT — act now and acknowledge", "危急值 — 请立即处理并确认",
        "窦性停搏 3.5 秒。", "病态窦房结综合征", "胸闷 2 小时", f"Exam {exam_id}",
    ):  # fmt: skip
        assert expected in text, expected
    pdf_pages = pypdf.PdfReader(io.BytesIO(data)).pages  # the report, then the tracing on A4 landscape
    assert len(pdf_pages) == 2 and pdf_pages[1].mediabox.width > pdf_pages[1].mediabox.height
    assert "/XObject" not in pdf_pages[1]["/Resources"]  # drawn, not a picture
    measured = json.loads(triage_json(hub_stack, exam_id) or "{}")["ecg"]["values"]
    assert f"QT {measured['qt_ms']:.0f} ms" in text and f"QTc Fridericia {measured['qtc_fridericia_ms']:.0f} ms" in text
    assert "25 mm/s 10 mm/mV 12-lead" in text and "could not be drawn" not in text
    assert "年龄 Age " in text and " y " in text.split("年龄 Age ", 1)[1][:8]  # the age at the exam
    assert text.count("CST (Asia/Shanghai)") >= 3  # exam time, signed time, the signature line
    assert "Amended" not in text


def test_an_amendment_gets_its_own_pdf_and_versions_are_fetched_by_number(hub_stack: HubStack, tmp_path: Path) -> None:
    exam_id = upload_ecg(hub_stack, tmp_path)
    reader = sign(hub_stack, exam_id)
    reader.AmendReport(
        worklist_pb2.AmendReportRequest(exam_id=exam_id, reason="导联接错 (limb leads swapped)", text="Sinus rhythm."),
        timeout=10,
    )
    assert hub_stack.hub.pdfs.flush(timeout=30)
    first, second = stored(hub_stack, exam_id, 1), stored(hub_stack, exam_id, 2)
    site = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a"))
    assert fetch(site, exam_id, 1)[0] == first and fetch(site, exam_id, 0)[0] == second == fetch(site, exam_id, 2)[0]
    text = text_of(second)
    assert "Amended report 更正报告 (version 2)" in text and "Reason: 导联接错 (limb leads swapped)" in text
    assert "报告版本 Version 2 (amended)" in text and "CRITICAL" not in text
    for stub in (site, reader):
        err = refused(stub, exam_id, 3)
        assert err.code() == grpc.StatusCode.NOT_FOUND and error_reason(err) == "REPORT_NOT_FOUND"
    assert refused(site, exam_id, -1).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_only_the_site_and_the_exams_readers_get_the_pdf(hub_stack: HubStack, tmp_path: Path) -> None:
    exam_id = upload_ecg(hub_stack, tmp_path)
    unsigned = upload_ecg(hub_stack, tmp_path / "2")
    sign(hub_stack, exam_id)
    for who in ("site_b", "site_x"):  # another site's exam looks missing, as GetResult answers
        stub = results_pb2_grpc.ResultsStub(hub_stack.channel(who))
        err = refused(stub, exam_id)
        assert err.code() == grpc.StatusCode.NOT_FOUND and error_reason(err) == "RESULT_NOT_FOUND"
        with pytest.raises(grpc.RpcError) as got:
            stub.GetResult(results_pb2.GetResultRequest(exam_id=exam_id), timeout=10)
        assert got.value.code() == grpc.StatusCode.NOT_FOUND
    site = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a"))
    assert refused(site, unsigned).code() == grpc.StatusCode.NOT_FOUND  # nothing signed yet
    assert refused(site, "no-such-exam").code() == grpc.StatusCode.NOT_FOUND
    city = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio_city"))  # another hospital
    err = refused(city, exam_id)
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_reason(err) == "EXAM_NOT_FOUND"
    radio = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))  # another specialty: as GetExamDetails
    err = refused(radio, exam_id)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(err) == "WRONG_SPECIALTY"
    with pytest.raises(grpc.RpcError) as details:
        radio.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    assert details.value.code() == err.code()
    for who in ("site_a", "admin"):  # a site is no reader, a reader no site, an admin neither
        stub = worklist_pb2_grpc.WorklistStub(hub_stack.channel(who))
        assert refused(stub, exam_id).code() == grpc.StatusCode.PERMISSION_DENIED
    cardio = results_pb2_grpc.ResultsStub(hub_stack.channel("cardio"))
    assert refused(cardio, exam_id).code() == grpc.StatusCode.PERMISSION_DENIED
    second = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio2"))  # any reader of the exam
    assert fetch(second, exam_id)[0].startswith(b"%PDF")


def test_a_lost_or_unrecorded_pdf_is_rendered_again(hub_stack: HubStack, tmp_path: Path) -> None:
    exam_id = upload_ecg(hub_stack, tmp_path)
    sign(hub_stack, exam_id)
    hub = hub_stack.hub
    assert hub.pdfs.flush(timeout=30)
    original = stored(hub_stack, exam_id, 1)
    key = report_pdf_key(tenant_id=site_id(hub_stack, exam_id), exam_id=exam_id, version=1)
    site = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a"))

    hub.store.delete(key)  # the bytes gone from the store: the first fetch renders them again
    assert not hub.store.exists(key)
    assert fetch(site, exam_id)[0] == original and hub.store.exists(key)

    def forget() -> None:
        with hub.engine.begin() as conn:
            conn.execute(update(reports).where(reports.c.exam_id == exam_id).values(pdf_sha256=None, pdf_size=None))
        hub.store.delete(key)

    forget()  # the hub stopped between the signature and the rendering: the fetch renders it
    assert site.GetResult(results_pb2.GetResultRequest(exam_id=exam_id), timeout=10).HasField("pdf") is False
    assert (
        fetch(site, exam_id)[0] == original
        and row(hub_stack, exam_id, 1).pdf_sha256 == hashlib.sha256(original).hexdigest()
    )

    forget()  # ... and the clean-up pass renders any signed version without one
    assert hub.janitor.run_once().pdfs_rendered == 1
    assert stored(hub_stack, exam_id, 1) == original
    assert hub.janitor.run_once().pdfs_rendered == 0


def test_an_imaging_report_has_no_tracing_and_a_lost_ecg_object_prints_a_note(
    hub_stack: HubStack, tmp_path: Path
) -> None:
    ct = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    imaging = upload(hub_stack, ct, kind=common_pb2.EXAM_KIND_IMAGING)
    sign(hub_stack, imaging, critical=False, who="radio")
    exam_id = upload_ecg(hub_stack, tmp_path)
    hub = hub_stack.hub
    for row in hub.queue.stored_objects(exam_id):  # the ECG's object gone from the store
        hub.store.delete(row["storage_key"])
    sign(hub_stack, exam_id)
    assert hub.pdfs.flush(timeout=30)
    image_pdf = pypdf.PdfReader(io.BytesIO(stored(hub_stack, imaging, 1)))
    assert len(image_pdf.pages) == 1 and "ECG measurements" not in text_of(stored(hub_stack, imaging, 1))
    lost = stored(hub_stack, exam_id, 1)
    assert len(pypdf.PdfReader(io.BytesIO(lost)).pages) == 1  # printed all the same, without the tracing
    text = text_of(lost)
    assert "The ECG tracing could not be drawn (OBJECT_NOT_FOUND)" in text
    assert "ECG measurements 心电图测量" in text and "QT " in text and "窦性停搏 3.5 秒。" in text


@pytest.fixture
def fontless_stack(tmp_path: Path) -> Any:
    settings = make_settings(tmp_path).updated(report__font=str(tmp_path / "absent.ttc"))
    stack = start_stack("embedded", settings)
    try:
        yield stack
    finally:
        for ch in stack.channels:
            ch.close()
        stack.server.stop(grace=None)
        stack.hub.close()


def test_without_a_font_signing_works_and_the_fetch_says_what_to_install(
    fontless_stack: HubStack, tmp_path: Path
) -> None:
    exam_id = upload_ecg(fontless_stack, tmp_path)
    reader = sign(fontless_stack, exam_id)  # the signature is not held up by the printed report
    assert fontless_stack.hub.pdfs.flush(timeout=30)
    assert row(fontless_stack, exam_id, 1).pdf_sha256 is None
    site = results_pb2_grpc.ResultsStub(fontless_stack.channel("site_a"))
    assert site.GetResult(results_pb2.GetResultRequest(exam_id=exam_id), timeout=10).report.version == 1
    for stub in (site, reader):
        err = refused(stub, exam_id)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(err) == "REPORT_FONT_MISSING"
        assert "TELEREAD_REPORT__FONT" in (err.details() or "") and "fonts-wqy-zenhei" in (err.details() or "")
    assert fontless_stack.hub.janitor.run_once().pdfs_rendered == 0


def test_the_hub_warns_at_start_when_it_has_no_font(fontless_stack: HubStack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="teleread.report_pdfs"):
        fontless_stack.hub.pdfs.warm()  # what build_hub does at start
        assert fontless_stack.hub.pdfs.flush(timeout=30)
    (warning,) = [r for r in caplog.records if r.name == "teleread.report_pdfs"]
    assert vars(warning)["reason"] == "REPORT_FONT_MISSING"
    assert "TELEREAD_REPORT__FONT" in warning.getMessage() and "fonts-wqy-zenhei" in warning.getMessage()
