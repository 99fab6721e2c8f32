"""ECG statements and measurements that build the report, in a real browser (Debian's headless
Chromium through Playwright) against a real hub on loopback: a synthetic AF ECG shows the machine's
AF statement unconfirmed; the reader confirms it, adds statements from the library by typing (English
and Chinese), and they build the Findings text in order; an edited measurement is kept as the
reader's; the signed version holds exactly the confirmed statements and the reader's measurements,
in GetExamDetails and in what ``teleread results pull`` writes; an unknown statement code and an
implausible value are refused; an amendment keeps its own statements.

Screenshots go to the test artefacts folder (``$TELEREAD_TEST_ARTIFACTS``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import READER_PASSWORD, running, signed_in_stack
from helpers import error_reason, wait_for_state, write_synthetic_wfdb
from teleread.app.cli import main
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.reader.station.serve import StationServer
from teleread.settings import StationSettings
from teleread.v1 import common_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)
PASSWORD = READER_PASSWORD
AF_LINE = "心房颤动伴快速心室率（Atrial fibrillation with rapid ventricular response）"
ST_T_LINE = "非特异性ST-T改变（Nonspecific ST-T changes）"
ABNORMAL_LINE = "异常心电图（Abnormal ECG）"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from running(signed_in_stack(tmp_path_factory.mktemp("statements-hub"), ("dr-heart",)))


@pytest.fixture(scope="module")
def station(stack: Any) -> Iterator[StationServer]:
    server = StationServer(StationSettings(port=0, hub=stack.address))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def page(browser: Any, station: StationServer) -> Iterator[Any]:
    context = browser.new_context(base_url=station.url, viewport={"width": 1600, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


def _af_exam(stack: Any, folder: Path, seed: int) -> str:
    write_synthetic_wfdb(folder, rhythm="af_rvr", name=f"ecg-af-{seed}", seed=seed)
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    [outcome] = upload_exams(ingest, scan_paths([folder]).exams)
    assert outcome.exam_id, outcome.errors
    wait_for_state(ingest, outcome.exam_id, "queued")
    return outcome.exam_id


def _open(page: Any, exam_id: str) -> None:
    page.goto("/")
    page.get_by_test_id("login-form").wait_for()
    page.fill("#login-user", "dr-heart")
    page.fill("#login-password", PASSWORD)
    page.get_by_test_id("login-submit").click()
    page.get_by_test_id("who").filter(has_text="dr-heart").wait_for(timeout=10_000)
    page.goto(f"/exam/{exam_id}")
    page.get_by_test_id("ecg-report").wait_for(timeout=15_000)


def _statement(page: Any, code: str) -> Any:
    return page.locator(f"[data-testid=statement][data-code='{code}']")


def _details(stack: Any, exam_id: str) -> worklist_pb2.ExamDetails:
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    return worklist.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10)


def test_the_hub_serves_its_statement_library(stack: Any) -> None:
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    lib = worklist.ListStatements(worklist_pb2.ListStatementsRequest(), timeout=10)
    assert lib.version and 60 <= len(lib.statements) <= 100
    by_code = {s.code: s for s in lib.statements}
    assert by_code["rhythm.sinus"].text_zh == "窦性心律"
    assert "ecg.af_rvr" in by_code["rhythm.af_rvr"].suggested_by
    assert {g.code for g in lib.groups} >= {"rhythm", "conduction", "axis", "ischaemia", "overall"}


def test_machine_statements_are_confirmed_statements_added_and_the_signed_report_carries_them(
    page: Any, stack: Any, tmp_path: Path, artifacts: Path, capsys: Any
) -> None:
    exam_id = _af_exam(stack, tmp_path / "af", seed=21)
    hub = _details(stack, exam_id)
    suggested = [s.code for s in hub.suggested_statements]
    assert "rhythm.af_rvr" in suggested and all(s.source == "machine" for s in hub.suggested_statements)
    hub_rate, hub_rr = hub.exam.triage.ecg.heart_rate_bpm, hub.exam.triage.ecg.rr_ms
    _open(page, exam_id)

    af = _statement(page, "rhythm.af_rvr")
    af.wait_for(timeout=10_000)
    assert af.get_attribute("data-state") == "unconfirmed" and af.get_attribute("data-source") == "machine"
    assert af.evaluate("e => getComputedStyle(e).borderTopStyle") == "dashed"  # visibly not the reader's yet
    assert "心房颤动" not in page.get_by_test_id("report-text").input_value()  # not in the report until confirmed
    page.screenshot(path=str(artifacts / "station-statements-unconfirmed.png"))

    af.click()  # confirm it
    page.locator("[data-testid=statement][data-code='rhythm.af_rvr'][data-state=confirmed]").wait_for()
    assert page.get_by_test_id("report-text").input_value() == AF_LINE
    assert af.evaluate("e => getComputedStyle(e).borderTopStyle") == "solid"

    page.keyboard.press("Alt+s")  # the search, from the keyboard, by English words
    search = page.get_by_test_id("statement-search")
    assert page.evaluate("document.activeElement.dataset.testid") == "statement-search"
    search.type("nonspecific st-t")
    page.locator("[data-testid=statement-option][data-code='repol.nonspecific_st_t']").wait_for()
    page.keyboard.press("Enter")
    _statement(page, "repol.nonspecific_st_t").wait_for()
    page.keyboard.press("Alt+s")  # and by Chinese, choosing with the arrows
    search.type("心电图")
    options = page.get_by_test_id("statement-option")
    options.first.wait_for()
    codes = [options.nth(i).get_attribute("data-code") for i in range(options.count())]
    for _ in range(codes.index("overall.abnormal")):
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    _statement(page, "overall.abnormal").wait_for()
    assert page.get_by_test_id("report-text").input_value() == "\n".join([AF_LINE, ST_T_LINE, ABNORMAL_LINE])
    text = page.get_by_test_id("report-text")
    text.press("End")
    text.press("Control+End")
    text.type("\nRate about 150 bpm.")  # the built text stays editable

    rate = page.get_by_test_id("measure-heart_rate_bpm")
    assert rate.input_value() == str(round(hub_rate * 10) / 10).removesuffix(".0")  # prefilled from the hub
    assert rate.get_attribute("data-source") == "hub"
    qrs = page.get_by_test_id("measure-qrs_ms")
    qrs.fill("96")
    assert qrs.get_attribute("data-source") == "reader"
    assert page.get_by_test_id("measure-source-qrs_ms").inner_text() == "reader's"
    unconfirmed = page.locator("[data-testid=statement][data-state=unconfirmed]")
    left_out = [unconfirmed.nth(i).get_attribute("data-code") for i in range(unconfirmed.count())]
    page.screenshot(path=str(artifacts / "station-statements-built.png"))

    page.keyboard.press("Control+Enter")  # sign
    page.get_by_test_id("recent-exam").first.wait_for(timeout=10_000)

    [signed] = [r for r in _details(stack, exam_id).reports if r.status != "draft"]
    assert [(s.code, s.source, s.confirmed) for s in signed.statements] == [
        ("rhythm.af_rvr", "machine", True),
        ("repol.nonspecific_st_t", "reader", True),
        ("overall.abnormal", "reader", True),
    ]
    assert not set(left_out) & {s.code for s in signed.statements}  # the unconfirmed are left out
    assert signed.statements[0].text_zh == "心房颤动伴快速心室率"
    assert signed.text == "\n".join([AF_LINE, ST_T_LINE, ABNORMAL_LINE, "Rate about 150 bpm."])
    assert signed.measurements.qrs_ms == 96.0 and list(signed.measurements_edited) == ["qrs_ms"]
    assert abs(signed.measurements.heart_rate_bpm - hub_rate) <= 0.05
    assert hub_rr > 0 and abs(signed.measurements.rr_ms - hub_rr) <= 0.5  # the RR too: the printed report shows it

    out = tmp_path / "results"
    assert main(["results", "pull", "--hub", stack.address, "--token", stack.tokens["site_a"], "--out", str(out)]) == 0
    capsys.readouterr()
    [pulled] = [json.loads(p.read_text()) for p in out.glob("*.json") if exam_id in p.name]
    report = pulled["report"]
    assert [s["code"] for s in report["statements"]] == ["rhythm.af_rvr", "repol.nonspecific_st_t", "overall.abnormal"]
    assert report["statements"][0]["textZh"] == "心房颤动伴快速心室率"
    assert report["measurements"]["qrsMs"] == 96.0 and report["measurementsEdited"] == ["qrs_ms"]
    import pypdf  # the printed report beside it says what the reader signed

    [pdf] = [p for p in out.glob("*.pdf") if exam_id in p.name]
    printed = "".join(page.extract_text() for page in pypdf.PdfReader(pdf).pages).replace(" ", "")
    assert "心房颤动伴快速心室率" in printed and "rhythm.af_rvr" in printed
    assert "overall.abnormal" in printed
    assert "96ms" in printed  # the reader's QRS, not the hub's

    # An amendment keeps its own statements; the signed version 1 is unchanged.
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    base = {"exam_id": exam_id, "reason": "rhythm reread", "text": "Atrial flutter."}
    with pytest.raises(grpc.RpcError) as err:
        worklist.AmendReport(
            worklist_pb2.AmendReportRequest(**base, statements=[common_pb2.ReportStatement(code="rhythm.made_up")]),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err.value) == "UNKNOWN_STATEMENT"
    assert "rhythm.made_up" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        worklist.AmendReport(
            worklist_pb2.AmendReportRequest(**base, measurements=common_pb2.EcgMeasurements(qrs_ms=4000)), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "MEASUREMENT_OUT_OF_RANGE"
    amended = worklist.AmendReport(
        worklist_pb2.AmendReportRequest(
            **base,
            statements=[common_pb2.ReportStatement(code="rhythm.flutter", source="reader")],
            measurements=common_pb2.EcgMeasurements(heart_rate_bpm=150, qrs_ms=96),
            measurements_edited=["heart_rate_bpm", "qrs_ms"],
        ),
        timeout=10,
    )
    assert amended.version == 2 and [s.code for s in amended.statements] == ["rhythm.flutter"]
    first, second = [r for r in _details(stack, exam_id).reports if r.status != "draft"]
    assert [s.code for s in first.statements][0] == "rhythm.af_rvr" and first.measurements.qrs_ms == 96.0
    assert [s.text for s in second.statements] == ["Atrial flutter"] and second.measurements.heart_rate_bpm == 150


def test_a_draft_keeps_the_unconfirmed_statements_and_the_readers_values(page: Any, stack: Any, tmp_path: Path) -> None:
    exam_id = _af_exam(stack, tmp_path / "af", seed=22)
    calls = []

    def first_without_the_rate(route: Any) -> None:  # as if the measurements' pass had not finished yet
        response = route.fetch()
        body = response.json()
        calls.append(1)
        if len(calls) == 1:
            body["exam"]["triage"]["ecg"].pop("heart_rate_bpm", None)
        route.fulfill(response=response, json=body)

    page.route(f"**/api/exams/{exam_id}", first_without_the_rate)
    _open(page, exam_id)
    _statement(page, "rhythm.af_rvr").wait_for(timeout=10_000)
    rate = page.get_by_test_id("measure-heart_rate_bpm")
    assert rate.input_value() == "" and rate.get_attribute("data-source") == ""  # absent: shown empty
    page.locator("[data-testid=measure-heart_rate_bpm][data-source=hub]").wait_for(timeout=8_000)  # fetched again
    assert float(rate.input_value()) > 100
    page.unroute(f"**/api/exams/{exam_id}")

    page.get_by_test_id("report-text").fill("Draft.")
    page.get_by_test_id("measure-pr_ms").fill("180")
    page.get_by_test_id("draft-state").filter(has_text="draft saved").wait_for(timeout=10_000)
    [draft] = _details(stack, exam_id).reports
    assert draft.status == "draft" and draft.measurements.pr_ms == 180.0
    assert {(s.code, s.confirmed) for s in draft.statements} >= {("rhythm.af_rvr", False)}
    page.reload()  # the page again: the draft's statements, still unconfirmed, and the reader's PR
    _statement(page, "rhythm.af_rvr").wait_for(timeout=10_000)
    assert _statement(page, "rhythm.af_rvr").get_attribute("data-state") == "unconfirmed"
    assert page.get_by_test_id("measure-pr_ms").input_value() == "180"
    assert page.get_by_test_id("measure-pr_ms").get_attribute("data-source") == "reader"
    page.keyboard.press("Alt+y")  # confirm all the machine's statements
    page.locator("[data-testid=ecg-report][data-unconfirmed='0']").wait_for()
    assert AF_LINE in page.get_by_test_id("report-text").input_value()
    # "change": the search replaces the statement in place; "✕" removes it
    items = page.get_by_test_id("statements").locator("[data-testid=statement]")
    before = [items.nth(i).get_attribute("data-code") for i in range(items.count())]
    text_before = page.get_by_test_id("report-text").input_value()
    page.locator("[data-testid=statement][data-code='rhythm.af_rvr'] [data-testid=statement-change]").click()
    search = page.get_by_test_id("statement-search")
    search.fill("")
    search.type("房扑")
    page.locator("[data-testid=statement-option][data-code='rhythm.flutter']").wait_for()
    page.keyboard.press("Enter")
    _statement(page, "rhythm.flutter").wait_for()
    after = [items.nth(i).get_attribute("data-code") for i in range(items.count())]
    assert after == [("rhythm.flutter" if c == "rhythm.af_rvr" else c) for c in before]
    flutter_line = "心房扑动（Atrial flutter）"
    assert page.get_by_test_id("report-text").input_value() == text_before.replace(AF_LINE, flutter_line)
    page.locator("[data-testid=statement][data-code='rhythm.flutter'] [data-testid=statement-remove]").click()
    assert _statement(page, "rhythm.flutter").count() == 0
    assert page.get_by_test_id("report-text").input_value() == text_before.replace(AF_LINE + "\n", "")


def test_each_version_keeps_its_statements_and_measurements_on_both_databases(hub_stack: Any, tmp_path: Path) -> None:
    exam_id = _af_exam(hub_stack, tmp_path / "af", seed=23)
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("cardio"))
    claim = reader.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id, lease_seconds=300), timeout=10)
    statements = [
        common_pb2.ReportStatement(code="rhythm.af_rvr", source="machine", confirmed=True),
        common_pb2.ReportStatement(code="rhythm.long_pause", source="machine", confirmed=False),
        common_pb2.ReportStatement(code="axis.normal", source="reader"),
    ]
    with pytest.raises(grpc.RpcError) as err:
        reader.SaveReport(
            worklist_pb2.SaveReportRequest(
                exam_id=exam_id,
                fence=claim.fence,
                text="AF.",
                statements=[*statements, common_pb2.ReportStatement(code="rhythm.nope")],
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rhythm.nope" in (err.value.details() or "")
    draft = reader.SaveReport(
        worklist_pb2.SaveReportRequest(
            exam_id=exam_id,
            fence=claim.fence,
            text="AF.",
            statements=statements,
            measurements=common_pb2.EcgMeasurements(heart_rate_bpm=148, qtc_bazett_ms=455),
            measurements_edited=["heart_rate_bpm"],
        ),
        timeout=10,
    )
    assert [s.confirmed for s in draft.statements] == [True, False, True]  # the draft keeps the unconfirmed
    signed = reader.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    assert [s.code for s in signed.statements] == ["rhythm.af_rvr", "axis.normal"]
    assert signed.statements[1].text == "Normal QRS axis" and signed.statements[1].text_zh == "电轴正常"
    amended = reader.AmendReport(
        worklist_pb2.AmendReportRequest(
            exam_id=exam_id,
            reason="axis reread",
            text="AF, left axis.",
            statements=[
                common_pb2.ReportStatement(code="rhythm.af_rvr", source="machine", confirmed=True),
                common_pb2.ReportStatement(code="axis.left", source="reader"),
            ],
        ),
        timeout=10,
    )
    assert amended.sha256 != signed.sha256
    first, second = _details(hub_stack, exam_id).reports
    assert [s.code for s in first.statements] == ["rhythm.af_rvr", "axis.normal"]
    assert first.measurements.heart_rate_bpm == 148 and first.measurements.qtc_bazett_ms == 455
    assert list(first.measurements_edited) == ["heart_rate_bpm"]
    assert [s.code for s in second.statements] == ["rhythm.af_rvr", "axis.left"]
    assert not second.HasField("measurements")  # the amendment gave none: its own, not the first's
