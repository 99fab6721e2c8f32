"""Results back to the clinic: a signed critical report reaches the gateway's results folder as
JSON, a printable text and the hub's PDF (the very bytes the hub stored, checked against their
SHA-256), the critical-result hook runs once, and a second poll repeats nothing. A PDF the hub
cannot render (no font there) loses nothing else and moves on; a fetch the link cuts, or bytes that
do not verify, keep the cursor where it was so the next poll fetches it again. The renderer itself
is tested in test_report_pdf_render.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pypdf
import pytest

from helpers import signed_critical_ecg, wait_for, write_synthetic_wfdb
from teleread.client import atomic_write_bytes
from teleread.errors import IntegrityError
from teleread.gateway.clinic.results import ResultsInbox
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.v1 import (
    ingest_pb2,
    ingest_pb2_grpc,
    results_pb2,
    results_pb2_grpc,
    worklist_pb2,
    worklist_pb2_grpc,
)

pytestmark = pytest.mark.timeout(120)


def test_a_signed_critical_report_is_written_and_raised(embedded_stack: Any, tmp_path: Path) -> None:
    write_synthetic_wfdb(tmp_path / "in", rhythm="pause")
    site = embedded_stack.channel("site_a")
    ingest = ingest_pb2_grpc.IngestStub(site)
    (outcome,) = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams)
    wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=outcome.exam_id), timeout=10).state == "queued")
    cardio = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("cardio"))
    claim = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=120), timeout=10)
    cardio.SaveReport(
        worklist_pb2.SaveReportRequest(
            exam_id=claim.exam.exam_id,
            fence=claim.fence,
            text="Sinus arrest, 3.5 s pause.",
            impression="Sick sinus: pacing assessment today.",
            critical=True,
        ),
        timeout=10,
    )
    cardio.SignReport(worklist_pb2.SignReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10)

    marker = tmp_path / "hook-called.txt"
    hook = tmp_path / "page-doctor.sh"
    pdf_marker = tmp_path / "hook-pdf.txt"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {marker}\necho "$2" >> {pdf_marker}\n')
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
    assert pdf_marker.read_text().strip() == str(json_file.with_suffix(".pdf"))
    pdf = json_file.with_suffix(".pdf").read_bytes()
    pdf_text = _pdf_text(json_file.with_suffix(".pdf"))
    assert outcome.exam_id in pdf_text and "CRITICAL RESULT" in pdf_text and "dr-heart" in pdf_text
    assert "Sinus arrest, 3.5 s pause." in pdf_text and "Sick sinus: pacing assessment today." in pdf_text
    assert "送检单位 Clinic Township clinic A (clinic-a)" in " ".join(pdf_text.split())
    assert embedded_stack.hub.pdfs.flush(timeout=30)
    assert pdf == _stored_pdf(embedded_stack, outcome.exam_id)  # the hub's bytes, as stored
    recorded = json.loads(json_file.read_text()).get("pdf")  # the result names it once rendered
    assert recorded is None or recorded["sha256"] == hashlib.sha256(pdf).hexdigest()
    assert inbox.poll(stub) == 0  # the cursor was saved: nothing is repeated
    assert marker.read_text().count("\n") == 1


def _pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(path).pages)


def _stored_pdf(stack: Any, exam_id: str, version: int = 1) -> bytes:
    from sqlalchemy import select

    from teleread.db.schema import exams, reports
    from teleread.storage import report_pdf_key

    with stack.hub.engine.connect() as conn:
        sha, size, site = conn.execute(
            select(reports.c.pdf_sha256, reports.c.pdf_size, exams.c.site_id)
            .join(exams, exams.c.id == reports.c.exam_id)
            .where(reports.c.exam_id == exam_id, reports.c.version == version)
        ).one()
    key = report_pdf_key(tenant_id=site, exam_id=exam_id, version=version)
    with stack.hub.store.open_verified(key, sha256=sha, size=size) as fh:
        return bytes(fh.read())


def _signed_ecg(stack: Any, tmp_path: Path, *, critical: bool, text: str = "Sinus arrest, 3.5 s pause.") -> str:
    write_synthetic_wfdb(tmp_path / "in", rhythm="pause" if critical else "normal")
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    (outcome,) = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams)
    wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=outcome.exam_id), timeout=10).state == "queued")
    cardio = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    claim = cardio.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=outcome.exam_id, lease_seconds=120), timeout=10)
    request = worklist_pb2.SaveReportRequest(exam_id=outcome.exam_id, fence=claim.fence, text=text, critical=critical)
    cardio.SaveReport(request, timeout=10)
    cardio.SignReport(worklist_pb2.SignReportRequest(exam_id=outcome.exam_id, fence=claim.fence), timeout=10)
    return str(outcome.exam_id)


def _hook(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "hook-args.txt"
    hook = tmp_path / "page-doctor.sh"
    hook.write_text(f'#!/bin/sh\necho "$#:$1" >> {marker}\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    return hook, marker


@pytest.fixture
def fontless_stack(tmp_path: Path) -> Any:
    from conftest import make_settings, start_stack

    stack = start_stack("embedded", make_settings(tmp_path).updated(report__font=str(tmp_path / "no-font.ttc")))
    try:
        yield stack
    finally:
        for ch in stack.channels:
            ch.close()
        stack.server.stop(grace=None)
        stack.hub.close()


def test_a_pdf_the_hub_cannot_render_keeps_json_and_text_and_moves_on(
    fontless_stack: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exam_id = _signed_ecg(fontless_stack, tmp_path, critical=True, text="窦性停搏 PATIENT-TEXT-CANARY")
    hook, marker = _hook(tmp_path)
    inbox = ResultsInbox(tmp_path / "results", hook=str(hook))
    stub = results_pb2_grpc.ResultsStub(fontless_stack.channel("site_a"))
    with caplog.at_level(logging.ERROR, logger="teleread.reader.clients.results_client"):
        assert inbox.poll(stub) == 1
    folder = tmp_path / "results"
    name = f"1-{exam_id}"
    assert sorted(p.name for p in folder.iterdir()) == [".cursor", f"{name}.json", f"{name}.txt"]
    assert "PATIENT-TEXT-CANARY" in (folder / f"{name}.txt").read_text() and (folder / ".cursor").read_text() == "1\n"
    (failure,) = [r for r in caplog.records if r.getMessage().startswith("PDF report not written")]
    assert vars(failure)["reason"] == "REPORT_FONT_MISSING" and vars(failure)["exam_id"] == exam_id
    assert "CANARY" not in caplog.text and "窦性停搏" not in caplog.text
    assert marker.read_text() == f"1:{folder / (name + '.txt')}\n"  # the alert still went out, text only
    assert inbox.poll(stub) == 0  # the cursor moved on: nothing is repeated


class _Through:
    """The hub's Results stub, with GetReportPdf replaced."""

    def __init__(self, stub: Any, get_report_pdf: Any) -> None:
        self.ListResults = stub.ListResults
        self.GetReportPdf = get_report_pdf


