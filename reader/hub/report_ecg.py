"""The ECG parts of the printed report: the measurements block, the statements list, and the
12-lead tracing drawn as vector paths on the standard grid at true scale.

:class:`Tracing` is a platypus flowable 260 x 160 mm (a landscape A4 page's width, less margins):
1 mm and 5 mm grid lines in the classic pink and red, rows 40 mm apart with their baselines on
major lines, a 1 mV calibration pulse (10 mm tall, 200 ms wide) opening each row, and the traces
at 25 mm/s and 10 mm/mV. A record with the 12 standard leads is drawn 3x4 (2.5 s a lead: I II III /
aVR aVL aVF / V1-V3 / V4-V6) with a 10 s lead II rhythm strip below; any other record is drawn
stacked, one row of 10 s for each lead it has. Everything is vector drawing (no bitmap): a trace is
one path, at most :data:`BINS_PER_S` bins a second, each bin its minimum and maximum in time order,
so no peak is lost and a record sampled faster than that adds nothing to the file.

The samples come from the exam's stored objects through :func:`decode_ecg` (``teleread.ecgio``, in
the worker process that lays the report out); a record that cannot be decoded is a
:class:`NoTracing` with the loader's reason, printed as a line saying so. Nothing here logs patient
data: a failure is logged with its reason only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from reportlab.lib import colors
from reportlab.lib.units import mm
from reportlab.platypus import Flowable

from teleread import ecgio
from teleread.errors import InvalidInput

log = logging.getLogger("teleread.report_ecg")

SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0
SECONDS = 10.0  # the length printed (the first 10 s of a longer record)
BINS_PER_S = 125  # 0.2 mm a bin at 25 mm/s; two points (min, max) a bin: 250 points a second
UNIT_MM = 0.02  # a trace's coordinates are whole multiples of this (1/1270 inch), so they pack well
GRID_WIDTH_MM = 260.0  # 10 mm for the calibration pulse, then 10 s at 25 mm/s
GRID_HEIGHT_MM = 160.0
TRACE_START_MM = 10.0  # where the traces begin, from the grid's left edge
ROW_MM = 40.0  # rows of the 3x4 layout and the rhythm strip
MINOR_RED = colors.HexColor("#F6C4C4")
MAJOR_RED = colors.HexColor("#E46E6E")
MINOR_WIDTH_MM = 0.1
MAJOR_WIDTH_MM = 0.25
TRACE_WIDTH_MM = 0.25
STANDARD_COLUMNS = (("I", "II", "III"), ("aVR", "aVL", "aVF"), ("V1", "V2", "V3"), ("V4", "V5", "V6"))
RHYTHM_LEAD = "II"
MEASUREMENTS = (  # (label, on the tracing page's head, the EcgSummary values' key(s), unit)
    ("Rate 心率", "Rate", ("heart_rate_bpm",), "bpm"),
    ("RR", "RR", ("rr_ms",), "ms"),
    ("PR", "PR", ("pr_ms",), "ms"),
    ("QRS", "QRS", ("qrs_ms",), "ms"),
    ("QT", "QT", ("qt_ms",), "ms"),
    ("QTc Bazett", "QTc Bazett", ("qtc_bazett_ms",), "ms"),
    ("QTc Fridericia", "QTc Fridericia", ("qtc_fridericia_ms",), "ms"),
    ("Axes 电轴", "Axes", ("p_axis_deg", "qrs_axis_deg", "t_axis_deg"), "°"),
)
DASH = "\u2014"


@dataclass(frozen=True)
class EcgFiles:
    """An ECG exam's stored objects, copied out for decoding: WFDB (header, signal) or one DICOM."""

    paths: tuple[Path, ...]
    source: str  # "wfdb" or "dicom"


@dataclass(frozen=True)
class NoTracing:
    """Why an ECG exam's tracing is not printed (a typed reason, never the loader's text)."""

    reason: str


def decode_ecg(files: EcgFiles, *, exam_id: str = "") -> ecgio.EcgSignal | NoTracing:
    """The exam's ECG in mV, or why it cannot be drawn (logged with the exam id and the reason)."""
    try:
        if files.source == "wfdb":
            return ecgio.load_ecg_wfdb(files.paths[0], files.paths[1])
        return ecgio.load_ecg_dicom(files.paths[0])
    except InvalidInput as exc:
        log.warning("ECG tracing not drawn", extra={"exam_id": exam_id, "reason": exc.reason})
        return NoTracing(exc.reason)


