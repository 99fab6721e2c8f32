"""The patient context over real gRPC on both deployments: recorded at ingest from the files (DICOM
patient module, WFDB header comments) with the upload request filling what they lack; shown to the
exam's readers (worklist, watch, claims, details with the patient's priors) and never to a site."""

from __future__ import annotations

import hashlib
import logging
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import insert, select

from conftest import HubStack
from helpers import wait_for_state, write_synthetic_wfdb
from teleread.db.engine import utcnow
from teleread.db.schema import exams, sites
from teleread.gateway.validate import PATIENT_ATTRIBUTES
from teleread.patient import age_at
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2
from teleread.v1 import worklist_pb2_grpc

pytestmark = pytest.mark.timeout(240)
PN = "Wang^Xiaoming=王^小明"
WL = worklist_pb2.WorklistEvent


def dicom_file(
    folder: Path, name: str, *, source: str = "CT_small.dcm", study: str = "", **values: object
) -> tuple[Path, str]:
    """A copy of a bundled instance with fresh UIDs (``study`` kept when given) and these patient
    attributes (the bundled ones removed first); returns the file and its study UID."""
    ds = pydicom.dcmread(str(get_testdata_file(source)))
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in PATIENT_ATTRIBUTES.values():
        if keyword in ds:
            del ds[keyword]
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    with warnings.catch_warnings():  # invalid values are written on purpose
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def upload(
    ingest: Any, files: list[tuple[Path, str]], *, kind: int, study: str = "", patient: common_pb2.Patient | None = None
) -> common_pb2.Exam:
    """Open an exam with ``patient`` in the request, upload ``files`` (path, role) one after the
    other, commit; returns the site's view of the committed exam (each answer checked on the way)."""
    opened = ingest.OpenExam(
        ingest_pb2.OpenExamRequest(
            client_exam_key=uuid.uuid4().hex, kind=kind, priority=common_pb2.PRIORITY_ROUTINE,
            study_instance_uid=study, patient=patient,
        ),
        timeout=10,
    )  # fmt: skip
    assert not opened.HasField("patient")
    for path, role in files:
        data = path.read_bytes()
        begun = ingest.BeginUpload(
            ingest_pb2.BeginUploadRequest(
                exam_id=opened.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role=role
            ),
            timeout=10,
        )
        step = 1 << 20  # messages under gRPC's 4 MiB cap, whatever the file's size
        chunks = [ingest_pb2.UploadChunk(upload_id=begun.upload_id, offset=at, data=data[at : at + step])
                  for at in range(0, max(len(data), 1), step)]  # fmt: skip
        ingest.Upload(iter(chunks), timeout=30)
    committed = ingest.CommitExam(
        ingest_pb2.CommitExamRequest(exam_id=opened.exam_id, expected_objects=len(files)), timeout=10
    )
    assert not committed.HasField("patient")
    return committed


def _watch_until(call: Any, wanted: int, exam_id: str) -> worklist_pb2.WorklistEvent:
    for event in call:
        if event.type == wanted and event.exam.exam_id == exam_id:
            return event
    raise AssertionError("the watch ended first")