def test_a_cut_or_altered_pdf_keeps_the_cursor_and_the_next_poll_fetches_it(
    embedded_stack: Any, tmp_path: Path
) -> None:
    exam_id = _signed_ecg(embedded_stack, tmp_path, critical=False)
    stub = results_pb2_grpc.ResultsStub(embedded_stack.channel("site_a"))
    inbox = ResultsInbox(tmp_path / "results")
    folder, name = tmp_path / "results", f"1-{exam_id}"
    nowhere = grpc.insecure_channel("127.0.0.1:9")  # nothing listens: UNAVAILABLE
    try:
        cut = _Through(stub, results_pb2_grpc.ResultsStub(nowhere).GetReportPdf)
        with pytest.raises(grpc.RpcError) as unavailable:
            inbox.poll(cut)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        nowhere.close()
    assert not (folder / ".cursor").exists() and not (folder / f"{name}.pdf").exists()

    def altered(request: Any, timeout: float) -> Any:
        for chunk in stub.GetReportPdf(request, timeout=timeout):
            chunk.data = chunk.data[:-1] + b"x"
            yield chunk

    with pytest.raises(IntegrityError):
        inbox.poll(_Through(stub, altered))
    assert not (folder / ".cursor").exists() and not (folder / f"{name}.pdf").exists()
    assert inbox.poll(stub) == 1  # the link is back: the same result, now with its PDF
    assert (folder / f"{name}.pdf").read_bytes() == _stored_pdf(embedded_stack, exam_id)
    assert (folder / ".cursor").read_text() == "1\n"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"old")

    def refuse(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.pdf"]


def test_a_critical_result_waits_in_gateway_status_until_a_named_person_acknowledges_it(
    embedded_stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from teleread.app.cli import main

    exam_id = signed_critical_ecg(embedded_stack, tmp_path / "in", text="VF.")
    site = embedded_stack.channel("site_a")
    results = tmp_path / "results"
    assert ResultsInbox(results).poll(results_pb2_grpc.ResultsStub(site)) == 1
    (json_file,) = sorted(results.glob("*.json"))
    cursor = json.loads(json_file.read_text())["cursor"]
    monkeypatch.setenv("TELEREAD_GATEWAY__RESULTS_DIR", str(results))
    status = ["gateway", "status", "--outbox", str(tmp_path / "gateway"), "--watch-dir", str(tmp_path / "w")]

    assert main(status) == 1
    shown = capsys.readouterr().out
    assert f"CRITICAL RESULT {cursor} (exam {exam_id}" in shown and "not acknowledged" in shown
    hub = ["--hub", embedded_stack.address, "--token", embedded_stack.tokens["site_a"]]
    ack = ["gateway", "ack", str(cursor), "--name", "Dr Wang Li", "--role", "attending physician",
           "--method", "phone", "--read-back", "VF, defibrillated, transferred", *hub]  # fmt: skip
    with pytest.raises(SystemExit):  # only phone, in person or system
        main([*ack[:7], "--method", "fax", *ack[9:]])
    assert main(ack) == 0
    record = json.loads(json_file.with_name(json_file.stem + ".ack.json").read_text())
    assert record["name"] == "Dr Wang Li" and record["method"] == "phone" and record["readBack"].startswith("VF")
    capsys.readouterr()
    assert main(status) == 0 and "CRITICAL RESULT" not in capsys.readouterr().out
    assert main(ack) == 2  # nothing left to acknowledge here
    got = results_pb2_grpc.ResultsStub(site).GetResult(results_pb2.GetResultRequest(exam_id=exam_id))
    assert got.critical_state == "acknowledged" and got.acknowledgement.role == "attending physician"
