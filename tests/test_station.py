"""The reading station in a real browser (Debian's headless Chromium through Playwright) against a
real hub on loopback: sign-in and its refusals, the live worklist with a critical ECG's alert,
claim -> report from a template -> sign from the keyboard, the clinic pulling the result with
``teleread results pull``, tenancy, release on leaving an exam, and idle sign-out.

Screenshots of each screen go to the test artefacts folder (``$TELEREAD_TEST_ARTIFACTS``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import READER_PASSWORD, make_settings, running, signed_in_stack, start_stack
from helpers import copy_testdata, wait_for, wait_for_state, write_synthetic_wfdb
from teleread.app.cli import main
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.reader.station.serve import StationServer
from teleread.settings import StationSettings
from teleread.signin import set_password
from teleread.v1 import ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)
PASSWORD = READER_PASSWORD


class FakeMonotonic:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    stack = signed_in_stack(tmp_path_factory.mktemp("station-hub"), ("dr-heart", "dr-city", "tech-a", "dr-lung"))
    # A hub in service has its triage models loaded: one ECG through triage first.
    folder = tmp_path_factory.mktemp("warm-up")
    write_synthetic_wfdb(folder, rhythm="normal", name="ecg-warm-up", seed=9)
    warm = _upload(stack, folder, who="site_b")
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_b")), warm, "queued")
    yield from running(stack)


@pytest.fixture(scope="module")
def clock() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture(scope="module")
def station(stack: Any, clock: FakeMonotonic) -> Iterator[StationServer]:
    server = StationServer(StationSettings(port=0, hub=stack.address, lease_renew_seconds=1.0), clock=clock)
    server.start()
    assert server.station is not None
    server.station.sweep_seconds = 0.2
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def page(browser: Any, station: StationServer) -> Iterator[Any]:
    context = browser.new_context(base_url=station.url, viewport={"width": 1500, "height": 900})
    context.grant_permissions(["notifications"], origin=station.url)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def _sign_in(page: Any, user: str, password: str = PASSWORD) -> None:
    page.goto("/")
    page.get_by_test_id("login-form").wait_for()
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    page.get_by_test_id("login-submit").click()


def _signed_in(page: Any, user: str) -> None:
    _sign_in(page, user)
    page.get_by_test_id("who").filter(has_text=user).wait_for(timeout=10_000)
    page.locator("#live.on").wait_for(timeout=10_000)


def _upload(stack: Any, folder: Path, who: str = "site_a", **kwargs: Any) -> str:
    ingest = ingest_pb2_grpc.IngestStub(stack.channel(who))
    [outcome] = upload_exams(ingest, scan_paths([folder]).exams, **kwargs)
    assert outcome.exam_id, outcome.errors
    return outcome.exam_id


def _row(page: Any, exam_id: str) -> Any:
    return page.locator(f"tr[data-exam='{exam_id}']")


def test_sign_in_refuses_a_wrong_password_and_keeps_the_session_in_a_strict_http_only_cookie(
    page: Any, artifacts: Path
) -> None:
    _sign_in(page, "dr-heart", "not the password")
    page.get_by_test_id("login-error").filter(has_text="wrong user name or password").wait_for()
    assert page.get_by_test_id("worklist").is_hidden()
    page.screenshot(path=str(artifacts / "station-sign-in-refused.png"))
    _signed_in(page, "dr-heart")
    assert page.get_by_test_id("who").inner_text() == "dr-heart · cardiology · county-hosp"
    [cookie] = [c for c in page.context.cookies() if c["name"] == "teleread_station"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # nothing readable by scripts
    page.get_by_test_id("signout").click()
    page.get_by_test_id("login-note").filter(has_text="Signed out").wait_for()
    assert page.request.get("/api/worklist/events").status == 401


def test_a_site_token_or_a_technician_cannot_open_the_station(page: Any, stack: Any, station: StationServer) -> None:
    _sign_in(page, "site-clinic-a", PASSWORD)  # a machine identity has no password
    page.get_by_test_id("login-error").filter(has_text="wrong user name or password").wait_for()
    _sign_in(page, "tech-a")
    page.get_by_test_id("login-error").filter(has_text="for cardiologists and radiologists").wait_for()
    with httpx.Client(base_url=station.url) as client:  # the station takes no bearer token at all
        bearer = {"Authorization": f"Bearer {stack.tokens['site_a']}", "Origin": station.url}
        assert client.get("/api/exams/x", headers=bearer).status_code == 401
        assert client.post("/api/claim-next", json={}, headers=bearer).status_code == 401


def test_state_changing_requests_need_the_csrf_token_and_the_stations_origin(station: StationServer) -> None:
    with httpx.Client(base_url=station.url) as client:
        login_csrf = client.get("/api/session").json()["login_csrf"]
        answer = client.post(
            "/api/login",
            json={"user": "dr-heart", "password": PASSWORD},
            headers={"X-CSRF-Token": login_csrf, "Origin": "http://evil.example"},
        )
        assert (answer.status_code, answer.json()["error"]["reason"]) == (403, "CROSS_ORIGIN")
        answer = client.post(
            "/api/login", json={"user": "dr-heart", "password": PASSWORD}, headers={"Origin": station.url}
        )
        assert (answer.status_code, answer.json()["error"]["reason"]) == (403, "CSRF")
        ok = client.post(
            "/api/login",
            json={"user": "dr-heart", "password": PASSWORD},
            headers={"X-CSRF-Token": login_csrf, "Origin": station.url},
        )
        assert ok.status_code == 200
        csrf = ok.json()["csrf"]
        refused = client.post("/api/claim-next", json={}, headers={"Origin": station.url})
        assert (refused.status_code, refused.json()["error"]["reason"]) == (403, "CSRF")
        answer = client.post("/api/claim-next", json={}, headers={"Origin": station.url, "X-CSRF-Token": csrf})
        assert answer.status_code == 200
        headers = client.get("/").headers
        assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        client.post("/api/logout", json={}, headers={"Origin": station.url, "X-CSRF-Token": csrf})


def test_a_critical_ecg_alerts_then_is_claimed_reported_from_a_template_signed_and_pulled_by_the_clinic(
    page: Any, stack: Any, tmp_path: Path, artifacts: Path, capsys: Any
) -> None:
    _signed_in(page, "dr-heart")
    write_synthetic_wfdb(tmp_path / "pause", rhythm="pause", name="ecg-pause")
    exam_id = _upload(stack, tmp_path / "pause", priority="stat", indication="syncope at the clinic")
    committed = time.monotonic()
    alert = page.locator(f"[data-testid=critical-alert][data-exam='{exam_id}']")
    alert.wait_for(timeout=10_000)
    seconds = time.monotonic() - committed
    assert seconds <= 2.0, f"the critical alert took {seconds:.2f} s after the commit"
    assert "CRITICAL" in alert.inner_text() and "clinic-a" in alert.inner_text()
    row = _row(page, exam_id)
    assert row.get_attribute("data-level") == "critical" and "alerting" in (row.get_attribute("class") or "")
    assert "syncope at the clinic" in row.inner_text()
    assert int(page.evaluate("document.body.dataset.rang || '0'")) >= 1  # the alert rang
    page.screenshot(path=str(artifacts / "station-worklist-critical.png"))

    page.keyboard.press("n")  # claim next: the critical exam is the most urgent
    page.get_by_test_id("report-text").wait_for()
    assert page.url.endswith(f"/exam/{exam_id}")
    assert page.get_by_test_id("exam-level").inner_text().lower() == "critical"
    assert "pause" in page.get_by_test_id("findings").inner_text().lower()
    page.get_by_test_id("critical-banner").wait_for(state="hidden", timeout=5_000)  # claimed: no longer alerting
    page.get_by_test_id("template").select_option("ecg-pause")
    assert page.get_by_test_id("report-critical").is_checked()
    page.get_by_test_id("report-text").fill("Sinus pause, longest RR interval 3.4 s.")
    page.get_by_test_id("draft-state").filter(has_text="draft saved").wait_for(timeout=10_000)  # autosaved
    page.screenshot(path=str(artifacts / "station-exam.png"))
    page.keyboard.press("Control+Enter")
    page.get_by_test_id("recent-exam").filter(has_text="critical").wait_for(timeout=10_000)
    assert _row(page, exam_id).count() == 0  # reported: off the worklist

    out = tmp_path / "results"
    assert main(["results", "pull", "--hub", stack.address, "--token", stack.tokens["site_a"], "--out", str(out)]) == 0
    capsys.readouterr()
    [result] = [json.loads(p.read_text()) for p in out.glob("*.json")]
    text = json.dumps(result, ensure_ascii=False)
    assert "Sinus pause, longest RR interval 3.4 s." in text and "窦性停搏" in text and exam_id in text
    assert result["report"]["critical"] is True and result["report"]["signedBy"] == "dr-heart"


def test_only_the_readers_own_hospital_and_specialty_appear(page: Any, stack: Any, tmp_path: Path) -> None:
    _signed_in(page, "dr-heart")
    write_synthetic_wfdb(tmp_path / "city", rhythm="af_rvr", name="ecg-city", seed=3)
    other_hospital = _upload(stack, tmp_path / "city", who="site_x")
    copy_testdata(tmp_path / "ct", "CT_small.dcm")
    chest = _upload(stack, tmp_path / "ct")  # radiology's
    for who, exam_id in (("site_x", other_hospital), ("site_a", chest)):
        wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel(who)), exam_id, "queued")
    write_synthetic_wfdb(tmp_path / "own", rhythm="normal", name="ecg-own", seed=4)
    own = _upload(stack, tmp_path / "own")
    _row(page, own).wait_for(timeout=15_000)  # queued after the others: they would have come first
    shown = page.locator("[data-testid=worklist-row]").evaluate_all("rows => rows.map(r => r.dataset.exam)")
    assert own in shown and other_hospital not in shown and chest not in shown
    # the radiologist sees the CT and not the ECG
    page.get_by_test_id("signout").click()
    _signed_in(page, "dr-lung")
    _row(page, chest).wait_for(timeout=10_000)
    assert _row(page, own).count() == 0


def test_leaving_an_exam_releases_its_claim_and_an_open_exam_keeps_its_lease(
    page: Any, stack: Any, tmp_path: Path
) -> None:
    write_synthetic_wfdb(tmp_path / "e", rhythm="normal", name="ecg-lease", seed=5)
    exam_id = _upload(stack, tmp_path / "e")
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_a")), exam_id, "queued")
    _signed_in(page, "dr-heart")
    _row(page, exam_id).dblclick()
    page.get_by_test_id("report-text").wait_for()
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))

    def held() -> Any:
        exams = worklist.ListWorklist(worklist_pb2.ListWorklistRequest(include_claimed=True), timeout=10).exams
        return next(e for e in exams if e.exam_id == exam_id)

    first = held()
    assert (first.state, first.claimed_by) == ("in_reading", "dr-heart")
    wait_for(lambda: held().lease_expires_at.ToDatetime() > first.lease_expires_at.ToDatetime(), timeout=10)  # renewed
    page.keyboard.press("Escape")
    page.get_by_test_id("worklist").wait_for()
    wait_for(lambda: held().state == "queued" and not held().claimed_by, timeout=10)


def test_a_signed_report_is_amended_with_a_reason_from_the_exam_page(page: Any, stack: Any, tmp_path: Path) -> None:
    write_synthetic_wfdb(tmp_path / "af", rhythm="af_rvr", name="ecg-amend", seed=8)
    exam_id = _upload(stack, tmp_path / "af")
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_a")), exam_id, "queued")
    _signed_in(page, "dr-heart")
    _row(page, exam_id).dblclick()
    page.get_by_test_id("report-text").fill("Atrial fibrillation, rate 150 bpm.")
    page.get_by_test_id("sign").click()
    page.get_by_test_id("recent-exam").first.click()  # back to it from "signed in this session"
    page.get_by_test_id("amend").wait_for()
    assert page.get_by_test_id("report-text").is_disabled()  # a signed report is read-only until amended
    page.get_by_test_id("amend").click()
    page.get_by_test_id("amend-reason").fill("rate misread")
    page.get_by_test_id("report-text").fill("Atrial fibrillation, rate 120 bpm.")
    page.get_by_test_id("sign").click()
    page.get_by_test_id("recent-exam").filter(has_text="v2").wait_for(timeout=10_000)
    details = worklist_pb2_grpc.WorklistStub(stack.channel("cardio")).GetExamDetails(
        worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10
    )
    [first, second] = [r for r in details.reports if r.status != "draft"]
    assert (first.version, second.version, second.amends_reason) == (1, 2, "rate misread")
    assert second.text == "Atrial fibrillation, rate 120 bpm." and second.signed_by == "dr-heart"


def test_each_signed_version_shows_the_printed_report_the_hub_rendered_for_the_clinic(
    page: Any, stack: Any, tmp_path: Path, artifacts: Path
) -> None:
    import subprocess

    import pypdf

    from teleread.reader.clients.results_client import fetch_report_pdf

    from teleread.patient import PatientContext

    patient = PatientContext.of(
        id="SYN-0042",
        name="ZHANG^SAN=张^三",
        sex="M",
        birth_date="19610215",
        referring_physician="LI^SI=李^四",
        patient_class="outpatient",
    )  # fmt: skip  (synthetic)
    write_synthetic_wfdb(tmp_path / "e", rhythm="normal", name="ecg-print", seed=12)
    exam_id = _upload(stack, tmp_path / "e", indication="pre-operative ECG", patient=patient)
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_a")), exam_id, "queued")
    _signed_in(page, "dr-heart")
    _row(page, exam_id).dblclick()
    page.get_by_test_id("report-text").fill("Sinus rhythm 72 bpm. Normal ECG. 正常心电图。")
    page.get_by_test_id("sign").click()
    page.get_by_test_id("recent-exam").first.wait_for(timeout=10_000)
    page.goto(f"/exam/{exam_id}")
    link = page.get_by_test_id("report-pdf")
    link.wait_for(timeout=10_000)
    href = link.get_attribute("href") or ""
    assert href.endswith(f"/api/exams/{exam_id}/report.pdf?version=1") and link.get_attribute("target") == "_blank"
    answer = page.request.get(href)  # with the reader's cookie, as the link opens it
    assert answer.status == 200 and answer.headers["content-type"] == "application/pdf"
    assert answer.headers["cache-control"] == "no-store"
    shown = answer.body()
    stored = tmp_path / "hub.pdf"
    fetch_report_pdf(worklist_pb2_grpc.WorklistStub(stack.channel("cardio")), exam_id=exam_id, version=1, path=stored)
    assert shown == stored.read_bytes()  # the very PDF the clinic files
    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(stored).pages)
    assert "正常心电图" in text and "dr-heart" in text and "clinic-a" in text.lower()
    assert "张三" in text.replace(" ", "") and "SYN-0042" in text  # the header the clinic files
    picture = artifacts / "station-printed-report"
    subprocess.run(
        ["pdftoppm", "-r", "90", "-f", "1", "-l", "1", "-png", "-singlefile", str(stored), str(picture)], check=True
    )
    assert picture.with_suffix(".png").stat().st_size > 10_000
    page.get_by_test_id("signout").click()
    page.get_by_test_id("login-form").wait_for()
    assert page.request.get(href).status == 401  # signed out: nothing
    _signed_in(page, "dr-city")  # a cardiologist of another hospital: not theirs to see
    refused = page.request.get(href)
    assert (refused.status, refused.json()["error"]["reason"]) == (404, "EXAM_NOT_FOUND")


def test_a_critical_exam_waiting_before_sign_in_is_marked_until_claimed(page: Any, stack: Any, tmp_path: Path) -> None:
    write_synthetic_wfdb(tmp_path / "stemi", rhythm="stemi", name="ecg-stemi", seed=6)
    exam_id = _upload(stack, tmp_path / "stemi", who="site_b")
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_b")), exam_id, "queued")
    _signed_in(page, "dr-heart")
    page.locator(f"[data-testid=critical-alert][data-exam='{exam_id}']").wait_for(timeout=10_000)
    assert "alerting" in (_row(page, exam_id).get_attribute("class") or "")
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio2"))  # another reader claims it
    claim = worklist.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id), timeout=10)
    page.locator(f"[data-testid=critical-alert][data-exam='{exam_id}']").wait_for(state="detached", timeout=10_000)
    _row(page, exam_id).filter(has_text="dr-rhythm").wait_for(timeout=10_000)  # shown as claimed by them
    worklist.ReleaseClaim(worklist_pb2.ReleaseClaimRequest(exam_id=exam_id, fence=claim.fence), timeout=10)


def test_a_reader_idle_for_the_set_time_is_signed_out(
    page: Any, clock: FakeMonotonic, station: StationServer, artifacts: Path
) -> None:
    _signed_in(page, "dr-heart")
    clock.offset += 15 * 60 + 1  # fifteen minutes without a key or a click
    page.get_by_test_id("login-note").filter(has_text="without activity").wait_for(timeout=10_000)
    page.screenshot(path=str(artifacts / "station-idle-signed-out.png"))
    assert page.get_by_test_id("login-form").is_visible()
    assert page.request.get("/api/templates").status == 401


def test_with_the_hubs_certificates_the_station_serves_https_and_talks_tls_to_the_hub(tmp_path: Path) -> None:
    from teleread.tls import make_local_pki

    pki = tmp_path / "pki"
    make_local_pki(pki, hosts=["localhost", "127.0.0.1"])
    settings = make_settings(tmp_path / "hub").updated(grpc__tls_cert=pki / "hub.pem", grpc__tls_key=pki / "hub.key")
    hub = start_stack("embedded", settings)
    set_password(hub.hub.engine, name="dr-heart", password=PASSWORD)
    station = StationServer(
        StationSettings(
            port=0, hub=hub.address, tls_cert=pki / "hub.pem", tls_key=pki / "hub.key", hub_ca=pki / "ca.pem"
        )
    ).start()
    try:
        assert station.url.startswith("https://")
        with httpx.Client(base_url=station.url, verify=str(pki / "ca.pem")) as client:
            login_csrf = client.get("/api/session").json()["login_csrf"]
            answer = client.post(
                "/api/login",
                json={"user": "dr-heart", "password": PASSWORD},
                headers={"X-CSRF-Token": login_csrf, "Origin": station.url},
            )
            assert answer.status_code == 200  # signed in at the hub over TLS
            cookie = answer.headers["set-cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the station's port
            httpx.get(station.url.replace("https://", "http://") + "/api/session", timeout=5)
    finally:
        station.stop()
        hub.close()


def test_the_patient_is_shown_to_the_reader_and_never_logged_by_the_station(
    page: Any, stack: Any, tmp_path: Path, artifacts: Path
) -> None:
    import io

    from teleread.logs import configure_logging
    from teleread.patient import PatientContext

    canary = PatientContext.of(
        id="PHI-STATION-4711", name="PHI_STATION^王小明", sex="F", birth_date="19560304",
        referring_physician="PHI_STATION_DR^刘", patient_class="outpatient",
    )  # fmt: skip
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)  # every logger of this process: the hub and the station
    write_synthetic_wfdb(tmp_path / "first", rhythm="normal", name="ecg-prior", seed=21)
    prior = _upload(stack, tmp_path / "first", patient=canary)
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_a")), prior, "queued")
    write_synthetic_wfdb(tmp_path / "second", rhythm="af_rvr", name="ecg-now", seed=22)
    exam_id = _upload(stack, tmp_path / "second", patient=canary, indication="palpitations")
    wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_a")), exam_id, "queued")
    _signed_in(page, "dr-heart")
    row = _row(page, exam_id)
    row.wait_for(timeout=10_000)
    assert "F 70 y" in row.inner_text()  # sex and age (at the exam) in the worklist
    page.screenshot(path=str(artifacts / "station-worklist.png"))
    row.dblclick()
    patient = page.get_by_test_id("patient")
    patient.filter(has_text="PHI_STATION 王小明").wait_for(timeout=10_000)  # the PN as a reader reads it
    assert "PHI-STATION-4711" in patient.inner_text() and "outpatient" in patient.inner_text()
    assert "刘" in page.get_by_test_id("request").inner_text()
    assert page.get_by_test_id("priors").locator("[data-testid=prior]").count() >= 1  # the earlier exam
    page.screenshot(path=str(artifacts / "station-exam-patient.png"))
    page.get_by_test_id("back").click()
    page.get_by_test_id("worklist").wait_for()
    logs = stream.getvalue()
    assert '"route": "/api/exams/{exam_id}"' in logs  # the station's access log ran
    for needle in ("PHI_STATION", "王小明", "PHI-STATION-4711", "刘", "19560304"):
        assert needle not in logs, f"{needle!r} reached a log"


def test_sign_and_next_signs_the_open_exam_and_opens_the_next_one_claimed(
    page: Any, stack: Any, tmp_path: Path
) -> None:
    exams = []
    for n in range(2):
        write_synthetic_wfdb(tmp_path / f"e{n}", rhythm="normal", name=f"ecg-next-{n}", seed=30 + n)
        exams.append(_upload(stack, tmp_path / f"e{n}"))
    for exam_id in exams:
        wait_for_state(ingest_pb2_grpc.IngestStub(stack.channel("site_a")), exam_id, "queued")
    _signed_in(page, "dr-heart")
    _row(page, exams[0]).dblclick()
    page.get_by_test_id("report-text").wait_for()
    page.get_by_test_id("report-text").fill("Sinus rhythm, normal ECG.")
    page.keyboard.press("Control+Shift+Enter")
    page.wait_for_function("(first) => !location.pathname.endsWith(first)", arg=exams[0], timeout=10_000)
    page.get_by_test_id("report-text").wait_for()
    assert page.get_by_test_id("report-text").input_value() == ""  # a new, empty report
    opened = page.evaluate("decodeURIComponent(location.pathname.split('/').pop())")
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    signed = worklist.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exams[0]), timeout=10)
    assert signed.exam.state == "reported" and signed.reports[-1].text == "Sinus rhythm, normal ECG."
    held = worklist.ListWorklist(worklist_pb2.ListWorklistRequest(include_claimed=True), timeout=10).exams
    assert [(e.state, e.claimed_by) for e in held if e.exam_id == opened] == [("in_reading", "dr-heart")]
    page.keyboard.press("Escape")  # leave it: released for the next test
    wait_for(lambda: all(e.exam_id != opened or not e.claimed_by for e in worklist.ListWorklist(
        worklist_pb2.ListWorklistRequest(include_claimed=True), timeout=10).exams), timeout=10)  # fmt: skip
