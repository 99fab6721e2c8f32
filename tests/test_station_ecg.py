"""The reading station's ECG viewer in a real browser (Debian's headless Chromium through Playwright)
against a real hub on loopback: the hub's GetEcgWaveform and its refusals, and what the viewer
draws, read back from the canvas pixels: the grid at the calibrated scale, lead II where its samples
say, paper speed and gain, calipers on the R peaks, the pause marked where it is, ST leads, a DICOM
12-lead and a WFDB record, a 2-lead record stacked, the prior beside it, the keys.

Ground truth: synthetic ECGs with known samples and R peaks (``synthetic_ecg`` /
``synthetic_r_peaks``), and pydicom's bundled ``waveform_ecg.dcm`` read by the loader directly.
Screenshots go to the test artefacts folder (``$TELEREAD_TEST_ARTIFACTS``)."""

from __future__ import annotations

import math

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import READER_PASSWORD, running, signed_in_stack
from helpers import copy_testdata, error_reason, wait_for, wait_for_state, write_synthetic_wfdb
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.models.inference.synthetic import synthetic_ecg, synthetic_r_peaks, write_wfdb_record
from teleread.reader.station.serve import StationServer
from teleread.settings import StationSettings
from teleread.v1 import ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)
PASSWORD = READER_PASSWORD
LABEL_PX = 16  # the lead's name at the top of each cell (at device scale 1)
CALIBRATION = 4.0  # device px per mm set in the browser before the page loads


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from running(signed_in_stack(tmp_path_factory.mktemp("ecg-hub"), ("dr-heart", "dr-city", "dr-lung")))


@pytest.fixture(scope="module")
def station(stack: Any) -> Iterator[StationServer]:
    server = StationServer(StationSettings(port=0, hub=stack.address))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _context(
    browser: Any, station: StationServer, *, scale: float = 1.0, calibration: float | None = CALIBRATION
) -> Any:
    context = browser.new_context(
        base_url=station.url, viewport={"width": 1600, "height": 1000}, device_scale_factor=scale
    )
    if calibration is not None:
        context.add_init_script(f"localStorage.setItem('teleread.ecg.devicePxPerMm', '{calibration}')")
    return context


@pytest.fixture()
def page(browser: Any, station: StationServer) -> Iterator[Any]:
    context = _context(browser, station)
    try:
        yield context.new_page()
    finally:
        context.close()


def _upload(stack: Any, folder: Path, who: str = "site_a", **kwargs: Any) -> str:
    ingest = ingest_pb2_grpc.IngestStub(stack.channel(who))
    [outcome] = upload_exams(ingest, scan_paths([folder]).exams, **kwargs)
    assert outcome.exam_id, outcome.errors
    wait_for_state(ingest, outcome.exam_id, "queued")
    return outcome.exam_id


def _synthetic(stack: Any, tmp_path: Path, rhythm: str, seed: int, **kwargs: Any) -> tuple[str, np.ndarray]:
    folder = tmp_path / f"{rhythm}-{seed}"
    write_synthetic_wfdb(folder, rhythm=rhythm, name=f"ecg-{rhythm}-{seed}", seed=seed)
    signal, _ = synthetic_ecg(rhythm=rhythm, fs=500, seconds=10.0, seed=seed)
    return _upload(stack, folder, **kwargs), signal


def _open(page: Any, exam_id: str, user: str = "dr-heart") -> None:
    page.goto("/")
    page.get_by_test_id("login-form").wait_for()
    page.fill("#login-user", user)
    page.fill("#login-password", PASSWORD)
    page.get_by_test_id("login-submit").click()
    page.get_by_test_id("who").filter(has_text=user).wait_for(timeout=10_000)
    page.goto(f"/exam/{exam_id}")
    page.locator("[data-testid=viewer][data-state=drawn]").wait_for(timeout=15_000)


def _draws(page: Any) -> int:
    return int(page.get_by_test_id("viewer").get_attribute("data-draws"))