def test_files_win_the_request_fills_and_only_readers_see_it(hub_stack: HubStack, tmp_path: Path) -> None:
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    path, study = dicom_file(
        tmp_path, "ct.dcm", PatientID="P-0042", PatientName=PN, PatientSex="F", PatientBirthDate="19630201"
    )
    request = common_pb2.Patient(
        id="REQ-1", name="Request^Name", sex="M", referring_physician="Zhao^Min=赵^敏", patient_class="emergency"
    )
    exam = upload(ingest, [(path, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=study, patient=request)
    assert not wait_for_state(ingest, exam.exam_id, "queued").HasField("patient")  # the site's view

    today = datetime.now(UTC).date()
    expected = common_pb2.Patient(
        id="P-0042",  # the file's values win ...
        name=PN,  # ... its PN as given, ideographic group included
        sex="F",
        birth_date="19630201",
        age=age_at("19630201", today),  # computed: the file has a birth date, no age
        referring_physician="Zhao^Min=赵^敏",  # ... the request fills what the file lacks
        patient_class="emergency",
    )
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    listed = reader.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams
    assert [e.patient for e in listed if e.exam_id == exam.exam_id] == [expected]

    watch = reader.Watch(worklist_pb2.WatchWorklistRequest(), timeout=60)
    try:
        assert _watch_until(watch, WL.TYPE_SNAPSHOT, exam.exam_id).exam.patient == expected
        claim = reader.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam.exam_id), timeout=10)
        assert claim.exam.patient == expected
        assert _watch_until(watch, WL.TYPE_CLAIMED, exam.exam_id).exam.patient == expected
    finally:
        watch.cancel()
    details = reader.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam.exam_id), timeout=10)
    assert details.exam.patient == expected and list(details.priors) == []

    # Another specialty's reader, and another alliance's, do not get the exam at all.
    for who in ("cardio", "cardio_city"):
        other = worklist_pb2_grpc.WorklistStub(hub_stack.channel(who))
        with pytest.raises(grpc.RpcError) as hidden:
            other.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam.exam_id), timeout=10)
        assert hidden.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
        assert "P-0042" not in (hidden.value.details() or "")
        assert all(e.exam_id != exam.exam_id for e in other.ListWorklist(worklist_pb2.ListWorklistRequest()).exams)

    # The site's results carry no patient context either.
    reader.SaveReport(worklist_pb2.SaveReportRequest(exam_id=exam.exam_id, fence=claim.fence, text="ok"), timeout=10)
    reader.SignReport(worklist_pb2.SignReportRequest(exam_id=exam.exam_id, fence=claim.fence), timeout=10)
    results = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a"))
    listed_results = results.ListResults(results_pb2.ListResultsRequest(), timeout=10).results
    assert [r.exam.exam_id for r in listed_results] == [exam.exam_id]
    assert not listed_results[0].exam.HasField("patient")
    got = results.GetResult(results_pb2.GetResultRequest(exam_id=exam.exam_id), timeout=10)
    assert not got.exam.HasField("patient")
    assert not ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam.exam_id), timeout=10).HasField("patient")


def test_a_wfdb_record_gives_age_and_sex_and_the_request_the_rest(hub_stack: HubStack, tmp_path: Path) -> None:
    header, signal = write_synthetic_wfdb(tmp_path, rhythm="normal", name="ecg-ptb")
    header.write_text(header.read_text() + "# <age>: 63  <sex>: M  <diagnoses>: none\n")
    request = common_pb2.Patient(
        id="ECG-7", name="Li^Lei", sex="F", birth_date="19600101", referring_physician="Dr^Who",
        patient_class="outpatient",
    )  # fmt: skip
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam = upload(
        ingest, [(header, "wfdb_header"), (signal, "wfdb_signal")], kind=common_pb2.EXAM_KIND_ECG, patient=request
    )
    wait_for_state(ingest, exam.exam_id, "queued")
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio"))
    claim = reader.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert claim.exam.exam_id == exam.exam_id
    assert claim.exam.patient == common_pb2.Patient(
        id="ECG-7", name="Li^Lei", sex="M", birth_date="19600101", age="063Y", referring_physician="Dr^Who",
        patient_class="outpatient",
    )  # fmt: skip  # the header's age and sex win over the request's


