"""The ECG tracing page of the hub's printed report, read back from poppler's pixels: a synthetic
12-lead WFDB record and pydicom's DICOM ECG are drawn on 5 mm major grid lines, each row opens with
a 1 mV pulse 10 mm tall, and lead II's rhythm strip puts every R peak at 25 mm/s and 10 mm/mV from
where the samples say; the page is vector drawing (no image), the measurements and statements are
printed, a record with fewer leads is stacked, an imaging report has no tracing page, an ECG that
cannot be decoded prints a note instead, and the file's size and render time stay small."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pypdf
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from helpers import write_synthetic_wfdb
from teleread import ecgio
from teleread.models.inference.synthetic import synthetic_ecg, synthetic_r_peaks, write_wfdb_record
from teleread.reader.hub import report_ecg
from teleread.reader.hub.report_ecg import EcgFiles
from teleread.reader.hub.report_pdf import render_report, report_pdf_bytes
from test_report_pdf_render import printed

pytestmark = pytest.mark.timeout(120)
DPI = 200
PX_PER_MM = DPI / 25.4
SPEED, GAIN = 25.0, 10.0  # mm/s and mm/mV: the standard, not the module's constants
MEASURED = {
    "heart_rate_bpm": 61.1, "rr_ms": 980.0, "pr_ms": 196.0, "qrs_ms": 68.0, "qt_ms": 356.0,
    "qtc_bazett_ms": 359.6, "qtc_fridericia_ms": 358.4, "p_axis_deg": 75.0, "qrs_axis_deg": 40.1,
}  # fmt: skip


def synthetic(folder: Path) -> EcgFiles:
    header, signal = write_synthetic_wfdb(folder, rhythm="normal", seed=3)
    return EcgFiles((header, signal), "wfdb")


def dicom_ecg() -> EcgFiles:
    return EcgFiles((Path(str(get_testdata_file("waveform_ecg.dcm"))),), "dicom")


def pages(data: bytes) -> list[pypdf.PageObject]:
    return list(pypdf.PdfReader(io.BytesIO(data)).pages)


def flat(page: pypdf.PageObject) -> str:
    return " ".join(page.extract_text().split())


def raster(data: bytes, folder: Path, page: int) -> np.ndarray:
    """Page ``page`` in RGB at :data:`DPI`, by poppler."""
    assert shutil.which("pdftoppm"), "poppler-utils is installed by scripts/test.sh and .ci/run"
    pdf = folder / "report.pdf"
    pdf.write_bytes(data)
    prefix = folder / f"page-{page}"
    subprocess.run(
        ["pdftoppm", "-r", str(DPI), "-f", str(page), "-l", str(page), "-png", "-singlefile", str(pdf), str(prefix)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return np.asarray(Image.open(prefix.with_suffix(".png")).convert("RGB"), dtype=np.int16)


def _lines(fraction: np.ndarray) -> list[float]:
    """Centres of the runs of pixels where a grid line crosses (a quarter of its length red or
    more: the traces cross the baselines)."""
    hits = np.flatnonzero(fraction > 0.25)
    runs = np.split(hits, np.flatnonzero(np.diff(hits) > 1) + 1)
    return [float(run.mean()) for run in runs if run.size]


class Sheet:
    """The tracing page's pixels: its major grid lines, the ink, the rows."""

    def __init__(self, image: np.ndarray) -> None:
        r, g, b = image[..., 0], image[..., 1], image[..., 2]
        major = (r > 190) & (g > 60) & (g < 150) & (b < 150)
        self.ink = (r < 100) & (g < 100) & (b < 100)
        rows, cols = np.flatnonzero(major.mean(axis=1) > 0.3), np.flatnonzero(major.mean(axis=0) > 0.3)
        box = major[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        self.verticals = [cols[0] + x for x in _lines(box.mean(axis=0))]
        self.horizontals = [rows[0] + y for y in _lines(box.mean(axis=1))]
        self.left, self.bottom = self.verticals[0], self.horizontals[-1]

    def x(self, mm_from_left: float) -> int:
        return round(self.left + mm_from_left * PX_PER_MM)

    def y(self, mm_above_bottom: float) -> int:
        return round(self.bottom - mm_above_bottom * PX_PER_MM)

    def ink_rows(self, x0_mm: float, x1_mm: float, y0_mm: float, y1_mm: float) -> np.ndarray:
        """Rows (pixels) with ink between two distances from the grid's left edge and two heights."""
        block = self.ink[self.y(y1_mm) : self.y(y0_mm), self.x(x0_mm) : self.x(x1_mm)]
        return self.y(y1_mm) + np.flatnonzero(block.any(axis=1))

    def peaks(self, baseline_mm: float, *, above_mm: float) -> list[tuple[float, float]]:
        """(x mm from the trace's start, height mm above the baseline) of each excursion of the row's
        trace higher than ``above_mm``: the top of the ink in each column, its highest column."""
        start = self.x(report_ecg.TRACE_START_MM)
        top, base = self.y(baseline_mm + 19), self.y(baseline_mm)
        band = self.ink[top : self.y(baseline_mm - 19), start : self.x(report_ecg.GRID_WIDTH_MM)]
        has = band.any(axis=0)
        heights = np.where(has, (base - top - band.argmax(axis=0)) / PX_PER_MM, -np.inf)
        high = np.flatnonzero(heights > above_mm)
        out = []
        for run in np.split(high, np.flatnonzero(np.diff(high) > PX_PER_MM) + 1):
            if run.size:
                best = run[np.argmax(heights[run])]
                out.append((best / PX_PER_MM, float(heights[best])))
        return out


def rhythm_baseline() -> float:
    return 160.0 - 40.0 * 3.5  # the fourth row's centre, on a major line (``Tracing.baseline_mm``)


def sample_peaks(signal: ecgio.EcgSignal) -> list[tuple[float, float]]:
    """(time s, mV) of lead II's R peaks from its samples: the highest sample of each run above
    60 % of the lead's maximum."""
    lead = signal.signal_mv[: int(10 * signal.fs), signal.lead_names.index("II")].astype(float)
    high = np.flatnonzero(lead > 0.6 * lead.max())
    out = []
    for run in np.split(high, np.flatnonzero(np.diff(high) > 0.1 * signal.fs) + 1):
        best = run[np.argmax(lead[run])]
        out.append((best / signal.fs, float(lead[best])))
    return out


def check_grid_and_pulse(sheet: Sheet) -> None:
    five = 5 * PX_PER_MM
    for lines, count in ((sheet.verticals, 53), (sheet.horizontals, 33)):  # 260 x 160 mm
        assert len(lines) == count, lines
        gaps = np.diff(lines)
        assert np.all(np.abs(gaps - five) < 1.5), gaps  # one pixel of rounding each side
        assert abs((lines[-1] - lines[0]) / (count - 1) - five) < 0.1
    for row in range(4):  # a 1 mV pulse opens every row: 10 mm from its baseline to its top
        baseline_mm = rhythm_baseline() + 40 * (3 - row)
        base = sheet.ink_rows(1.0, 2.0, baseline_mm - 3, baseline_mm + 3)
        top = sheet.ink_rows(3.5, 6.5, baseline_mm + 5, baseline_mm + 15)
        assert base.size and top.size, row
        height_mm = (base.mean() - top.mean()) / PX_PER_MM
        assert abs(height_mm - GAIN) < 0.25, (row, height_mm)


def check_rhythm_strip(sheet: Sheet, expected: list[tuple[float, float]]) -> None:
    """Each R peak of the rhythm strip at 25 mm/s from the strip's start, 10 mm/mV high, within 1 mm."""
    drawn = sheet.peaks(rhythm_baseline(), above_mm=0.75 * min(mv for _, mv in expected) * 10)
    assert len(drawn) == len(expected), (drawn, expected)
    for (x_mm, height_mm), (t, mv) in zip(drawn, expected):
        assert abs(x_mm - t * SPEED) < 1.0, (x_mm, t)
        assert abs(height_mm - mv * GAIN) < 1.0, (height_mm, mv)


def no_images(page: pypdf.PageObject) -> None:
    resources = page["/Resources"].get_object()
    xobjects = resources.get("/XObject")
    found = [] if xobjects is None else [x.get_object()["/Subtype"] for x in xobjects.get_object().values()]
    assert "/Image" not in found


def test_a_synthetic_12_lead_ecg_is_drawn_at_true_scale(tmp_path: Path) -> None:
    data = render_report(printed(), ecg=synthetic(tmp_path), measurements=MEASURED)
    first, sheet_page = pages(data)
    assert sheet_page.mediabox.width > sheet_page.mediabox.height  # A4 landscape
    assert round(float(sheet_page.mediabox.width) / 72 * 25.4) == 297
    no_images(sheet_page)
    no_images(first)
    sheet = Sheet(raster(data, tmp_path, 2))
    check_grid_and_pulse(sheet)
    truth = synthetic_r_peaks(rhythm="normal", seconds=10.0, seed=3)
    samples = sample_peaks(ecgio.load_ecg_wfdb(*synthetic(tmp_path).paths))
    assert len(samples) == len(truth) and np.allclose([t for t, _ in samples], truth, atol=0.01)
    check_rhythm_strip(sheet, samples)
    text = flat(sheet_page)
    assert "25 mm/s 10 mm/mV 12-lead, 500 Hz, 10.0 s shown" in text and "QTc Fridericia 358 ms" in text
    for lead in ("aVR", "aVL", "aVF", "V1", "V6"):
        assert lead in text


def test_pydicoms_dicom_ecg_is_drawn_where_its_samples_say(tmp_path: Path) -> None:
    files = dicom_ecg()
    data = render_report(printed(), ecg=files)
    assert len(pages(data)) == 2
    no_images(pages(data)[1])
    sheet = Sheet(raster(data, tmp_path, 2))
    check_grid_and_pulse(sheet)
    check_rhythm_strip(sheet, sample_peaks(ecgio.load_ecg_dicom(files.paths[0])))


def test_the_measurements_block_and_the_statements(tmp_path: Path) -> None:
    statements = [("SR", "Sinus rhythm 窦性心律"), ("", "Normal ECG")]
    data = render_report(printed(), ecg=synthetic(tmp_path), measurements=MEASURED, statements=statements)
    text = flat(pages(data)[0])
    for expected in (
        "ECG measurements 心电图测量", "Rate 心率 61 bpm", "RR 980 ms", "PR 196 ms", "QRS 68 ms", "QT 356 ms",
        "QTc Bazett 360 ms", "QTc Fridericia 358 ms", "Axes 电轴 P 75° / QRS 40° / T —",
        "Statements 心电图诊断", "Sinus rhythm 窦性心律 [SR]", "Normal ECG",
    ):  # fmt: skip
        assert expected in text, expected
    bare = flat(pages(render_report(printed(), ecg=synthetic(tmp_path)))[0])  # nothing measured: dashes
    assert "Rate 心率 — RR — PR —" in bare and "QTc Fridericia — Axes 电轴 P — / QRS — / T —" in bare
    assert "Statements" not in bare


def test_a_record_with_fewer_leads_is_stacked(tmp_path: Path) -> None:
    signal, leads = synthetic_ecg(rhythm="normal", fs=250, seconds=10.0, seed=2)
    keep = [leads.index("II"), leads.index("V5")]
    header, dat = write_wfdb_record(tmp_path, "two", signal[:, keep], 250, ["II", "V5"])
    data = render_report(printed(), ecg=EcgFiles((header, dat), "wfdb"))
    assert "2-lead, 250 Hz" in flat(pages(data)[1])
    sheet = Sheet(raster(data, tmp_path, 2))
    truth = synthetic_r_peaks(rhythm="normal", seconds=10.0, seed=2)
    tracing = report_ecg.Tracing(ecgio.load_ecg_wfdb(header, dat), font="Helvetica")
    assert [tracing.baseline_mm(row) for row in range(2)] == [140.0, 100.0]  # from the top, 40 mm apart
    for baseline_mm in (140.0, 100.0):  # one 10 s row each
        drawn = sheet.peaks(baseline_mm, above_mm=7)
        assert len(drawn) == len(truth)
        assert np.all(np.abs(np.array([x for x, _ in drawn]) - truth * SPEED) < 1.0)


def test_an_imaging_report_has_no_tracing_page() -> None:
    data = render_report(printed(kind="imaging", modality="CR", specialty="radiology"), ecg=None)
    (page,) = pages(data)
    assert "ECG measurements" not in flat(page) and "page 1 of 1" in flat(page)


def test_an_ecg_that_cannot_be_decoded_prints_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_waveform = EcgFiles((Path(str(get_testdata_file("CT_small.dcm"))),), "dicom")
    with caplog.at_level(logging.INFO):
        data = render_report(printed(), ecg=not_a_waveform, measurements=MEASURED)
    (page,) = pages(data)
    text = flat(page)
    assert "The ECG tracing could not be drawn (" in text and "心电图波形无法绘制" in text
    assert "QT 356 ms" in text  # the measurements are still printed
    (warning,) = [r for r in caplog.records if r.name == "teleread.report_ecg"]
    assert warning.levelno == logging.WARNING and vars(warning)["reason"].startswith("ECG_")
    logged = " ".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "MRN-0042" not in logged and "Zhang" not in logged and "张" not in logged
    truncated = tmp_path / "short.dat"  # a WFDB signal shorter than its header says
    header, dat = synthetic(tmp_path).paths
    truncated.write_bytes(dat.read_bytes()[:100])
    assert "could not be drawn" in flat(pages(render_report(printed(), ecg=EcgFiles((header, truncated), "wfdb")))[0])


def test_the_tracing_is_small_quick_and_the_same_every_time(tmp_path: Path) -> None:
    files = synthetic(tmp_path)
    first = render_report(printed(), ecg=files, measurements=MEASURED)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        assert render_report(printed(), ecg=files, measurements=MEASURED) == first
        timings.append(time.perf_counter() - started)
    plain = render_report(replace(printed(), kind="imaging"))
    assert len(first) - len(plain) < 80_000, len(first)  # about 50 KB for the tracing page
    assert sorted(timings)[2] < 0.4, timings  # the median: about 50 ms here, decoding included


def test_a_gap_in_the_samples_is_bridged_not_printed_as_nan(tmp_path: Path) -> None:
    signal, leads = synthetic_ecg(rhythm="normal", fs=500, seconds=10.0, seed=4)
    signal = signal.astype(np.float32)
    signal[1000:1200, :] = np.nan
    ecg = ecgio.EcgSignal(signal_mv=signal, fs=500.0, lead_names=leads)
    data = report_pdf_bytes(printed(), tracing=ecg)
    content = pages(data)[1]["/Contents"].get_object().get_data()
    assert b"nan" not in content.lower() and b"inf" not in content.lower()
    traces = b"".join(re.findall(rb" cm [\d.]+ w\n(.*?)S Q", content, flags=re.DOTALL))
    numbers = [abs(float(n)) for n in re.findall(rb"-?\d+(?:\.\d+)?", traces)]
    assert len(numbers) > 10_000
    assert max(numbers) < 1e5  # no sample turned into a huge coordinate
    Sheet(raster(data, tmp_path, 2))  # poppler draws it