def _redrawn(page: Any, before: int) -> None:
    page.locator(f"[data-testid=viewer][data-draws='{before + 1}']").wait_for(timeout=5_000)


def _geometry(page: Any, testid: str = "ecg-trace") -> dict[str, Any]:
    canvas = page.get_by_test_id(testid)
    return {
        "cells": json.loads(canvas.get_attribute("data-cells")),
        "px_per_s": float(canvas.get_attribute("data-px-per-s")),
        "px_per_mv": float(canvas.get_attribute("data-px-per-mv")),
    }


def _rgba(page: Any, *, x: int, y: int, w: int, h: int, testid: str = "ecg-trace") -> np.ndarray:
    data = page.evaluate(
        """([id, x, y, w, h]) => Array.from(document.querySelector(`[data-testid=${id}]`)
             .getContext('2d').getImageData(x, y, w, h).data)""",
        [testid, x, y, w, h],
    )
    return np.array(data, dtype=np.uint8).reshape(h, w, 4).astype(int)


def _pixels(page: Any, *, x: int, y: int, w: int, h: int, testid: str = "ecg-trace") -> np.ndarray:
    rgba = _rgba(page, x=x, y=y, w=w, h=h, testid=testid)
    rgba[rgba[:, :, 3] == 0, :3] = 255  # a tile not painted yet (out of view) is blank, not black
    return rgba[:, :, :3]


def _show(page: Any, cell: dict[str, Any], testid: str = "ecg-trace") -> None:
    """Scroll the sheet as a reader would, so that ``cell`` starts at the top left of the view, and
    wait for the frame that paints the tiles now in view (only those are drawn)."""
    page.evaluate(
        """([id, left, top]) => new Promise((done) => {
             const canvas = document.querySelector(`[data-testid=${id}]`);
             const scroller = canvas.closest('.ecg-scroll');
             const dpr = window.devicePixelRatio || 1;
             if (scroller) {
               const c = canvas.getBoundingClientRect(); const s = scroller.getBoundingClientRect();
               scroller.scrollLeft += c.left - s.left + left / dpr;
               scroller.scrollTop += c.top - s.top + top / dpr;
             }
             requestAnimationFrame(() => requestAnimationFrame(done));
           })""",
        [testid, cell["left"], cell["top"]],
    )


def _dark(rgb: np.ndarray) -> np.ndarray:
    return (rgb < 110).all(axis=-1)


def _cell(geometry: dict[str, Any], lead: str, *, rhythm: bool) -> dict[str, Any]:
    return next(c for c in geometry["cells"] if c["lead"] == lead and c["rhythm"] == rhythm)


def _check_trace(page: Any, cell: dict[str, Any], geometry: dict[str, Any], mv: np.ndarray, fs: float) -> float:
    """The share of columns of ``cell`` whose drawn trace passes within 2 px of the row its sample says."""
    _show(page, cell)
    top, bottom = cell["top"], cell["bottom"]
    x_start = cell["x0"] + 2
    width = cell["right"] - x_start - 2
    rgba = _rgba(page, x=x_start, y=top, w=width, h=bottom - top)
    dark = _dark(rgba[:, :, :3])
    painted = (rgba[:, :, 3] > 0).all(axis=0)  # the columns in view (the others are not drawn yet)
    hits, tried = 0, 0
    for col in range(0, width, 3):
        if not painted[col]:
            continue
        t = cell["t0"] + (x_start + col - cell["x0"]) / geometry["px_per_s"]
        i = int(round(t * fs))
        if i >= len(mv):
            break
        expected = cell["y0"] - mv[i] * geometry["px_per_mv"] - top
        rows = np.nonzero(dark[:, col])[0]
        tried += 1
        hits += bool(rows.size and np.min(np.abs(rows - expected)) <= 2.0)
    assert tried > 50
    return hits / tried


