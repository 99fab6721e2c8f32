"""PR and QT (with Bazett's and Fridericia's QTc) and the frontal P, QRS and T axes of an ECG.

The P wave's onset and the T wave's end are found by neurokit2's delineation (``ecg_delineate``,
its wavelet method) on the rhythm lead, V2 and V5, beat by beat, at the R peaks the hub already
found; each lead's is kept as its median distance from R (one ectopic beat or a noisy T changes
nothing), and the earliest P onset and latest T end of the three count. Only the six beats in the
middle of the record are delineated (the cost grows faster than the length).
The QRS onset and offset are the median beat's (``ecg_measure``: the earliest onset and latest
offset over all leads), so PR runs from the P onset to the QRS onset of the median beat and QT from
the QRS onset to the T end. The axes are the directions, in the frontal plane, of the median beat's
net areas in leads I and aVF over the P wave, the QRS and the T wave (aVF from II and III, or II and
I, when a record has no aVF).

Every value is left out, not guessed, when the delineation finds no P (atrial fibrillation, a
junctional rhythm), no T end, or a value outside what a human ECG can have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger("teleread.models.inference.ecg_intervals")

METHOD = "neurokit2 delineation (P onset, T end) on the rhythm lead, V2 and V5; QRS and axes on the median beat"
# Plausible ranges; a value outside is a failed delineation, not a measurement.
PR_MS = (60.0, 400.0)
QT_MS = (200.0, 700.0)
_MIN_BEATS = 3  # fewest delineated beats a median is taken over
# A P wave belongs to the QRS when its onset keeps its distance from R beat after beat; in atrial
# fibrillation the "P onsets" found in the fibrillation waves scatter (interquartile range, ms).
P_SPREAD_MS = 24.0
# neurokit2's methods for the P onset and the T end (compared on LUDB: bench/ecg_intervals.py)
P_METHOD = "dwt"
T_METHOD = "dwt"
MAX_BEATS = 6
# Delineated besides the rhythm lead: the global P onset and T end are the earliest and latest of these.
DELINEATED_LEADS = ("V2", "V5")


def _neurokit() -> Any:
    import neurokit2  # it imports matplotlib, which picks its headless backend here

    return neurokit2


def warm_up() -> None:
    """Import neurokit2 (about 2 s) before the first ECG needs it."""
    _neurokit()


def wave_bounds(leads: Sequence[np.ndarray], peaks: np.ndarray, fs: int) -> tuple[float | None, float | None]:
    """Samples from the earliest P onset to R and from R to the latest T end over ``leads``, each
    lead's the median over its delineated beats (the global P onset and T end of a 12-lead program)."""
    if peaks.size < _MIN_BEATS:
        return None, None
    nk = _neurokit()
    spread = P_SPREAD_MS * fs / 1000.0
    start, stop, peaks = _segment(peaks, n_samples=len(leads[0]), fs=fs)
    p_to_r: list[float] = []
    r_to_t: list[float] = []
    for whole in leads:
        lead = whole[start:stop]
        found = {}
        for method in {P_METHOD, T_METHOD}:
            try:
                _, found[method] = nk.ecg_delineate(lead, rpeaks=peaks, sampling_rate=fs, method=method)
            except Exception:  # neurokit2 raises bare exceptions on signals it cannot delineate
                log.info("ECG delineation failed", extra={"reason": "ECG_DELINEATION_FAILED"})
                found[method] = {}
        p = _median_from_r(found[P_METHOD].get("ECG_P_Onsets"), peaks, -1, max_spread=spread)
        t = _median_from_r(found[T_METHOD].get("ECG_T_Offsets"), peaks, 1)
        if p is not None:
            p_to_r.append(p)
        if t is not None and t * 1000.0 / fs <= QT_MS[1]:
            r_to_t.append(t)
    return (max(p_to_r) if p_to_r else None), (max(r_to_t) if r_to_t else None)


def _segment(peaks: np.ndarray, *, n_samples: int, fs: int) -> tuple[int, int, np.ndarray]:
    """The stretch delineated: the record's middle MAX_BEATS beats (at most, and those at least
    0.4 s from its ends), from 0.4 s before the first to 0.6 s after the last, and their R peaks
    counted from its start. The delineation's cost grows faster than the signal's length; the
    median over a few beats is as good as over all of them."""
    inside = peaks[(peaks >= int(0.4 * fs)) & (peaks < n_samples - int(0.6 * fs))]
    if inside.size > MAX_BEATS:
        first = (inside.size - MAX_BEATS) // 2
        inside = inside[first : first + MAX_BEATS]
    if inside.size == 0:
        return 0, n_samples, inside
    start, stop = int(inside[0] - 0.4 * fs), int(inside[-1] + 0.6 * fs)
    return start, stop, inside - start