# ---- the measurements block ----------------------------------------------------------------------
def measurement_pairs(values: Mapping[str, float] | None, *, short: bool = False) -> list[tuple[str, str]]:
    """(label, printed value) for rate, RR, PR, QRS, QT, both QTc and the axes; "—" where absent;
    ``short``: the labels without their Chinese (the tracing page's head)."""
    values = values or {}

    def one(key: str) -> str:
        value = values.get(key)
        return DASH if value is None or not np.isfinite(value) else f"{value:.0f}"

    pairs = []
    for label, brief, keys, unit in MEASUREMENTS:
        printed = [one(k) for k in keys]
        if unit == "°":  # P 60° / QRS 45° / T —
            text = " / ".join(f"{wave} {p if p == DASH else p + unit}" for wave, p in zip(("P", "QRS", "T"), printed))
        else:
            text = printed[0] if printed[0] == DASH else f"{printed[0]} {unit}"
        pairs.append((brief if short else label, text))
    return pairs


def measurement_line(values: Mapping[str, float] | None) -> str:
    """The measurements on one line, for the tracing page's head."""
    return "   ".join(f"{label} {text}" for label, text in measurement_pairs(values, short=True))


def statement_lines(statements: Sequence[tuple[str, str]] | None) -> list[str]:
    """Statements (code, text) as printed lines: the text, the code after it in brackets."""
    return [f"{text} [{code}]" if code else text for code, text in statements or ()]


# ---- the tracing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Strip:
    lead: str
    column: int  # where in the row it starts (0-3 for the 3x4 layout)
    start_s: float  # which part of the record
    seconds: float


def is_standard(lead_names: Sequence[str]) -> bool:
    """Whether a record has the 12 standard leads (drawn 3x4 with a rhythm strip)."""
    return all(lead in lead_names for column in STANDARD_COLUMNS for lead in column)


def layout(lead_names: Sequence[str]) -> list[list[_Strip]]:
    """The rows to draw: 3x4 and the lead II rhythm strip for the 12 standard leads, else the
    leads there are, one 10 s row each."""
    if is_standard(lead_names):
        rows = [
            [_Strip(column[r], c, c * SECONDS / 4, SECONDS / 4) for c, column in enumerate(STANDARD_COLUMNS)]
            for r in range(3)
        ]
        return [*rows, [_Strip(RHYTHM_LEAD, 0, 0.0, SECONDS)]]
    return [[_Strip(lead, 0, 0.0, SECONDS)] for lead in lead_names]