def test_the_first_stored_instance_gives_the_study_its_patient(
    hub_stack: HubStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, study = dicom_file(tmp_path, "1.dcm", PatientID="FIRST-1", PatientName="First^Patient", PatientAge="040Y")
    second, _ = dicom_file(
        tmp_path, "2.dcm", study=study, PatientID="OTHER-2", PatientName="Other^Patient", PatientSex="M"
    )
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    with caplog.at_level(logging.INFO, logger="teleread.ingest"):
        exam = upload(ingest, [(first, "dicom"), (second, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=study)
    wait_for_state(ingest, exam.exam_id, "queued")
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    details = reader.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam.exam_id), timeout=10)
    assert len(details.objects) == 2
    # the first instance's values stay: not the second's ID or name, nor its sex where the first had none
    assert details.exam.patient == common_pb2.Patient(id="FIRST-1", name="First^Patient", age="040Y")
    mismatch = [r for r in caplog.records if getattr(r, "reason", "") == "PATIENT_MISMATCH"]
    assert len(mismatch) == 1 and getattr(mismatch[0], "exam_id", "") == exam.exam_id
    for record in caplog.records:
        assert "FIRST-1" not in record.getMessage() and "OTHER-2" not in record.getMessage()


def test_malformed_patient_values_are_dropped_never_refused(hub_stack: HubStack, tmp_path: Path) -> None:
    path, study = dicom_file(
        tmp_path, "bad.dcm", PatientID="P-5", PatientSex="male?", PatientBirthDate="19630231", PatientAge="63"
    )
    request = common_pb2.Patient(
        name="N" * 500, sex="X", birth_date="31/02/1963", age="sixty", patient_class="ward", referring_physician="\n"
    )
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam = upload(ingest, [(path, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=study, patient=request)
    wait_for_state(ingest, exam.exam_id, "queued")
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    claim = reader.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert claim.exam.exam_id == exam.exam_id
    assert claim.exam.patient == common_pb2.Patient(id="P-5", name="N" * 200)  # bounded to its column


# ---- priors --------------------------------------------------------------------------------------
def _exam_row(
    stack: HubStack, *, patient_id: str, received: datetime, site: str = "clinic-a", specialty: str = "radiology",
    state: str = "queued", hospital: str = "county-hosp", level: str = "routine",
) -> str:  # fmt: skip
    """A triaged exam written straight into the hub's database (as queued_exam in test_stream_limits)."""
    exam_id = uuid.uuid4().hex
    with stack.hub.engine.begin() as conn:
        site_id = conn.execute(select(sites.c.id).where(sites.c.code == site)).scalar_one()
        conn.execute(
            insert(exams).values(
                id=exam_id, site_id=site_id, client_exam_key=f"test-{exam_id}",
                kind="ecg" if specialty == "cardiology" else "imaging",
                modality="ECG" if specialty == "cardiology" else "CT", state=state, priority="routine",
                specialty=specialty, hospital=hospital, level=level, level_rank=3,
                deadline=received + timedelta(hours=24), received_at=received, object_count=1,
                created_at=received, updated_at=received, patient_id=patient_id, patient_name="Prior^Patient",
            )
        )  # fmt: skip
    return exam_id


def test_priors_are_the_patients_earlier_exams_the_reader_may_read(hub_stack: HubStack) -> None:
    now = utcnow()
    ago = [now - timedelta(days=d) for d in range(40)]
    current = _exam_row(hub_stack, patient_id="P-9", received=ago[0])
    older = _exam_row(hub_stack, patient_id="P-9", received=ago[10], state="reported", level="urgent")
    newer = _exam_row(hub_stack, patient_id="P-9", received=ago[2])
    oldest = _exam_row(hub_stack, patient_id="P-9", received=ago[30], state="in_reading")
    _exam_row(hub_stack, patient_id="P-9", received=ago[3], specialty="cardiology")  # another specialty
    _exam_row(hub_stack, patient_id="P-9", received=ago[4], site="clinic-b")  # another site's P-9 is not this one
    _exam_row(hub_stack, patient_id="P-8", received=ago[5])  # another patient
    _exam_row(hub_stack, patient_id="P-9", received=ago[6], state="rejected")  # never read
    _exam_row(hub_stack, patient_id="P-9", received=ago[7], hospital="city-hosp")  # routed elsewhere
    later = _exam_row(hub_stack, patient_id="P-9", received=now + timedelta(minutes=1))  # after this one
    no_id = _exam_row(hub_stack, patient_id="", received=ago[1])

    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))

    def priors(exam_id: str) -> list[common_pb2.Exam]:
        return list(reader.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10).priors)

    found = priors(current)
    assert [e.exam_id for e in found] == [newer, older, oldest]  # most recent first
    assert [(e.state, e.patient.id) for e in found] == [("queued", "P-9"), ("reported", "P-9"), ("in_reading", "P-9")]
    assert [e.exam_id for e in priors(later)] == [current, newer, older, oldest]
    assert priors(oldest) == [] and priors(no_id) == []  # nothing earlier; no patient ID: no priors

    for day in range(11, 30):  # 19 more earlier exams: 22 in all before `current`
        _exam_row(hub_stack, patient_id="P-9", received=ago[day] - timedelta(hours=1))
    found = priors(current)
    assert len(found) == 20 and found[0].exam_id == newer and oldest not in {e.exam_id for e in found}
    received = [e.received_at.ToDatetime() for e in found]
    assert received == sorted(received, reverse=True)


