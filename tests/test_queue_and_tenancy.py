"""Reading queue rules over real gRPC on both deployments: leases and fencing (a reader whose
lease lapsed cannot sign), signed reports never change, and tenancy (a site sees only its exams
and results, a radiologist cannot claim an ECG, another alliance's readers see nothing)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from helpers import copy_testdata, error_reason, wait_for, wait_for_state
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)


def _refused(err: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    """The status code and the typed reason (google.rpc.ErrorInfo) of a refused call."""
    return err.value.code(), error_reason(err.value)


def _queued_ecg(stack, tmp_path: Path, who: str = "site_a") -> str:
    copy_testdata(tmp_path / who, "waveform_ecg.dcm")
    ingest = ingest_pb2_grpc.IngestStub(stack.channel(who))
    [outcome] = upload_exams(ingest, scan_paths([tmp_path / who]).exams)
    assert outcome.exam_id, outcome.errors
    wait_for_state(ingest, outcome.exam_id, "queued")
    return outcome.exam_id


def test_lapsed_lease_cannot_sign_and_fence_moves_on(hub_stack, tmp_path: Path) -> None:
    exam_id = _queued_ecg(hub_stack, tmp_path)
    a = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio"))
    b = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio2"))
    claim = a.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id, lease_seconds=1), timeout=10)
    a.SaveReport(worklist_pb2.SaveReportRequest(exam_id=exam_id, fence=claim.fence, text="draft"), timeout=10)
    with pytest.raises(grpc.RpcError) as busy:
        b.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id), timeout=10)
    assert _refused(busy) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_CLAIMABLE")
    lapses = claim.lease_expires_at.ToDatetime(dt.timezone.utc)
    wait_for(lambda: dt.datetime.now(dt.timezone.utc) > lapses, timeout=10)  # the lease lapses
    with pytest.raises(grpc.RpcError) as lapsed:
        a.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    assert _refused(lapsed) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    taken = b.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=60), timeout=10)
    assert taken.exam.exam_id == exam_id and taken.fence == claim.fence + 1
    with pytest.raises(grpc.RpcError) as zombie:  # the first reader comes back with a stale fence
        a.RenewClaim(worklist_pb2.RenewClaimRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    assert _refused(zombie) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    b.SaveReport(worklist_pb2.SaveReportRequest(exam_id=exam_id, fence=taken.fence, text="Sinus rhythm."), timeout=10)
    signed = b.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=taken.fence), timeout=10)
    assert signed.signed_by == "dr-rhythm" and signed.version == 1
    # A signed report never changes: saving again is refused, an amendment is a new version (here by
    # the signer, who needs no claim; see test_amendments for everyone else).
    with pytest.raises(grpc.RpcError) as resaved:  # signing ended the claim: its fence opens nothing
        b.SaveReport(worklist_pb2.SaveReportRequest(exam_id=exam_id, fence=taken.fence, text="edit"), timeout=10)
    assert _refused(resaved) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    amended = b.AmendReport(
        worklist_pb2.AmendReportRequest(exam_id=exam_id, reason="typo", text="Sinus rhythm, normal."), timeout=10
    )
    assert amended.version == 2 and amended.amends_reason == "typo"
    details = b.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    assert [r.text for r in details.reports] == ["Sinus rhythm.", "Sinus rhythm, normal."]
    results = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a"))
    assert [r.report.version for r in results.ListResults(results_pb2.ListResultsRequest(), timeout=10).results] == [
        1,
        2,
    ]


def test_tenancy(hub_stack, tmp_path: Path) -> None:
    exam_id = _queued_ecg(hub_stack, tmp_path)
    other_site = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_b"))
    with pytest.raises(grpc.RpcError) as seen:
        other_site.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10)
    assert _refused(seen) == (grpc.StatusCode.NOT_FOUND, "EXAM_NOT_FOUND")

    radio = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    with pytest.raises(grpc.RpcError) as wrong_specialty:
        radio.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id), timeout=10)
    assert _refused(wrong_specialty) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_SPECIALTY")
    with pytest.raises(grpc.RpcError) as empty:
        radio.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert _refused(empty) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY")
    assert not radio.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams

    city = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio_city"))
    assert not city.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams
    with pytest.raises(grpc.RpcError) as foreign:
        city.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    assert _refused(foreign) == (grpc.StatusCode.NOT_FOUND, "EXAM_NOT_FOUND")

    # A site identity cannot read the queue; a reader cannot upload.
    with pytest.raises(grpc.RpcError) as site_reads:
        worklist_pb2_grpc.WorklistStub(hub_stack.channel("site_a")).ListWorklist(
            worklist_pb2.ListWorklistRequest(), timeout=10
        )
    assert _refused(site_reads) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_DENIED")
    with pytest.raises(grpc.RpcError) as reader_uploads:
        ingest_pb2_grpc.IngestStub(hub_stack.channel("cardio")).GetExam(
            ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10
        )
    assert _refused(reader_uploads) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_DENIED")

    cardio = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio"))
    claim = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    cardio.SaveReport(worklist_pb2.SaveReportRequest(exam_id=exam_id, fence=claim.fence, text="ok"), timeout=10)
    cardio.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    mine = results_pb2_grpc.ResultsStub(hub_stack.channel("site_a")).ListResults(
        results_pb2.ListResultsRequest(), timeout=10
    )
    theirs = results_pb2_grpc.ResultsStub(hub_stack.channel("site_b")).ListResults(
        results_pb2.ListResultsRequest(), timeout=10
    )
    assert len(mine.results) == 1 and not theirs.results
    with pytest.raises(grpc.RpcError) as other_result:
        results_pb2_grpc.ResultsStub(hub_stack.channel("site_b")).GetResult(
            results_pb2.GetResultRequest(exam_id=exam_id), timeout=10
        )
    assert _refused(other_result) == (grpc.StatusCode.NOT_FOUND, "RESULT_NOT_FOUND")


def test_no_endpoint_is_open(embedded_stack) -> None:
    from teleread.client import open_channel

    for token in ("", "tr_not-a-real-token"):
        channel = (
            grpc.insecure_channel(embedded_stack.address)
            if not token
            else open_channel(embedded_stack.address, token=token)
        )
        with pytest.raises(grpc.RpcError) as err:
            ingest_pb2_grpc.IngestStub(channel).GetExam(ingest_pb2.GetExamRequest(exam_id="0" * 32), timeout=10)
        assert _refused(err) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN" if token else "NO_TOKEN")
        channel.close()


def test_health_and_reflection_answer_without_token(embedded_stack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(embedded_stack.address)
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="teleread.v1.Ingest"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"teleread.v1.Ingest", "teleread.v1.Worklist", "teleread.v1.Results"} <= names
    channel.close()


def _many_queued_ecgs(stack, tmp_path: Path, n: int) -> set[str]:
    import pydicom
    from pydicom.uid import generate_uid

    from helpers import copy_testdata

    [template] = copy_testdata(tmp_path / "t", "waveform_ecg.dcm")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"ecg{i}.dcm", enforce_file_format=True)
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    outcomes = upload_exams(ingest, scan_paths([folder]).exams)
    ids = {o.exam_id for o in outcomes}
    assert len(ids) == n
    for exam_id in ids:
        wait_for_state(ingest, exam_id, "queued")
    return ids


def test_concurrent_readers_never_claim_the_same_exam(hub_stack, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ids = _many_queued_ecgs(hub_stack, tmp_path, 24)
    stubs = [worklist_pb2_grpc.WorklistStub(hub_stack.channel(w)) for w in ("cardio", "cardio2")] * 2

    def drain(stub) -> list[tuple[str, int]]:
        got = []
        while True:
            try:
                claim = stub.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=300), timeout=10)
            except grpc.RpcError as err:
                assert (err.code(), error_reason(err)) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY")
                return got
            got.append((claim.exam.exam_id, claim.fence))

    with ThreadPoolExecutor(max_workers=4) as pool:
        claims = [c for part in pool.map(drain, stubs) for c in part]
    assert sorted(e for e, _ in claims) == sorted(ids)  # each exam claimed exactly once
    assert all(fence == 1 for _, fence in claims)
