"""Results back to the clinic: a signed critical report reaches the gateway's results folder as
JSON, a printable text and a PDF, the critical-result hook runs once, and a second poll repeats
nothing. The PDF report on its own: Chinese text, amendments, markup characters, several pages, its
embedded font (and a missing one), and a rendering failure that loses nothing."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, cast

import pypdf
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from helpers import wait_for, write_synthetic_wfdb
from teleread.gateway.clinic import report_pdf
from teleread.client import atomic_write_bytes
from teleread.gateway.clinic.report_pdf import render_report_pdf
from teleread.gateway.clinic.results import ResultsInbox
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.v1 import (
    common_pb2,
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
    pdf_text = _pdf_text(json_file.with_suffix(".pdf"))
    assert outcome.exam_id in pdf_text and "CRITICAL RESULT" in pdf_text and "dr-heart" in pdf_text
    assert "Sinus arrest, 3.5 s pause." in pdf_text and "Sick sinus: pacing assessment today." in pdf_text
    assert inbox.poll(stub) == 0  # the cursor was saved: nothing is repeated
    assert marker.read_text().count("\n") == 1


def _pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(path).pages)


def _stamp(text: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromJsonString(text)
    return stamp


def _result(
    *, text: str = "Sinus rhythm.", impression: str = "Normal ECG.", critical: bool = False, **report: object
) -> results_pb2.Result:
    fields: dict[str, object] = {
        "exam_id": "ex-0001",
        "version": 1,
        "status": "final",
        "text": text,
        "impression": impression,
        "critical": critical,
        "author": "dr-heart",
        "signed_by": "dr-heart",
        "signed_at": _stamp("2025-03-01T08:30:00Z"),
        "sha256": "0123456789abcdef" * 4,
    }
    fields.update(report)
    return results_pb2.Result(
        cursor=7,
        critical=critical,
        published_at=_stamp("2025-03-01T08:31:00Z"),
        exam=common_pb2.Exam(
            exam_id="ex-0001",
            site="site_a",
            kind=common_pb2.EXAM_KIND_ECG,
            modality="ECG",
            priority=common_pb2.PRIORITY_STAT,
            indication="胸闷 2 小时",
            received_at=_stamp("2025-03-01T07:55:00Z"),
        ),
        report=common_pb2.Report(**fields),  # type: ignore[arg-type]
    )


def _font_names(path: Path) -> set[str]:
    names: set[str] = set()
    for page in pypdf.PdfReader(path).pages:
        resources = cast(pypdf.generic.DictionaryObject, page["/Resources"].get_object())
        fonts = cast(pypdf.generic.DictionaryObject, resources["/Font"].get_object())
        names.update(str(font.get_object()["/BaseFont"]) for font in fonts.values())
    return names


def test_the_pdf_prints_chinese_findings_with_their_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "7-ex-0001.pdf"
    render_report_pdf(
        _result(text="窦性心律，心率 72 次/分。\nQRS 波群正常。\n\n  ST 段无明显改变。", impression="正常心电图。"),
        path,
    )
    lines = [line.strip() for line in _pdf_text(path).splitlines()]
    findings = lines.index("Findings 检查所见")
    assert lines[findings + 1 : findings + 4] == ["窦性心律，心率 72 次/分。", "QRS 波群正常。", "ST 段无明显改变。"]
    assert "正常心电图。" in lines and "胸闷 2 小时" in lines
    fonts = _font_names(path)  # one embedded subset of the report font, nothing else
    assert fonts and all(re.fullmatch(r"/[A-Z]{6}\+WenQuanYiZenHei-0", name) for name in fonts), fonts
    text = "\n".join(lines)
    assert "Site site_a   Exam ex-0001" in text
    assert "Signed by dr-heart at 2025-03-01 08:30 UTC" in text
    assert "Report SHA-256: " + "0123456789abcdef" * 4 in text and "page 1 of 1" in text
    assert "CRITICAL" not in text and "Amended" not in text
    assert not [p.name for p in tmp_path.iterdir() if p.name != path.name]  # no temporary file left


def test_a_critical_result_carries_the_banner(tmp_path: Path) -> None:
    path = tmp_path / "critical.pdf"
    render_report_pdf(_result(critical=True), path)
    text = _pdf_text(path)
    assert "CRITICAL RESULT — act now and acknowledge" in text and "危急值 — 请立即处理并确认" in text


def test_an_amended_report_says_so_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "amended.pdf"
    render_report_pdf(_result(version=2, amends_reason="导联接错 (limb leads swapped)"), path)
    text = " ".join(_pdf_text(path).split())
    assert "Amended report 更正报告 (version 2)" in text and "Reason: 导联接错 (limb leads swapped)" in text
    assert "version 2 (final)" in text


def test_markup_characters_in_a_report_are_printed_as_written(tmp_path: Path) -> None:
    path = tmp_path / "markup.pdf"
    render_report_pdf(_result(text="<b>&amp; Q < 40 ms & R > 2 mV</b> <para>", impression="A&B <i>x</i>"), path)
    text = _pdf_text(path)
    assert "<b>&amp; Q < 40 ms & R > 2 mV</b> <para>" in text and "A&B <i>x</i>" in text


def test_control_and_unmapped_characters_do_not_break_the_pdf(tmp_path: Path) -> None:
    path = tmp_path / "odd.pdf"
    render_report_pdf(_result(text="PR\x00 160\x1b ms\r\n· QT 400\u00a0ms\tend"), path)
    text = _pdf_text(path)
    assert "PR 160 ms" in text and "・ QT 400 ms" in text and "\x00" not in text


def test_a_long_report_runs_over_several_numbered_pages(tmp_path: Path) -> None:
    path = tmp_path / "long.pdf"
    lines = [f"第 {n} 行：leads V1-V6 reviewed, no acute change." for n in range(1, 201)]
    render_report_pdf(_result(text="\n".join(lines), impression="END-OF-IMPRESSION", critical=True), path)
    reader = pypdf.PdfReader(path)
    pages = [page.extract_text() for page in reader.pages]
    total = len(pages)
    assert total > 1
    for number, page in enumerate(pages, start=1):
        assert f"page {number} of {total}" in page and "Exam ex-0001" in page and "CRITICAL RESULT" in page
    assert "第 1 行" in pages[0] and "第 200 行" in "".join(pages) and "END-OF-IMPRESSION" in pages[-1]


def test_the_same_result_always_renders_the_same_bytes() -> None:
    assert report_pdf.report_pdf_bytes(_result()) == report_pdf.report_pdf_bytes(_result())


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


class _OnePageHub:
    """ListResults of a hub holding one result."""

    def __init__(self, result: results_pb2.Result) -> None:
        self.result = result

    def ListResults(self, request: results_pb2.ListResultsRequest, timeout: float) -> results_pb2.ListResultsResponse:  # noqa: N802
        pending = [self.result] if self.result.cursor > request.after_cursor else []
        return results_pb2.ListResultsResponse(results=pending, next_cursor=self.result.cursor)


def test_a_pdf_failure_keeps_json_and_text_and_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "窦性停搏 PATIENT-TEXT-CANARY"

    def broken(result: results_pb2.Result, path: Path, **_: object) -> None:
        raise ValueError(f"cannot lay out {result.report.text}")  # a library quoting the report

    monkeypatch.setattr("teleread.gateway.clinic.results.render_report_pdf", broken)
    marker = tmp_path / "hook-args.txt"
    hook = tmp_path / "page-doctor.sh"
    hook.write_text(f'#!/bin/sh\necho "$#:$1" >> {marker}\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    inbox = ResultsInbox(tmp_path / "results", hook=str(hook))
    hub = _OnePageHub(_result(text=secret, critical=True))
    with caplog.at_level(logging.ERROR, logger="teleread.gateway.clinic.results"):
        assert inbox.poll(hub) == 1
    folder = tmp_path / "results"
    assert sorted(p.name for p in folder.iterdir()) == [".cursor", "7-ex-0001.json", "7-ex-0001.txt"]
    assert secret in (folder / "7-ex-0001.txt").read_text() and (folder / ".cursor").read_text().strip() == "7"
    failures = [r for r in caplog.records if r.getMessage().startswith("PDF report not written")]
    assert (
        len(failures) == 1 and vars(failures[0])["reason"] == "ValueError" and vars(failures[0])["exam_id"] == "ex-0001"
    )
    assert "CANARY" not in caplog.text and "窦性停搏" not in caplog.text
    assert marker.read_text() == f"1:{folder / '7-ex-0001.txt'}\n"  # the alert still went out, text only
    assert inbox.poll(hub) == 0  # the cursor moved on: nothing is repeated


def test_a_non_critical_result_gets_a_pdf_and_no_alert(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = ResultsInbox(tmp_path / "results", hook=str(tmp_path / "never-run"))
    with caplog.at_level(logging.ERROR, logger="teleread.gateway.clinic.results"):
        assert inbox.poll(_OnePageHub(_result(text="Sinus rhythm, rate 72."))) == 1
    assert "Sinus rhythm, rate 72." in _pdf_text(tmp_path / "results" / "7-ex-0001.pdf")
    assert not caplog.records  # neither a critical alert nor a failed hook


def _no_default_font(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without fonts-wqy-zenhei: nothing in the usual places, nothing from fc-match."""
    monkeypatch.setattr(report_pdf, "FONT_SEARCH", ())
    monkeypatch.setattr(report_pdf, "_fc_match", lambda: None)