def _peaks(page: Any, cell: dict[str, Any], geometry: dict[str, Any]) -> tuple[list[float], list[float]]:
    """R peaks found in the pixels of a cell (those in view once it is scrolled to): (x of each, its
    height above the baseline in px)."""
    _show(page, cell)
    top, bottom = cell["top"], cell["bottom"]
    rgb = _pixels(page, x=cell["x0"], y=top, w=cell["right"] - cell["x0"], h=bottom - top)
    dark = _dark(rgb)
    dark[:LABEL_PX] = False  # the lead's name
    highest = np.array(
        [np.nonzero(dark[:, c])[0].min() if dark[:, c].any() else bottom - top for c in range(dark.shape[1])]
    )
    height = cell["y0"] - top - highest
    tall = height > 0.6 * geometry["px_per_mv"]
    xs, heights, c = [], [], 0
    while c < len(tall):
        if tall[c]:
            end = c
            while end + 1 < len(tall) and tall[end + 1]:
                end += 1
            best = c + int(np.argmax(height[c : end + 1]))
            xs.append(float(cell["x0"] + best))
            heights.append(float(height[best]))
            c = end + 1
        c += 1
    return xs, heights


# ---- the hub ------------------------------------------------------------------------------------


def test_the_hub_decodes_the_stored_ecg_and_refuses_other_readers_and_other_exams(stack: Any, tmp_path: Path) -> None:
    exam_id, signal = _synthetic(stack, tmp_path, "normal", seed=41)
    cardio = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    wave = cardio.GetEcgWaveform(worklist_pb2.GetEcgWaveformRequest(exam_id=exam_id), timeout=10)
    assert (wave.fs, wave.source, round(wave.duration_s, 3)) == (500.0, "wfdb", 10.0)
    assert [lead.name for lead in wave.leads][:3] == ["I", "II", "III"] and len(wave.leads) == 12
    got = np.array(wave.leads[1].microvolts)
    assert got.shape == (5000,) and np.max(np.abs(got - np.round(signal[:, 1] * 1000))) <= 1

    for who, code, reason in (("cardio_city", grpc.StatusCode.NOT_FOUND, "EXAM_NOT_FOUND"),
                              ("radio", grpc.StatusCode.PERMISSION_DENIED, "WRONG_SPECIALTY")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as refused:
            worklist_pb2_grpc.WorklistStub(stack.channel(who)).GetEcgWaveform(
                worklist_pb2.GetEcgWaveformRequest(exam_id=exam_id), timeout=10
            )
        assert (refused.value.code(), error_reason(refused.value)) == (code, reason)
        assert "ecg-normal" not in (refused.value.details() or "")

    ct = _upload(stack, copy_testdata(tmp_path / "ct", "CT_small.dcm")[0].parent)
    with pytest.raises(grpc.RpcError) as refused:
        worklist_pb2_grpc.WorklistStub(stack.channel("radio")).GetEcgWaveform(
            worklist_pb2.GetEcgWaveformRequest(exam_id=ct), timeout=10
        )
    assert (refused.value.code(), error_reason(refused.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_AN_ECG")


# ---- the drawing ----------------------------------------------------------------------------------


def test_the_grid_has_major_lines_every_5_mm_at_the_calibrated_scale_on_a_sharp_canvas(
    browser: Any, station: StationServer, stack: Any, tmp_path: Path, artifacts: Path
) -> None:
    exam_id, _ = _synthetic(stack, tmp_path, "normal", seed=42)
    context = _context(browser, station, scale=2.0, calibration=7.5)  # a high-density screen
    try:
        page = context.new_page()
        _open(page, exam_id)
        canvas = page.get_by_test_id("ecg-trace")
        width, css_width = page.evaluate(
            "(() => { const c = document.querySelector('[data-testid=ecg-trace]');"
            " return [c.width, c.clientWidth]; })()"
        )
        assert width == 2 * css_width  # one canvas pixel per device pixel
        assert float(page.get_by_test_id("viewer").get_attribute("data-mm-px")) == 7.5
        assert abs(width - 7.5 * (10 + 250)) <= 1  # 1 mV pulse room + 10 s at 25 mm/s
        # a scanline 2.5 mm into the first row: between horizontal lines, crossing every vertical one
        line = _pixels(page, x=0, y=int(7.5 * 2.5), w=width, h=1)[0]
        major = np.abs(line - np.array([0xE0, 0x8A, 0x8A])).sum(axis=1) <= 6
        minor = np.abs(line - np.array([0xF2, 0xC4, 0xC4])).sum(axis=1) <= 6
        starts = [x for x in range(1, width) if major[x] and not major[x - 1]]
        gaps = np.diff(starts)
        assert len(starts) >= 40 and np.all(np.abs(gaps - 37.5) <= 1), gaps
        minor_starts = [x for x in range(starts[0], starts[1]) if minor[x] and not minor[x - 1]]
        assert len(minor_starts) == 4  # four 1 mm lines between two major ones
        canvas.screenshot(path=str(artifacts / "station-ecg-grid-dpr2.png"))
    finally:
        context.close()


def test_lead_ii_is_drawn_where_its_samples_say_and_speed_and_gain_scale_it(
    page: Any, stack: Any, tmp_path: Path, artifacts: Path
) -> None:
    exam_id, signal = _synthetic(stack, tmp_path, "normal", seed=43)
    _open(page, exam_id)
    g = _geometry(page)
    assert (g["px_per_s"], g["px_per_mv"]) == (25 * CALIBRATION, 10 * CALIBRATION)
    order = [c["lead"] for c in g["cells"] if not c["rhythm"]]
    assert order == ["I", "aVR", "V1", "V4", "II", "aVL", "V2", "V5", "III", "aVF", "V3", "V6"]
    lead_ii = signal[:, 1]
    for cell in (_cell(g, "II", rhythm=False), _cell(g, "II", rhythm=True)):
        assert _check_trace(page, cell, g, lead_ii, 500.0) >= 0.97
    # a wrong scale would not match: the same check against lead II drawn 1 mm lower fails
    shifted = dict(_cell(g, "II", rhythm=True), y0=_cell(g, "II", rhythm=True)["y0"] + int(CALIBRATION))
    assert _check_trace(page, shifted, g, lead_ii, 500.0) < 0.6

    rhythm = _cell(g, "II", rhythm=True)
    xs25, heights10 = _peaks(page, rhythm, g)
    truth = synthetic_r_peaks(rhythm="normal", seconds=10.0, seed=43)
    assert len(xs25) == len(truth)
    assert np.max(np.abs((np.array(xs25) - rhythm["x0"]) / g["px_per_s"] - truth)) <= 0.02

    before = _draws(page)
    page.get_by_test_id("ecg-speed").select_option("50")
    _redrawn(page, before)
    g50 = _geometry(page)
    xs50, _ = _peaks(page, _cell(g50, "II", rhythm=True), g50)
    n = min(len(xs50), len(xs25))
    assert n >= 5
    assert np.allclose(np.diff(xs50[:n]), 2 * np.diff(xs25[:n]), atol=3)  # the same beats, twice as far apart

    before = _draws(page)
    page.get_by_test_id("ecg-speed").select_option("25")
    _redrawn(page, before)
    page.get_by_test_id("ecg-gain").select_option("20")
    _redrawn(page, before + 1)
    g20 = _geometry(page)
    _, heights20 = _peaks(page, _cell(g20, "II", rhythm=True), g20)
    assert np.allclose(np.array(heights20), 2 * np.array(heights10), atol=3)  # twice as tall
    assert _check_trace(page, _cell(g20, "II", rhythm=True), g20, lead_ii, 500.0) >= 0.97
    page.get_by_test_id("viewer").screenshot(path=str(artifacts / "station-ecg-gain-20.png"))


def test_a_large_sheet_paints_the_tiles_in_view_and_the_others_as_they_scroll_in(
    page: Any, stack: Any, tmp_path: Path
) -> None:
    exam_id, signal = _synthetic(stack, tmp_path, "normal", seed=46)
    _open(page, exam_id)
    before = _draws(page)
    page.get_by_test_id("ecg-speed").select_option("50")
    _redrawn(page, before)
    page.get_by_test_id("ecg-gain").select_option("20")
    _redrawn(page, before + 1)
    canvas = page.get_by_test_id("ecg-trace")
    width, height = page.evaluate(
        "(() => { const c = document.querySelector('[data-testid=ecg-trace]'); return [c.width, c.height]; })()"
    )
    total = -(-width // 512) * -(-height // 512)
    painted = int(canvas.get_attribute("data-tiles"))
    assert 0 < painted < total and canvas.get_attribute("data-complete") == "false"  # 2,000 px wide: not all in view
    g = _geometry(page)
    rhythm = _cell(g, "II", rhythm=True)
    end_x, row_y = rhythm["right"] - 20, (rhythm["top"] + rhythm["bottom"]) // 2
    assert _rgba(page, x=end_x, y=row_y, w=1, h=1)[0, 0, 3] == 0  # the strip's end: out of view, not drawn
    _show(page, dict(rhythm, left=rhythm["right"] - 400))  # the reader scrolls to the end of the strip
    assert _rgba(page, x=end_x, y=row_y, w=1, h=1)[0, 0, 3] == 255
    assert int(canvas.get_attribute("data-tiles")) > painted
    assert _check_trace(page, rhythm, g, signal[:, 1], 500.0) >= 0.97  # start and end, where the samples say


def test_calipers_between_two_r_peaks_read_the_rr_interval_and_march_it_out(
    page: Any, stack: Any, tmp_path: Path
) -> None:
    exam_id, signal = _synthetic(stack, tmp_path, "normal", seed=44)
    _open(page, exam_id)
    g = _geometry(page)
    rhythm = _cell(g, "II", rhythm=True)
    truth = synthetic_r_peaks(rhythm="normal", seconds=10.0, seed=44)
    box = page.get_by_test_id("ecg-trace").bounding_box()
    y = box["y"] + rhythm["y0"] - 10  # CSS px = device px at scale 1
    a, b = (box["x"] + rhythm["x0"] + t * g["px_per_s"] for t in truth[2:4])
    page.mouse.move(a, y)
    page.mouse.down()
    page.mouse.move((a + b) / 2, y, steps=4)
    page.mouse.move(b, y, steps=4)
    page.mouse.up()
    readout = page.get_by_test_id("caliper-readout")
    ms = float(readout.get_attribute("data-ms"))
    rr = (truth[3] - truth[2]) * 1000
    assert abs(ms - rr) <= 10, (ms, rr)
    assert f"{60000 / ms:.0f} bpm" in readout.inner_text()

    page.get_by_test_id("ecg-march").click()
    ticks = json.loads(page.get_by_test_id("ecg-overlay").first.get_attribute("data-ticks"))
    step = ms / 1000 * g["px_per_s"]
    steps = (np.array(ticks) - ticks[0]) / step  # whole multiples of the interval (the caliper's own two aside)
    assert (
        len(ticks) >= 6
        and np.all(np.abs(steps - np.round(steps)) * step <= 1.5)
        and np.min(np.diff(ticks)) >= step - 1.5
    )
    # the marched-out ticks fall on the other beats of this regular rhythm (within 2 mm)
    beats = rhythm["x0"] + truth * g["px_per_s"]
    assert sum(1 for t in ticks if np.min(np.abs(beats - t)) <= 2 * CALIBRATION) >= len(ticks) - 1

    page.keyboard.press("Alt+A")  # the amplitude caliper: from the baseline to the R peak
    i = int(round(truth[5] * 500))
    x = box["x"] + rhythm["x0"] + truth[5] * g["px_per_s"]
    page.mouse.move(x, box["y"] + rhythm["y0"])
    page.mouse.down()
    page.mouse.move(x, box["y"] + rhythm["y0"] - signal[i, 1] * g["px_per_mv"], steps=5)
    page.mouse.up()
    mv = float(readout.get_attribute("data-mv"))
    assert abs(mv - signal[i, 1]) <= 0.05 and "mV" in readout.inner_text()


def test_a_pause_is_marked_where_it_is_and_a_finding_takes_the_reader_there(
    page: Any, stack: Any, tmp_path: Path, artifacts: Path
) -> None:
    exam_id, _ = _synthetic(stack, tmp_path, "pause", seed=45, priority="stat")
    cardio = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))

    def measured() -> Any:  # triage's second pass: PR, QT and the axes arrive after the exam is queued
        ecg = cardio.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), timeout=10).exam.triage.ecg
        return ecg if ecg.HasField("pr_ms") else None

    wait_for(measured, timeout=30)
    _open(page, exam_id)
    g = _geometry(page)
    rhythm = _cell(g, "II", rhythm=True)
    truth = synthetic_r_peaks(rhythm="pause", seconds=10.0, seed=45)
    start, end = truth[3], truth[4]  # the 3.8 s sinus arrest, R to R
    rgb = _pixels(page, x=0, y=rhythm["top"] + 20, w=rhythm["right"], h=1)[0]
    shaded = (rgb[:, 0] - rgb[:, 2] > 60) & (rgb[:, 1] - rgb[:, 2] > 40)
    xs = np.nonzero(shaded)[0]
    assert xs.size
    band = ((xs.min() - rhythm["x0"]) / g["px_per_s"], (xs.max() - rhythm["x0"]) / g["px_per_s"])
    assert abs(band[0] - start) <= 0.04 and abs(band[1] - end) <= 0.04, (band, start, end)
    row = _pixels(page, x=0, y=_cell(g, "I", rhythm=False)["top"] + 20, w=rhythm["right"], h=1)[0]
    assert not ((row[:, 0] - row[:, 2] > 60) & (row[:, 1] - row[:, 2] > 40)).any()  # on the rhythm strip only

    header = page.get_by_test_id("ecg-measurements").inner_text()
    ecg = measured()
    assert ecg.HasField("qt_ms")
    for label, value in (("PR", ecg.pr_ms), ("QT", ecg.qt_ms), ("QTc B", ecg.qtc_bazett_ms)):
        assert f"{label}\n{math.floor(value + 0.5)} ms" in header, (label, header)  # the hub's, as measured
    assert f"{math.floor(ecg.qrs_axis_deg + 0.5)}°" in header

    page.locator("[data-testid=finding]", has_text="ause").first.click()
    viewer = page.get_by_test_id("viewer")
    assert "II" in viewer.get_attribute("data-flash").split()
    lead, t0, t1 = viewer.get_attribute("data-zoom").split()
    assert lead == "II" and float(t0) <= start <= end <= float(t1)
    zoom = _geometry(page, "ecg-zoom")
    zrgb = _pixels(page, x=0, y=10, w=zoom["cells"][0]["right"], h=1, testid="ecg-zoom")[0]
    zs = np.nonzero((zrgb[:, 0] - zrgb[:, 2] > 60) & (zrgb[:, 1] - zrgb[:, 2] > 40))[0]
    assert abs(float(t0) + zs.min() / zoom["px_per_s"] - start) <= 0.02  # the zoom shows it magnified

    _show(page, {"left": 0, "top": 0})  # the sheet from its start (pulses and lead names), for the picture
    box = page.get_by_test_id("ecg-trace").bounding_box()  # calipers on the pause, for the picture
    y = box["y"] + rhythm["y0"] - 20
    page.mouse.move(box["x"] + rhythm["x0"] + start * g["px_per_s"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + rhythm["x0"] + end * g["px_per_s"], y, steps=6)
    page.mouse.up()
    ms = float(page.get_by_test_id("caliper-readout").get_attribute("data-ms"))
    assert abs(ms - (end - start) * 1000) <= 10
    page.screenshot(path=str(artifacts / "station-ecg.png"), full_page=True)


def test_st_elevation_leads_are_outlined_with_their_value(page: Any, stack: Any, tmp_path: Path) -> None:
    exam_id, _ = _synthetic(stack, tmp_path, "stemi", seed=46)
    _open(page, exam_id)
    g = _geometry(page)
    findings = page.get_by_test_id("findings").inner_text()
    assert "st_deviation_mv" in findings

    def outlined(lead: str) -> bool:
        cell = _cell(g, lead, rhythm=False)
        rgb = _pixels(page, x=cell["left"], y=(cell["top"] + cell["bottom"]) // 2, w=6, h=1)[0]
        return bool((np.abs(rgb - np.array([0xD9, 0x48, 0x0F])).sum(axis=1) <= 30).any())

    st_leads = {e.split("[")[1].split("]")[0] for e in findings.split("\n") if e.startswith("st_deviation_mv [")}
    assert st_leads
    for lead in ("V1", "V2", "V3", "V4", "V5", "V6", "I", "II"):
        assert outlined(lead) == (lead.upper() in {s.upper() for s in st_leads}), lead


def test_a_dicom_12_lead_and_a_2_lead_wfdb_record_are_drawn(page: Any, stack: Any, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from teleread.ecgio import load_ecg_dicom

    exam_id = _upload(stack, copy_testdata(tmp_path / "dcm", "waveform_ecg.dcm")[0].parent)
    truth = load_ecg_dicom(Path(get_testdata_file("waveform_ecg.dcm")))
    _open(page, exam_id)
    assert "DICOM" in page.get_by_test_id("ecg-status").inner_text()
    assert "1000" in page.get_by_test_id("ecg-status").inner_text()
    g = _geometry(page)
    assert len(g["cells"]) == 13
    ii = truth.lead_names.index("II")
    assert _check_trace(page, _cell(g, "II", rhythm=True), g, truth.signal_mv[:, ii], truth.fs) >= 0.95
    v5 = truth.lead_names.index("V5")
    assert _check_trace(page, _cell(g, "V5", rhythm=False), g, truth.signal_mv[:, v5], truth.fs) >= 0.95

    signal, _ = synthetic_ecg(rhythm="normal", fs=360, seconds=10.0, seed=47)
    write_wfdb_record(tmp_path / "two", "ecg-two-lead", signal[:, [1, 10]], 360, ["MLII", "V5"])
    two = _upload(stack, tmp_path / "two")
    page.get_by_test_id("back").click()
    page.get_by_test_id("worklist").wait_for()
    page.goto(f"/exam/{two}")
    page.locator("[data-testid=viewer][data-state=drawn]").wait_for(timeout=15_000)
    g2 = _geometry(page)
    assert [c["lead"] for c in g2["cells"]] == ["MLII", "V5"]
    assert page.get_by_test_id("ecg-layout").is_disabled()
    assert _check_trace(page, g2["cells"][1], g2, signal[:, 10], 360.0) >= 0.97


def test_the_prior_ecg_is_drawn_below_at_the_same_scale(page: Any, stack: Any, tmp_path: Path) -> None:
    from teleread.patient import PatientContext

    patient = PatientContext.of(id="ECG-PRIOR-1", name="PRIOR^TEST", sex="M")
    prior, prior_signal = _synthetic(stack, tmp_path, "brady", seed=48, patient=patient)
    exam_id, _ = _synthetic(stack, tmp_path, "normal", seed=49, patient=patient)
    _open(page, exam_id)
    assert page.get_by_test_id("ecg-prior").is_hidden()
    before = _draws(page)
    page.keyboard.press("Alt+K")
    _redrawn(page, before)
    assert page.get_by_test_id("viewer").get_attribute("data-prior") == prior
    main, other = _geometry(page), _geometry(page, "ecg-prior")
    assert (main["px_per_s"], main["px_per_mv"]) == (other["px_per_s"], other["px_per_mv"])
    cell = _cell(other, "II", rhythm=True)
    top, bottom = cell["top"], cell["bottom"]
    rgb = _pixels(page, x=cell["x0"], y=top, w=cell["right"] - cell["x0"], h=bottom - top, testid="ecg-prior")
    blue = (rgb[:, :, 2] > 110) & (rgb[:, :, 0] < 90)  # the prior is drawn in blue
    assert blue.sum() > 500
    page.keyboard.press("Alt+P")  # both follow the speed
    _redrawn(page, before + 1)
    assert _geometry(page, "ecg-prior")["px_per_s"] == 50 * CALIBRATION


def test_the_viewer_keys_switch_layout_speed_and_gain_and_are_listed(page: Any, stack: Any, tmp_path: Path) -> None:
    exam_id, _ = _synthetic(stack, tmp_path, "normal", seed=50)
    _open(page, exam_id)
    viewer = page.get_by_test_id("viewer")
    page.get_by_test_id("report-text").click()  # the keys work while the report is being typed
    for key, attribute, value in (("Alt+L", "data-layout", "12x1"), ("Alt+P", "data-speed", "50"),
                                  ("Alt+G", "data-gain", "20"), ("Alt+G", "data-gain", "5")):  # fmt: skip
        before = _draws(page)
        page.keyboard.press(key)
        _redrawn(page, before)
        assert viewer.get_attribute(attribute) == value
    assert len(_geometry(page)["cells"]) == 12 and page.get_by_test_id("report-text").input_value() == ""
    keys = page.get_by_test_id("ecg-keys").inner_text()
    for key in ("Alt+L", "Alt+P", "Alt+G", "Alt+T", "Alt+M"):
        assert key in keys


def test_the_one_time_calibration_sets_the_scale_and_is_kept_by_the_browser(
    browser: Any, station: StationServer, stack: Any, tmp_path: Path
) -> None:
    exam_id, _ = _synthetic(stack, tmp_path, "normal", seed=47)
    context = _context(browser, station, scale=2.0, calibration=None)  # never calibrated
    try:
        page = context.new_page()
        _open(page, exam_id)
        viewer = page.get_by_test_id("viewer")
        default = 96 / 25.4 * 2  # 96 dpi CSS pixels at a devicePixelRatio of 2
        assert float(viewer.get_attribute("data-mm-px")) == pytest.approx(default, abs=1e-3)
        page.get_by_test_id("ecg-calibrate").click()
        bar = page.get_by_test_id("ecg-card-bar")
        assert bar.bounding_box()["width"] == pytest.approx(85.6 * default / 2, abs=0.6)  # the card, at 96 dpi
        page.get_by_test_id("ecg-px-per-mm").fill("9.5")
        page.get_by_test_id("ecg-px-per-mm").dispatch_event("change")
        assert bar.bounding_box()["width"] == pytest.approx(85.6 * 9.5 / 2, abs=0.6)  # CSS px of 2 device px
        page.get_by_test_id("ecg-calibration-save").click()
        page.wait_for_function("document.querySelector('[data-testid=viewer]').dataset.mmPx === '9.5'")
        assert float(page.get_by_test_id("ecg-trace").get_attribute("data-px-per-s")) == pytest.approx(25 * 9.5)
        assert page.evaluate("localStorage.getItem('teleread.ecg.devicePxPerMm')") == "9.5"
        page.reload()  # kept by this browser: the next ECG is drawn at the reader's scale
        page.locator("[data-testid=viewer][data-state=drawn]").wait_for(timeout=15_000)
        assert float(page.get_by_test_id("viewer").get_attribute("data-mm-px")) == 9.5
    finally:
        context.close()