def decimated(samples: npt.NDArray[np.float32], fs: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(time s, mV) of a trace with at most ``BINS_PER_S`` bins a second, each its minimum and its
    maximum in the order they occur (a record at or under the bin rate is kept as it is)."""
    times = np.arange(samples.size, dtype=np.float64) / fs
    values = samples.astype(np.float64)
    per_bin = int(fs // BINS_PER_S)
    if per_bin < 2 or samples.size < 2 * per_bin:
        return times, values
    n = samples.size // per_bin * per_bin
    binned = values[:n].reshape(-1, per_bin)
    lo, hi = binned.argmin(axis=1), binned.argmax(axis=1)
    first, second = np.minimum(lo, hi), np.maximum(lo, hi)
    rows = np.arange(binned.shape[0])
    index = np.stack([rows * per_bin + first, rows * per_bin + second], axis=1).ravel()
    index = np.concatenate([index, np.arange(n, samples.size)])
    return times[index], values[index]


class Tracing(Flowable):  # type: ignore[misc] # reportlab is untyped
    """The ECG on its grid, drawn at true scale (see the module's docstring)."""

    def __init__(self, signal: ecgio.EcgSignal, *, font: str) -> None:
        super().__init__()
        self.signal = signal
        self.font = font
        self.rows = layout(signal.lead_names)
        self.row_mm = min(ROW_MM, GRID_HEIGHT_MM / max(len(self.rows), 1))
        self.width, self.height = GRID_WIDTH_MM * mm, GRID_HEIGHT_MM * mm

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        return self.width, self.height

    def baseline_mm(self, row: int) -> float:
        """A row's baseline, mm above the grid's bottom edge (on a major line)."""
        centre = GRID_HEIGHT_MM - self.row_mm * (row + 0.5)
        return round(centre / 5.0) * 5.0 if self.row_mm >= 10 else centre

    def draw(self) -> None:
        canvas = self.canv
        canvas.saveState()
        self._grid(canvas)
        clip = canvas.beginPath()
        clip.rect(0, 0, self.width, self.height)
        canvas.clipPath(clip, stroke=0, fill=0)
        canvas.setStrokeColor(colors.black)
        canvas.setLineWidth(TRACE_WIDTH_MM * mm)
        canvas.setLineJoin(1)
        canvas.setLineCap(1)
        for r, strips in enumerate(self.rows):
            self._row(canvas, strips, self.baseline_mm(r) * mm)
        canvas.restoreState()

    def _grid(self, canvas: Any) -> None:
        for step, colour, width in ((1, MINOR_RED, MINOR_WIDTH_MM), (5, MAJOR_RED, MAJOR_WIDTH_MM)):
            canvas.setStrokeColor(colour)
            canvas.setLineWidth(width * mm)
            path = canvas.beginPath()
            for x in range(0, int(GRID_WIDTH_MM) + 1, step):
                if step == 1 and x % 5 == 0:
                    continue
                path.moveTo(x * mm, 0)
                path.lineTo(x * mm, self.height)
            for y in range(0, int(GRID_HEIGHT_MM) + 1, step):
                if step == 1 and y % 5 == 0:
                    continue
                path.moveTo(0, y * mm)
                path.lineTo(self.width, y * mm)
            canvas.drawPath(path, stroke=1, fill=0)

    def _row(self, canvas: Any, strips: list[_Strip], baseline: float) -> None:
        pulse = canvas.beginPath()  # 1 mV for 200 ms, from the baseline
        pulse.moveTo(0.5 * mm, baseline)
        for x, y in ((2.5, 0.0), (2.5, GAIN_MM_MV), (7.5, GAIN_MM_MV), (7.5, 0.0), (TRACE_START_MM, 0.0)):
            pulse.lineTo(x * mm, baseline + y * mm)
        canvas.drawPath(pulse, stroke=1, fill=0)
        canvas.setFont(self.font, 7)
        fs = self.signal.fs
        for strip in strips:
            left = (TRACE_START_MM + strip.column * SECONDS / 4 * SPEED_MM_S) * mm
            label_x = 0.5 * mm if strip.column == 0 else left + 1 * mm
            canvas.drawString(label_x, baseline + (GAIN_MM_MV + 1.5) * mm, strip.lead)
            if strip.column:  # a short mark where the lead changes
                canvas.line(left, baseline - 2 * mm, left, baseline + 2 * mm)
            lead = self.signal.lead_names.index(strip.lead)
            first = int(round(strip.start_s * fs))
            last = min(int(round((strip.start_s + strip.seconds) * fs)) + 1, self.signal.signal_mv.shape[0])
            if last - first < 2:
                continue
            times, mv = decimated(self.signal.signal_mv[first:last, lead], fs)
            finite = np.isfinite(mv)  # a gap in the samples is bridged, never drawn as "nan"
            if finite.sum() < 2:
                continue
            xs = left + times[finite] * SPEED_MM_S * mm
            ys = baseline + np.clip(mv[finite], -100.0, 100.0) * GAIN_MM_MV * mm
            canvas.addLiteral(_path_operators(xs, ys))


def _path_operators(xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> str:
    """One stroked open path through the points (in points), as PDF operators: drawn in a
    coordinate system of :data:`UNIT_MM` units, so each point is two short whole numbers (a
    reportlab path object per point would cost ten times the time and twice the bytes)."""
    unit = UNIT_MM * mm
    points = np.rint(np.stack([xs, ys], axis=1) / unit).astype(np.int64)
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)  # a repeated point draws nothing
    points = points[keep]
    body = " l\n".join(f"{x} {y}" for x, y in points[1:].tolist())
    x0, y0 = points[0].tolist()
    width = TRACE_WIDTH_MM / UNIT_MM
    return f"q {unit:.5f} 0 0 {unit:.5f} 0 0 cm {width:g} w\n{x0} {y0} m\n{body} l\nS Q"


def scale_line(signal: ecgio.EcgSignal) -> str:
    """What the tracing page says of its scale and the record."""
    leads = "12-lead" if is_standard(signal.lead_names) else f"{len(signal.lead_names)}-lead"
    seconds = min(signal.signal_mv.shape[0] / signal.fs, SECONDS)
    return (
        f"{SPEED_MM_S:.0f} mm/s   {GAIN_MM_MV:.0f} mm/mV   {leads}, {signal.fs:g} Hz, {seconds:.1f} s shown   "
        "grid 1 mm / 5 mm"
    )
