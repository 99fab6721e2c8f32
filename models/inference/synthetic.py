"""Deterministic synthetic 12-lead ECGs for demos and tests, and a WFDB writer for them.

Each beat is a sum of Gaussians (P, Q, R, S, T) with per-lead amplitudes for leads I, II and
V1-V6; III, aVR, aVL and aVF are derived from I and II (Einthoven/Goldberger), so the limb leads
are consistent. The rhythm decides the beat times: ``normal`` (~70/min), ``pause`` (sinus arrest
with a 3.8 s pause), ``stemi`` (ST elevation 0.35 mV in V1-V4), ``af_rvr`` (irregular ~190/min,
no P waves, fibrillatory baseline) and ``brady`` (30/min). Small noise and baseline wander are
added; the same arguments always give the same samples. No downloads, no patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import wfdb

from teleread.errors import InvalidInput

LEAD_NAMES: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)
RHYTHMS: tuple[str, ...] = ("normal", "pause", "stemi", "af_rvr", "brady")

#: Length of the sinus arrest of the "pause" rhythm (R to R), in seconds.
PAUSE_SECONDS = 3.8
#: ST elevation of the "stemi" rhythm in V1-V4, in mV.
STEMI_ELEVATION_MV = 0.35

# Wave timing relative to the R peak at RR = 1 s: (centre s, width s). T scales with RR^(1/3).
_P = (-0.17, 0.022)
_Q = (-0.028, 0.009)
_R = (0.0, 0.011)
_S = (0.028, 0.010)
_T = (0.27, 0.045)

# Per independent lead: amplitudes in mV of (P, Q, R, S, T).
_AMPLITUDES: dict[str, tuple[float, float, float, float, float]] = {
    "I": (0.08, -0.05, 0.65, -0.10, 0.22),
    "II": (0.14, -0.08, 1.05, -0.20, 0.32),
    "V1": (0.08, 0.0, 0.22, -0.90, -0.08),
    "V2": (0.09, 0.0, 0.45, -1.20, 0.45),
    "V3": (0.09, -0.03, 0.85, -0.80, 0.45),
    "V4": (0.10, -0.06, 1.30, -0.40, 0.42),
    "V5": (0.10, -0.08, 1.15, -0.20, 0.35),
    "V6": (0.09, -0.08, 0.90, -0.10, 0.28),
}
_STEMI_LEADS = ("V1", "V2", "V3", "V4")


@dataclass(frozen=True)
class _Beat:
    r_time_s: float
    rr_s: float


def synthetic_ecg(*, rhythm: str, fs: int = 500, seconds: float = 10.0, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A synthetic 12-lead ECG in mV, shape (n_samples, 12), and its lead names."""
    if rhythm not in RHYTHMS:
        raise InvalidInput("unknown synthetic rhythm", reason="SYNTHETIC_UNKNOWN_RHYTHM")
    if fs < 50 or seconds < 2.0:
        raise InvalidInput("synthetic ECG needs fs >= 50 Hz and >= 2 s", reason="SYNTHETIC_BAD_SIZE")
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    beats = _beat_times(rhythm, seconds=seconds, rng=rng)
    with_p = rhythm != "af_rvr"
    st_mv = STEMI_ELEVATION_MV if rhythm == "stemi" else 0.0
    independent = {
        lead: _lead_signal(t, beats, amplitudes=amps, with_p=with_p, st_mv=st_mv if lead in _STEMI_LEADS else 0.0)
        for lead, amps in _AMPLITUDES.items()
    }
    if rhythm == "af_rvr":
        _add_fibrillatory_waves(independent, t, rng)
    leads = _derive_limb_leads(independent)
    signal = np.stack([leads[name] for name in LEAD_NAMES], axis=1)
    signal += _noise_and_wander(t, n_leads=len(LEAD_NAMES), rng=rng)
    return signal, list(LEAD_NAMES)


def synthetic_r_peaks(*, rhythm: str, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """The R-peak times (s) that ``synthetic_ecg`` with the same arguments places: ground truth."""
    if rhythm not in RHYTHMS:
        raise InvalidInput("unknown synthetic rhythm", reason="SYNTHETIC_UNKNOWN_RHYTHM")
    beats = _beat_times(rhythm, seconds=seconds, rng=np.random.default_rng(seed))
    return np.array([b.r_time_s for b in beats])


def _beat_times(rhythm: str, *, seconds: float, rng: np.random.Generator) -> list[_Beat]:
    """R-peak times for a rhythm; the first beat comes early, none in the last 0.4 s."""
    if rhythm == "af_rvr":
        mean_rr = 60.0 / 190.0
        rr_list = mean_rr * (1.0 + rng.uniform(-0.25, 0.25, size=int(seconds / 0.2) + 2))
    else:
        bpm = {"normal": 70.0, "pause": 70.0, "stemi": 75.0, "brady": 30.0}[rhythm]
        rr_list = 60.0 / bpm * (1.0 + rng.normal(0.0, 0.01, size=int(seconds / 0.3) + 2))
    first = min(0.35 + float(rng.uniform(0.0, 0.1)), seconds / 4)
    times = [first]
    rrs: list[float] = []
    for i, rr in enumerate(rr_list):
        if rhythm == "pause" and i == 3:
            rr = PAUSE_SECONDS
        nxt = times[-1] + float(rr)
        if nxt > seconds - 0.45:
            break
        rrs.append(float(rr))
        times.append(nxt)
    rrs.append(rrs[-1] if rrs else 1.0)
    return [_Beat(r_time_s=tm, rr_s=rr) for tm, rr in zip(times, rrs)]


def _gauss(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - centre) / width) ** 2)