def _median_from_r(
    points: Sequence[float] | None, peaks: np.ndarray, sign: int, *, max_spread: float = math.inf
) -> float | None:
    if points is None or len(points) != peaks.size:
        return None
    distance = sign * (np.asarray(points, dtype=float) - peaks)
    distance = distance[np.isfinite(distance) & (distance > 0)]
    if distance.size < _MIN_BEATS:
        return None
    q1, q3 = np.percentile(distance, [25, 75])
    return float(np.median(distance)) if q3 - q1 <= max_spread else None


def intervals(
    *,
    median_beat: np.ndarray,
    r_idx: int,
    qrs: tuple[float, float],
    p_onset_to_r: float | None,
    r_to_t_end: float | None,
    rr_s: float,
    names: Sequence[str],
    fs: int,
) -> dict[str, float]:
    """PR, QT, QTc and the axes in ms and degrees; what could not be measured is left out."""
    onset, offset = qrs
    ms = 1000.0 / fs
    out: dict[str, float] = {}
    p_on = None if p_onset_to_r is None else r_idx - p_onset_to_r
    t_end = None if r_to_t_end is None else r_idx + r_to_t_end
    if p_on is not None and PR_MS[0] <= (onset - p_on) * ms <= PR_MS[1]:
        out["pr_ms"] = (onset - p_on) * ms
    else:
        p_on = None
    if t_end is not None and QT_MS[0] <= (t_end - onset) * ms <= QT_MS[1]:
        qt = (t_end - onset) * ms
        out["qt_ms"] = qt
        if rr_s > 0:
            out["qtc_bazett_ms"] = qt / math.sqrt(rr_s)
            out["qtc_fridericia_ms"] = qt / rr_s ** (1.0 / 3.0)
    else:
        t_end = None
    frontal = _frontal_leads(median_beat, names)
    if frontal is None:
        return out
    baseline = _baseline(frontal, onset=onset, p_on=p_on, fs=fs)
    limbs = frontal - baseline
    axes = {"qrs_axis_deg": _axis(limbs, onset, offset)}
    if p_on is not None:
        axes["p_axis_deg"] = _axis(limbs, p_on, onset - 0.01 * fs)
    if t_end is not None:
        axes["t_axis_deg"] = _axis(limbs, offset + 0.04 * fs, t_end)
    out.update({k: v for k, v in axes.items() if math.isfinite(v)})
    return out


def _frontal_leads(beat: np.ndarray, names: Sequence[str]) -> np.ndarray | None:
    """The median beat's leads I and aVF as (samples, 2), derived by Einthoven's law if need be."""
    index = {n: i for i, n in enumerate(names)}
    lead = {n: beat[:, i] for n, i in index.items()}
    one = lead.get("I")
    if one is None and "II" in lead and "III" in lead:
        one = lead["II"] - lead["III"]
    avf = lead.get("aVF")
    if avf is None and "II" in lead and "III" in lead:
        avf = (lead["II"] + lead["III"]) / 2.0
    if avf is None and "II" in lead and one is not None:
        avf = lead["II"] - one / 2.0
    if one is None or avf is None:
        return None
    return np.stack([one, avf], axis=1)


def _baseline(limbs: np.ndarray, *, onset: float, p_on: float | None, fs: int) -> np.ndarray:
    """The isoelectric level: before the P wave when it is known, else just before the QRS."""
    end = int(p_on if p_on is not None else onset - 0.01 * fs)
    start = max(0, end - int(0.03 * fs))
    end = max(start + 1, end)
    return np.asarray(limbs[start:end].mean(axis=0))


def _axis(limbs: np.ndarray, start: float, stop: float) -> float:
    lo, hi = max(0, int(round(start))), min(limbs.shape[0], int(round(stop)) + 1)
    if hi - lo < 2:
        return math.nan
    area = limbs[lo:hi].sum(axis=0)
    if float(np.hypot(area[0], area[1])) < 1e-9:  # no net deflection: no direction
        return math.nan
    return math.degrees(math.atan2(float(area[1]), float(area[0])))
