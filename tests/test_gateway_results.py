"""Results back to the clinic: a signed critical report reaches the gateway's results folder as
JSON and a printable text, the critical-result hook runs once, and a second poll repeats nothing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from helpers import wait_for, write_synthetic_wfdb
from teleread.gateway.results import ResultsInbox
from teleread.gateway.upload import scan_paths, upload_exams
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def test_a_signed_critical_report_is_written_and_raised(embedded_stack, tmp_path: Path) -> None:
    write_synthetic_wfdb(tmp_path / "in", rhythm="pause")
    site = embedded_stack.channel("site_a")
    ingest = ingest_pb2_grpc.IngestStub(site)
    (outcome,) = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams)
    wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=outcome.exam_id), timeout=10).state == "queued")
    cardio = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("cardio"))
    claim = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=120), timeout=10)
    cardio.SaveReport(
        worklist_pb2.SaveReportRequest(
            exam_id=claim.exam.exam_id, fence=claim.fence, text="Sinus arrest, 3.5 s pause.", critical=True
        ),
        timeout=10,
    )
    cardio.SignReport(worklist_pb2.SignReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10)

    marker = tmp_path / "hook-called.txt"
    hook = tmp_path / "page-doctor.sh"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {marker}\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    inbox = ResultsInbox(tmp_path / "results", hook=str(hook))
    stub = results_pb2_grpc.ResultsStub(site)
    assert inbox.poll(stub) == 1
    (json_file,) = sorted((tmp_path / "results").glob("*.json"))
    document = json.loads(json_file.read_text())
    assert document["critical"] is True and document["exam"]["examId"] == outcome.exam_id
    text = json_file.with_suffix(".txt").read_text()
    assert text.startswith("*** CRITICAL RESULT") and "Sinus arrest, 3.5 s pause." in text and "dr-heart" in text
    assert marker.read_text().strip() == str(json_file.with_suffix(".txt"))
    assert inbox.poll(stub) == 0  # the cursor was saved: nothing is repeated
    assert marker.read_text().count("\n") == 1