def _smoothstep(t: np.ndarray, start: float, stop: float) -> np.ndarray:
    x = np.clip((t - start) / (stop - start), 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _lead_signal(
    t: np.ndarray,
    beats: Sequence[_Beat],
    *,
    amplitudes: tuple[float, float, float, float, float],
    with_p: bool,
    st_mv: float,
) -> np.ndarray:
    """Sum of one lead's PQRST waves over all beats (T and ST scaled with RR^(1/3))."""
    p_amp, q_amp, r_amp, s_amp, t_amp = amplitudes
    out = np.zeros_like(t)
    for beat in beats:
        rel = t - beat.r_time_s
        window = np.abs(rel) < 1.2
        r = rel[window]
        qt_scale = float(np.cbrt(min(max(beat.rr_s, 0.25), 1.5)))  # Fridericia
        wave = q_amp * _gauss(r, *_Q) + r_amp * _gauss(r, *_R) + s_amp * _gauss(r, *_S)
        wave += t_amp * _gauss(r, _T[0] * qt_scale, _T[1] * qt_scale)
        if with_p:
            wave += p_amp * _gauss(r, *_P)
        if st_mv:
            t_end = (_T[0] + 0.09) * qt_scale
            wave += st_mv * _smoothstep(r, 0.035, 0.06) * (1.0 - _smoothstep(r, t_end - 0.1, t_end))
        out[window] += wave
    return out


def _add_fibrillatory_waves(leads: dict[str, np.ndarray], t: np.ndarray, rng: np.random.Generator) -> None:
    """Irregular 5-7 Hz atrial activity, largest in V1 and II."""
    f_wave = np.zeros_like(t)
    for freq in rng.uniform(5.0, 7.0, size=3):
        f_wave += np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    f_wave *= 0.03 / 3 * np.sqrt(3)
    for lead, gain in (("V1", 1.5), ("II", 1.0), ("I", 0.4), ("V2", 0.8)):
        leads[lead] = leads[lead] + gain * f_wave


def _derive_limb_leads(independent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lead_i, lead_ii = independent["I"], independent["II"]
    derived = {
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2.0,
        "aVL": lead_i - lead_ii / 2.0,
        "aVF": lead_ii - lead_i / 2.0,
    }
    return {**independent, **derived}


def _noise_and_wander(t: np.ndarray, *, n_leads: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (10 µV) and a slow respiratory baseline wander (<= 0.08 mV)."""
    noise = rng.normal(0.0, 0.01, size=(t.size, n_leads))
    phase = rng.uniform(0, 2 * np.pi, size=n_leads)
    amp = rng.uniform(0.02, 0.08, size=n_leads)
    wander = amp[None, :] * np.sin(2 * np.pi * 0.25 * t[:, None] + phase[None, :])
    return noise + wander


def write_wfdb_record(
    directory: Path,
    record_name: str,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
) -> tuple[Path, Path]:
    """Write a 16-bit WFDB record (format 16, gain 1000/mV, baseline 0); return (.hea, .dat)."""
    if not record_name.replace("_", "").replace("-", "").isalnum():
        raise InvalidInput("record name must be alphanumeric", reason="WFDB_BAD_RECORD_NAME")
    signal = np.asarray(signal_mv, dtype=np.float64)
    if signal.ndim != 2 or signal.shape[1] != len(lead_names):
        raise InvalidInput("signal must be (n_samples, n_leads)", reason="WFDB_BAD_SHAPE")
    counts = np.clip(np.round(signal * 1000.0), -32767, 32767).astype(np.int16)
    n_leads = len(lead_names)
    directory.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        record_name,
        fs=float(fs),
        units=["mV"] * n_leads,
        sig_name=list(lead_names),
        d_signal=counts,
        fmt=["16"] * n_leads,
        adc_gain=[1000.0] * n_leads,
        baseline=[0] * n_leads,
        write_dir=str(directory),
    )
    return directory / f"{record_name}.hea", directory / f"{record_name}.dat"