def test_a_site_never_receives_the_patient_fields(hub_stack: HubStack, tmp_path: Path) -> None:
    """Every Ingest answer to the uploading site, on a file full of patient data and a request with
    every field: OpenExam (also when opened again), BeginUpload, Upload, GetUploadStatus, CommitExam,
    GetExam; the wire bytes of each answer hold none of the values."""
    path, study = dicom_file(
        tmp_path, "phi.dcm", PatientID="SITE-PHI-ID", PatientName="Site^Phi=西^菲", PatientBirthDate="19700101",
        ReferringPhysicianName="Ref^Phi",
    )  # fmt: skip
    request = common_pb2.Patient(
        id="REQ-PHI", name="Req^Phi", sex="F", birth_date="19710101", age="055Y", referring_physician="Req^Ref",
        patient_class="inpatient",
    )  # fmt: skip
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    key = uuid.uuid4().hex
    open_request = ingest_pb2.OpenExamRequest(
        client_exam_key=key, kind=common_pb2.EXAM_KIND_IMAGING, study_instance_uid=study, patient=request
    )
    answers: list[Any] = [opened := ingest.OpenExam(open_request, timeout=10)]
    data = path.read_bytes()
    begun = ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(
            exam_id=opened.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role="dicom"
        ),
        timeout=10,
    )
    answers += [begun, ingest.Upload(iter([ingest_pb2.UploadChunk(upload_id=begun.upload_id, data=data)]), timeout=30)]
    answers.append(ingest.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=begun.upload_id), timeout=10))
    answers.append(
        ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=opened.exam_id, expected_objects=1), timeout=10)
    )
    answers.append(wait_for_state(ingest, opened.exam_id, "queued"))
    answers.append(ingest.OpenExam(open_request, timeout=10))  # the same key again: the committed exam
    values = ("SITE-PHI-ID", "Site^Phi", "西^菲", "19700101", "Ref^Phi", "REQ-PHI", "Req^Phi", "19710101", "Req^Ref")
    for answer in answers:
        if isinstance(answer, common_pb2.Exam):
            assert not answer.HasField("patient")
        wire = answer.SerializeToString()
        assert not [v for v in values if v.encode() in wire]
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    seen = reader.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=opened.exam_id), timeout=10).exam.patient
    assert (seen.id, seen.name, seen.referring_physician, seen.patient_class) == (
        "SITE-PHI-ID", "Site^Phi=西^菲", "Ref^Phi", "inpatient",
    )  # fmt: skip


def _receiving_exam_with_two_uploads(hub_stack: HubStack) -> tuple[Any, str, int]:
    """An exam still receiving, with two partial uploads (ids 1 and 2); (engine, exam id, site id)."""
    from teleread.db.schema import uploads

    engine = hub_stack.hub.engine
    exam_id = _exam_row(hub_stack, patient_id="", received=utcnow(), state="receiving")
    now = utcnow()
    with engine.begin() as conn:
        site_id = conn.execute(select(exams.c.site_id).where(exams.c.id == exam_id)).scalar_one()
        for n in (1, 2):
            conn.execute(
                insert(uploads).values(
                    id=f"{n:032x}", exam_id=exam_id, site_id=site_id, sha256=f"{n:064x}", size=1, role="dicom",
                    state="partial", created_at=now, updated_at=now,
                )
            )  # fmt: skip
    return engine, exam_id, int(site_id)


