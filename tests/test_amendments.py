"""Amendments of signed reports over real gRPC on both deployments: only the signer amends without
a claim; any other reader of the exam's specialty claims the reported exam for amendment first and
presents the claim's fence. The exam stays reported (never back in the queue) while claimed for
amendment, and each amendment is a new version with its reason, its own event and a new result."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from helpers import copy_testdata, error_reason, wait_for
from teleread.app.cli import main
from teleread.clock import FakeClock
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)
ECG = "waveform_ecg.dcm"


def _signed_ecg(stack, tmp_path: Path) -> tuple[str, worklist_pb2_grpc.WorklistStub, worklist_pb2_grpc.WorklistStub]:
    """An ECG signed by dr-heart; the stubs of dr-heart (signer) and dr-rhythm (same specialty)."""
    copy_testdata(tmp_path / "in", ECG)
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    [outcome] = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams)
    assert outcome.exam_id, outcome.errors
    exam_id = outcome.exam_id
    wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10).state == "queued")
    signer = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    other = worklist_pb2_grpc.WorklistStub(stack.channel("cardio2"))
    claim = signer.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id, lease_seconds=300), timeout=10)
    signer.SaveReport(worklist_pb2.SaveReportRequest(exam_id=exam_id, fence=claim.fence, text="Sinus."), timeout=10)
    signer.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    return exam_id, signer, other


def _versions(stub: worklist_pb2_grpc.WorklistStub, exam_id: str) -> list[int]:
    details = stub.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    return [r.version for r in details.reports]


def _patient_name() -> str:
    import pydicom
    from pydicom.data import get_testdata_file

    name = str(pydicom.dcmread(get_testdata_file(ECG), stop_before_pixels=True).PatientName)
    assert name
    return name


def _amend(stub, exam_id: str, *, fence: int = 0, reason: str = "typo", text: str = "Sinus rhythm, normal."):
    request = worklist_pb2.AmendReportRequest(exam_id=exam_id, fence=fence, reason=reason, text=text)
    return stub.AmendReport(request, timeout=10)


def _claim_for_amendment(stub, exam_id: str, *, lease_seconds: int = 300) -> worklist_pb2.Claim:
    request = worklist_pb2.ClaimExamRequest(exam_id=exam_id, lease_seconds=lease_seconds, for_amendment=True)
    return stub.ClaimExam(request, timeout=10)


def _in_queue(stack, stub, exam_id: str) -> bool:
    listed = stub.ListWorklist(worklist_pb2.ListWorklistRequest(include_claimed=True), timeout=10).exams
    try:
        stub.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=60), timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND and error_reason(err) == "QUEUE_EMPTY"
    else:
        return True  # the only exam of the test was claimable again
    return any(e.exam_id == exam_id for e in listed)


def _events(stack, exam_id: str, type_: str) -> list[dict]:
    from sqlalchemy import select

    from teleread.db.schema import events

    with stack.hub.engine.connect() as conn:
        rows = conn.execute(
            select(events.c.detail, events.c.actor_id)
            .where(events.c.exam_id == exam_id, events.c.type == type_)
            .order_by(events.c.id)
        ).all()
    return [json.loads(r.detail) for r in rows]


def _results(stack) -> list[results_pb2.Result]:
    stub = results_pb2_grpc.ResultsStub(stack.channel("site_a"))
    return list(stub.ListResults(results_pb2.ListResultsRequest(), timeout=10).results)


def test_another_reader_without_a_claim_is_refused(hub_stack, tmp_path: Path) -> None:
    exam_id, _signer, other = _signed_ecg(hub_stack, tmp_path)
    with pytest.raises(grpc.RpcError) as refused:
        other.AmendReport(
            worklist_pb2.AmendReportRequest(exam_id=exam_id, reason="second opinion", text="AF.", critical=True),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(refused.value) == "AMENDMENT_NEEDS_CLAIM"
    assert _patient_name() not in (refused.value.details() or "")
    assert _versions(other, exam_id) == [1]
    assert [(r.report.version, r.critical) for r in _results(hub_stack)] == [(1, False)]


def test_the_signer_amends_without_a_claim(hub_stack, tmp_path: Path) -> None:
    exam_id, signer, other = _signed_ecg(hub_stack, tmp_path)
    amended = _amend(signer, exam_id, reason="typo")
    assert (amended.version, amended.status, amended.signed_by) == (2, "amended", "dr-heart")
    assert amended.amends_reason == "typo"
    assert _versions(other, exam_id) == [1, 2]
    assert [(r.report.version, r.report.amends_reason) for r in _results(hub_stack)] == [(1, ""), (2, "typo")]


def test_another_reader_claims_for_amendment_and_amends(hub_stack, tmp_path: Path) -> None:
    exam_id, signer, other = _signed_ecg(hub_stack, tmp_path)
    claim = _claim_for_amendment(other, exam_id)
    assert claim.exam.state == "reported" and claim.exam.claimed_by == "dr-rhythm" and claim.fence == 2
    renewed = other.RenewClaim(
        worklist_pb2.RenewClaimRequest(exam_id=exam_id, fence=claim.fence, lease_seconds=600), timeout=10
    )
    assert renewed.fence == claim.fence and renewed.exam.state == "reported"
    assert renewed.lease_expires_at.ToDatetime() > claim.lease_expires_at.ToDatetime()
    assert not _in_queue(hub_stack, signer, exam_id) and not _in_queue(hub_stack, other, exam_id)

    amended = _amend(other, exam_id, fence=claim.fence, reason="missed AF", text="Atrial fibrillation.")
    assert (amended.version, amended.signed_by, amended.amends_reason) == (2, "dr-rhythm", "missed AF")
    latest = _results(hub_stack)[-1]
    assert (latest.report.version, latest.report.amends_reason, latest.report.text) == (
        2,
        "missed AF",
        "Atrial fibrillation.",
    )
    details = other.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    assert details.exam.state == "reported" and details.exam.claimed_by == ""  # the claim ended with the amendment
    with pytest.raises(grpc.RpcError) as cleared:
        other.RenewClaim(worklist_pb2.RenewClaimRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    assert cleared.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(cleared.value) == "LEASE_LOST"
    assert not _in_queue(hub_stack, signer, exam_id)


def test_released_amendment_claim_and_stale_fence(hub_stack, tmp_path: Path) -> None:
    exam_id, _signer, other = _signed_ecg(hub_stack, tmp_path)
    first = _claim_for_amendment(other, exam_id)
    other.ReleaseClaim(worklist_pb2.ReleaseClaimRequest(exam_id=exam_id, fence=first.fence), timeout=10)
    details = other.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    assert details.exam.state == "reported" and details.exam.claimed_by == ""  # not back in the queue
    assert not _in_queue(hub_stack, other, exam_id)
    second = _claim_for_amendment(other, exam_id)
    assert second.fence == first.fence + 1
    with pytest.raises(grpc.RpcError) as stale:
        _amend(other, exam_id, fence=first.fence)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(stale.value) == "LEASE_LOST"
    with pytest.raises(grpc.RpcError) as no_claim:  # a non-signer cannot fall back to "no claim" either
        _amend(other, exam_id, fence=0)
    assert no_claim.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(no_claim.value) == "AMENDMENT_NEEDS_CLAIM"
    assert _versions(other, exam_id) == [1] and len(_results(hub_stack)) == 1


def test_signer_refused_while_another_reader_holds_the_amendment_claim(hub_stack, tmp_path: Path) -> None:
    exam_id, signer, other = _signed_ecg(hub_stack, tmp_path)
    claim = _claim_for_amendment(other, exam_id)
    with pytest.raises(grpc.RpcError) as held:
        _amend(signer, exam_id)
    assert held.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(held.value) == "AMENDMENT_CLAIMED"
    with pytest.raises(grpc.RpcError) as busy:
        _claim_for_amendment(signer, exam_id)
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(busy.value) == "AMENDMENT_CLAIMED"
    with pytest.raises(grpc.RpcError) as foreign_fence:  # the holder's fence is no use to anyone else
        _amend(signer, exam_id, fence=claim.fence)
    assert foreign_fence.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(foreign_fence.value) == "LEASE_LOST"
    assert _versions(signer, exam_id) == [1] and len(_results(hub_stack)) == 1


def test_a_lapsed_amendment_claim_expires_in_place(hub_stack, tmp_path: Path, monkeypatch) -> None:
    exam_id, signer, other = _signed_ecg(hub_stack, tmp_path)
    claim = _claim_for_amendment(other, exam_id, lease_seconds=60)
    later = FakeClock(hub_stack.hub.queue.clock.now() + timedelta(seconds=120))  # the hub's clock passes the lease
    monkeypatch.setattr(hub_stack.hub.queue, "_clock", later)
    assert not _in_queue(hub_stack, signer, exam_id)  # lapsed: still reported, not claimable from the queue
    with pytest.raises(grpc.RpcError) as lapsed:
        _amend(other, exam_id, fence=claim.fence)
    assert lapsed.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(lapsed.value) == "LEASE_LOST"
    assert _amend(signer, exam_id).version == 2  # nobody holds a live claim: the signer may amend again


def test_plain_claim_of_a_reported_exam_is_refused(hub_stack, tmp_path: Path) -> None:
    exam_id, signer, other = _signed_ecg(hub_stack, tmp_path)
    for stub in (signer, other):
        with pytest.raises(grpc.RpcError) as plain:
            stub.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id, lease_seconds=60), timeout=10)
        assert plain.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(plain.value) == "NOT_CLAIMABLE"
    radio = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    with pytest.raises(grpc.RpcError) as wrong:
        _claim_for_amendment(radio, exam_id)
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(wrong.value) == "WRONG_SPECIALTY"
    city = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio_city"))
    with pytest.raises(grpc.RpcError) as foreign:
        _amend(city, exam_id)
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(foreign.value) == "EXAM_NOT_FOUND"
    details = other.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)
    assert details.exam.state == "reported" and details.exam.claimed_by == ""


def test_claim_for_amendment_needs_a_reported_exam(hub_stack, tmp_path: Path) -> None:
    copy_testdata(tmp_path / "in", ECG)
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    [outcome] = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams)
    exam_id = outcome.exam_id
    wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10).state == "queued")
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio"))
    with pytest.raises(grpc.RpcError) as queued:
        _claim_for_amendment(reader, exam_id)
    assert queued.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(queued.value) == "NOT_REPORTED"
    with pytest.raises(grpc.RpcError) as unsigned:
        _amend(reader, exam_id)
    assert unsigned.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(unsigned.value) == "NOT_SIGNED"


def test_amendment_writes_its_event(hub_stack, tmp_path: Path) -> None:
    exam_id, _signer, other = _signed_ecg(hub_stack, tmp_path)
    claim = _claim_for_amendment(other, exam_id)
    _amend(other, exam_id, fence=claim.fence, reason="missed AF")
    assert _events(hub_stack, exam_id, "amendment_claimed") == [{"fence": claim.fence}]
    assert _events(hub_stack, exam_id, "amended") == [{"version": 2, "fence": claim.fence}]
    published = _events(hub_stack, exam_id, "reported")  # the result publication: one per version
    assert [e["cursor"] for e in published] == [1, 2]
    assert _patient_name() not in json.dumps(_events(hub_stack, exam_id, "amended"))


def test_amendment_through_the_cli(embedded_stack, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    exam_id, _signer, _other = _signed_ecg(embedded_stack, tmp_path)
    claims_file = tmp_path / "claims.json"
    conn = ["--hub", embedded_stack.address, "--token", embedded_stack.tokens["cardio2"]]
    reader = [*conn, "--claims-file", str(claims_file)]
    amend = ["read", "amend", exam_id, "--reason", "missed AF", "--text", "Atrial fibrillation.", *reader]
    capsys.readouterr()
    assert main(amend) == 1  # no claim, not the signer
    assert "AMENDMENT_NEEDS_CLAIM" in capsys.readouterr().err
    assert main(["read", "claim", exam_id, *reader]) == 1  # a plain claim of a reported exam
    assert "NOT_CLAIMABLE" in capsys.readouterr().err
    assert main(["read", "claim", exam_id, "--amend", *reader]) == 0
    assert json.loads(claims_file.read_text()) == {exam_id: 2}
    capsys.readouterr()
    assert main(amend) == 0
    out = capsys.readouterr().out
    assert "report v2 amended by dr-rhythm (missed AF)" in out
    assert exam_id not in json.loads(claims_file.read_text())
    assert [(r.report.version, r.report.amends_reason) for r in _results(embedded_stack)] == [(1, ""), (2, "missed AF")]
