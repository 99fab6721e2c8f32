"""End to end over real gRPC on loopback, on both deployments (SQLite + local directory, and
PostgreSQL + the S3 server): upload DICOM + WFDB + DICOM ECG -> stored -> triaged -> queued ->
claimed -> reported and signed -> pulled by the site."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import grpc
import pytest

from helpers import copy_testdata, error_reason, wait_for, write_synthetic_wfdb
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(240)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_exam_travels_from_clinic_to_signed_result(hub_stack, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    ct, ecg_dcm = copy_testdata(inputs, "CT_small.dcm", "waveform_ecg.dcm")
    hea, dat = write_synthetic_wfdb(inputs / "wfdb", rhythm="pause")
    site = hub_stack.channel("site_a")
    ingest = ingest_pb2_grpc.IngestStub(site)

    # A cardiologist watches the worklist before anything arrives.
    cardio = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio"))
    events: list[worklist_pb2.WorklistEvent] = []
    watch = cardio.Watch(worklist_pb2.WatchWorklistRequest(), timeout=120)
    watcher = threading.Thread(target=lambda: [events.append(e) for e in watch], daemon=True)
    watcher.start()

    scan = scan_paths([inputs])
    assert len(scan.exams) == 3 and not scan.skipped
    outcomes = upload_exams(ingest, scan.exams, priority="routine", indication="pre-operative check")
    assert all(o.exam_id and not o.errors for o in outcomes), [o.errors for o in outcomes]
    by_modality = {}

    def queued(exam_id: str) -> ingest_pb2.GetExamRequest | None:
        exam = ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10)
        return exam if exam.state == "queued" else None

    for o in outcomes:
        exam = wait_for(lambda exam_id=o.exam_id: queued(exam_id))
        by_modality.setdefault(exam.modality, []).append(exam)
    assert sorted(by_modality) == ["CT", "ECG"] and len(by_modality["ECG"]) == 2
    wfdb_exam = next(x for x in by_modality["ECG"] if x.object_count == 2)
    assert wfdb_exam.triage.level == 1  # critical: the synthetic record has a >= 3 s pause
    assert any(f.code == "ecg.pause" and f.evidence for f in wfdb_exam.triage.findings)

    # The live watch announced the critical exam.
    wait_for(
        lambda: any(
            e.type == worklist_pb2.WorklistEvent.TYPE_CRITICAL and e.exam.exam_id == wfdb_exam.exam_id for e in events
        )
    )

    # Most urgent first: the critical WFDB ECG comes before the routine DICOM ECG.
    claim = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=120), timeout=10)
    assert claim.exam.exam_id == wfdb_exam.exam_id and claim.fence >= 1
    details = cardio.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=claim.exam.exam_id), timeout=10)
    assert {o.role for o in details.objects} == {"wfdb_header", "wfdb_signal"}
    header = next(o for o in details.objects if o.role == "wfdb_header")
    fetched = b"".join(
        c.data
        for c in cardio.StreamObject(
            worklist_pb2.StreamObjectRequest(exam_id=claim.exam.exam_id, object_id=header.object_id), timeout=10
        )
    )
    assert fetched == hea.read_bytes()
    cardio.SaveReport(
        worklist_pb2.SaveReportRequest(
            exam_id=claim.exam.exam_id, fence=claim.fence, text="Sinus arrest, 3.5 s pause.", critical=True
        ),
        timeout=10,
    )
    signed = cardio.SignReport(
        worklist_pb2.SignReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10
    )
    assert signed.status == "final" and signed.signed_by == "dr-heart" and len(signed.sha256) == 64

    second = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=120), timeout=10)
    dicom_ecg = next(x for x in by_modality["ECG"] if x.object_count == 1)
    assert second.exam.exam_id == dicom_ecg.exam_id
    cardio.SaveReport(
        worklist_pb2.SaveReportRequest(exam_id=second.exam.exam_id, fence=second.fence, text="Sinus rhythm."),
        timeout=10,
    )
    cardio.SignReport(worklist_pb2.SignReportRequest(exam_id=second.exam.exam_id, fence=second.fence), timeout=10)

    radio = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    rclaim = radio.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert rclaim.exam.modality == "CT"
    rdetails = radio.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=rclaim.exam.exam_id), timeout=10)
    stored = b"".join(
        c.data
        for c in radio.StreamObject(
            worklist_pb2.StreamObjectRequest(exam_id=rclaim.exam.exam_id, object_id=rdetails.objects[0].object_id),
            timeout=10,
        )
    )
    assert hashlib.sha256(stored).hexdigest() == _sha(ct)  # byte-identical
    radio.SaveReport(
        worklist_pb2.SaveReportRequest(exam_id=rclaim.exam.exam_id, fence=rclaim.fence, text="No acute finding."),
        timeout=10,
    )
    radio.SignReport(worklist_pb2.SignReportRequest(exam_id=rclaim.exam.exam_id, fence=rclaim.fence), timeout=10)
    with pytest.raises(grpc.RpcError) as empty:
        radio.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert empty.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(empty.value) == "QUEUE_EMPTY"

    # The site pulls its results: in order, no gaps, no duplicates, resumable from a cursor.
    results = results_pb2_grpc.ResultsStub(site)
    page = results.ListResults(results_pb2.ListResultsRequest(after_cursor=0, limit=2), timeout=10)
    assert [r.cursor for r in page.results] == [1, 2] and page.next_cursor == 2
    rest = results.ListResults(results_pb2.ListResultsRequest(after_cursor=page.next_cursor), timeout=10)
    assert [r.cursor for r in rest.results] == [3]
    got = {r.exam.exam_id: r for r in list(page.results) + list(rest.results)}
    assert set(got) == {o.exam_id for o in outcomes}
    assert got[wfdb_exam.exam_id].critical and got[wfdb_exam.exam_id].report.text.startswith("Sinus arrest")
    streamed = []
    for r in results.WatchResults(results_pb2.WatchResultsRequest(after_cursor=1), timeout=5):
        streamed.append(r.cursor)
        if len(streamed) == 2:
            break
    assert streamed == [2, 3]
    one = results.GetResult(results_pb2.GetResultRequest(exam_id=rclaim.exam.exam_id), timeout=10)
    assert one.report.text == "No acute finding." and one.report.signed_by == "dr-lung"
    watch.cancel()