def test_of_two_first_instances_stored_at_once_the_first_to_commit_gives_the_patient(pg_stack: HubStack) -> None:
    """PostgreSQL (SQLite serialises write transactions: nothing overlaps there), read committed:
    two store transactions of an exam's first instances overlap; the second waits on the exam's
    row and then sees the first's stored upload, so it leaves the first's values (the rule does
    not depend on which arrives first at the database)."""
    import threading

    from teleread.db.schema import uploads
    from teleread.gateway.hub.patient_context import record_first_instance
    from teleread.patient import PatientContext

    engine, exam_id, site_id = _receiving_exam_with_two_uploads(pg_stack)
    first, second = PatientContext(id="FIRST", name="First^One"), PatientContext(id="SECOND", sex="M")
    outcome: dict[str, bool] = {}
    with engine.connect() as one:
        one.begin()
        one.execute(uploads.update().where(uploads.c.id == f"{1:032x}").values(state="stored"))
        assert record_first_instance(one, exam_id=exam_id, upload_id=f"{1:032x}", patient=first)

        def later() -> None:
            with engine.begin() as two:
                two.execute(uploads.update().where(uploads.c.id == f"{2:032x}").values(state="stored"))
                outcome["second"] = record_first_instance(two, exam_id=exam_id, upload_id=f"{2:032x}", patient=second)

        thread = threading.Thread(target=later)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive()  # waiting on the exam's row
        one.commit()
    thread.join(timeout=10)
    assert outcome == {"second": False}
    with engine.connect() as conn:
        row = conn.execute(select(exams).where(exams.c.id == exam_id)).one()
    assert PatientContext.from_row(dict(row._mapping)) == first


def test_an_objects_store_never_waits_on_another_stream_of_its_exam(pg_stack: HubStack) -> None:
    """PostgreSQL (SQLite serialises write transactions: nothing overlaps there). Every stored object's
    transaction references the exam's row (the object's foreign key takes a KEY SHARE lock on it)
    and the possible first instance then locks that row. Locking it FOR UPDATE waited on each other
    stream's open transaction, and two of them deadlocked (a 16-slice CT over 4 streams took 13-15 s
    instead of 0.6 s); the store must lock only what the others' key checks let through."""
    import threading

    from teleread.db.schema import objects, uploads
    from teleread.gateway.hub.ingest import IngestService
    from teleread.gateway.hub.patient_context import record_first_instance
    from teleread.patient import PatientContext

    engine, exam_id, site_id = _receiving_exam_with_two_uploads(pg_stack)

    def object_row(n: int) -> dict[str, object]:
        return {
            "id": f"{n:032x}", "exam_id": exam_id, "site_id": site_id, "role": "dicom", "sha256": f"{n:064x}",
            "size": 1, "storage_key": f"k{n}", "sop_instance_uid": f"1.2.3.{n}", "series_instance_uid": "1.2.3",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "modality": "CT", "created_at": utcnow(),
        }  # fmt: skip

    first = PatientContext(id="FIRST", name="First^One")
    done: dict[str, Any] = {}
    with engine.connect() as other:
        other.begin()  # another stream of the exam, its transaction open after its object's insert
        other.execute(insert(objects).values(**object_row(2)))

        def store() -> None:
            try:
                with engine.begin() as conn:
                    meta = {"study_instance_uid": "1.2.3", "patient": first}
                    IngestService._record_stored(conn, row=object_row(1), upload_id=f"{1:032x}", meta=meta, first=first)
                done["stored"] = True
            except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
                done["error"] = exc

        thread = threading.Thread(target=store)
        thread.start()
        thread.join(timeout=5.0)
        blocked = thread.is_alive()
        if not blocked:  # the other stream finishes: it sees the first one's stored upload
            other.execute(uploads.update().where(uploads.c.id == f"{2:032x}").values(state="stored"))
            assert not record_first_instance(
                other, exam_id=exam_id, upload_id=f"{2:032x}", patient=PatientContext(id="X")
            )
            other.commit()
        else:
            other.rollback()
    thread.join(timeout=10)
    assert not blocked, "the store waited on another stream's open transaction"
    assert done == {"stored": True}
    with engine.connect() as conn:
        row = conn.execute(select(exams).where(exams.c.id == exam_id)).one()
    assert PatientContext.from_row(dict(row._mapping)) == first and row.study_instance_uid == "1.2.3"