def test_a_missing_font_is_a_typed_error_naming_the_setting_and_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_default_font(monkeypatch)
    with pytest.raises(report_pdf.ReportFontMissing) as missing:
        report_pdf.report_pdf_bytes(_result())
    assert missing.value.reason == "REPORT_FONT_MISSING"
    assert "TELEREAD_GATEWAY__REPORT_FONT" in missing.value.message and "fonts-wqy-zenhei" in missing.value.message
    not_a_font = tmp_path / "not-a-font.ttf"
    not_a_font.write_bytes(b"OTTO" + bytes(200))  # an OpenType/CFF header: reportlab cannot embed it
    for configured in (not_a_font, tmp_path / "absent.ttc"):
        with pytest.raises(report_pdf.ReportFontMissing) as refused:
            render_report_pdf(_result(), tmp_path / "r.pdf", font=configured)
        assert str(configured) in refused.value.message and "TELEREAD_GATEWAY__REPORT_FONT" in refused.value.message
        assert "fonts-wqy-zenhei" in refused.value.message
    assert not (tmp_path / "r.pdf").exists()


def test_the_font_setting_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = report_pdf.find_report_font()
    _no_default_font(monkeypatch)
    copy = tmp_path / "fonts" / "report.ttc"
    copy.parent.mkdir()
    copy.symlink_to(installed)
    monkeypatch.setenv("TELEREAD_GATEWAY__REPORT_FONT", str(copy))
    from teleread.settings import Settings

    configured = Settings().gateway.report_font
    assert configured == copy
    inbox = ResultsInbox(tmp_path / "results", report_font=configured)
    assert inbox.poll(_OnePageHub(_result(text="窦性停搏 3.5 秒"))) == 1
    assert "窦性停搏 3.5 秒" in _pdf_text(tmp_path / "results" / "7-ex-0001.pdf")


def test_without_a_font_the_inbox_warns_at_start_and_keeps_json_and_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _no_default_font(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="teleread.gateway.clinic.results"):
        inbox = ResultsInbox(tmp_path / "results")
        (warning,) = caplog.records
        assert warning.levelno == logging.WARNING and vars(warning)["reason"] == "REPORT_FONT_MISSING"
        assert "TELEREAD_GATEWAY__REPORT_FONT" in warning.getMessage() and "fonts-wqy-zenhei" in warning.getMessage()
        caplog.clear()
        assert inbox.poll(_OnePageHub(_result(text="窦性停搏 PATIENT-TEXT-CANARY", critical=True))) == 1
    folder = tmp_path / "results"
    assert sorted(p.name for p in folder.iterdir()) == [".cursor", "7-ex-0001.json", "7-ex-0001.txt"]
    (failure,) = [r for r in caplog.records if r.getMessage().startswith("PDF report not written")]
    assert vars(failure)["reason"] == "ReportFontMissing"
    assert "CANARY" not in caplog.text and "窦性停搏" not in caplog.text
