"""Single-lead ECG rhythm classifier: N (normal), A (atrial fibrillation), O (other rhythm), ~ (noisy).

A small 1-D residual CNN over fixed windows of the resampled, robustly normalised signal, with
masked global (mean + max) pooling, concatenated with cheap RR-interval irregularity features from a
band-passed energy-envelope QRS detector. Any lead, any sampling rate, any length: the signal is
resampled to ``fs`` (100 Hz), cut into overlapping windows (short records are zero-padded and masked)
and the window probabilities are averaged. Trained by ``train_ecg_rhythm.py`` on CinC 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import signal as sps
from torch import nn

__all__ = [
    "CLASSES",
    "RhythmNet",
    "RhythmEnsemble",
    "RhythmModel",
    "RhythmPrediction",
    "LeadsPrediction",
    "from_checkpoint",
    "preprocess",
    "detect_peaks",
    "rr_features",
    "window_starts",
    "make_windows",
    "build_net",
    "build_ensemble",
    "ensemble_state",
]

CLASSES: tuple[str, ...] = ("N", "A", "O", "~")
N_RR_FEATURES = 14
DEFAULT_HYPER: dict[str, Any] = {
    "fs": 100,
    "window_s": 30.0,
    "hop_s": 15.0,
    "channels": [16, 32, 48, 64, 96, 96],
    "kernel": 7,
    "stem_kernel": 15,
    "rr_hidden": 32,
    "head_hidden": 64,
    "dropout": 0.3,
    "clip": 20.0,
}


# ----------------------------------------------------------------------------- preprocessing


def resample(x: np.ndarray, fs_in: float, fs_out: int) -> np.ndarray:
    """Polyphase resampling of a 1-D signal from ``fs_in`` to ``fs_out`` (rational approximation)."""
    if abs(float(fs_in) - fs_out) < 1e-6:
        return np.asarray(x, dtype=np.float64)
    ratio = Fraction(fs_out / float(fs_in)).limit_denominator(1000)
    return sps.resample_poly(np.asarray(x, dtype=np.float64), ratio.numerator, ratio.denominator)


_SOS_CACHE: dict[tuple[int, str], np.ndarray] = {}


def _sos(fs: int, kind: str) -> np.ndarray:
    key = (fs, kind)
    if key not in _SOS_CACHE:
        if kind == "hp":
            _SOS_CACHE[key] = sps.butter(2, 0.5, btype="highpass", fs=fs, output="sos")
        else:  # QRS band
            _SOS_CACHE[key] = sps.butter(2, [5.0, min(20.0, 0.45 * fs)], btype="bandpass", fs=fs, output="sos")
    return _SOS_CACHE[key]


def preprocess(signal_mv: np.ndarray, fs_in: float, fs: int = 100, clip: float = 20.0) -> np.ndarray:
    """Resample to ``fs``, remove baseline (0.5 Hz high-pass), scale by a robust QRS amplitude; float32."""
    x = np.nan_to_num(np.asarray(signal_mv, dtype=np.float64).ravel())
    x = resample(x, fs_in, fs)
    if x.size > 12:
        x = sps.sosfiltfilt(_sos(fs, "hp"), x, padlen=min(x.size - 1, 3 * fs))
    x = x - np.median(x)
    scale = float(np.percentile(np.abs(x), 99)) if x.size else 0.0
    if not np.isfinite(scale) or scale < 1e-3:  # flat line: keep it flat
        scale = 1.0
    return np.clip(x / scale, -clip, clip).astype(np.float32)


def detect_peaks(x: np.ndarray, fs: int) -> np.ndarray:
    """R-peak sample indices: 5-20 Hz band-pass, squared derivative, 120 ms moving average, find_peaks."""
    if x.size < fs:
        return np.zeros(0, dtype=np.int64)
    bp = sps.sosfiltfilt(_sos(fs, "qrs"), x.astype(np.float64), padlen=min(x.size - 1, fs))
    energy = np.diff(bp, prepend=bp[0]) ** 2
    width = max(1, int(round(0.12 * fs)))
    env = np.convolve(energy, np.ones(width) / width, mode="same")
    top = float(np.percentile(env, 98))
    if top <= 0:
        return np.zeros(0, dtype=np.int64)
    peaks, _ = sps.find_peaks(env, height=0.25 * top, distance=max(1, int(0.25 * fs)))
    return peaks.astype(np.int64)


def rr_features(peaks: np.ndarray, fs: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Fixed-length RR irregularity features of the peaks inside ``[start, stop)`` (zeros if too few)."""
    if stop is not None:
        peaks = peaks[(peaks >= start) & (peaks < stop)]
    out = np.zeros(N_RR_FEATURES, dtype=np.float32)
    rr = np.diff(peaks) / float(fs)
    if rr.size < 4:
        return out
    med = float(np.median(rr))
    mean = float(rr.mean())
    drr = np.diff(rr)
    rel = drr / rr[:-1]
    sd1 = float(np.std(drr) / np.sqrt(2.0))
    sd2 = float(np.sqrt(max(float(2 * np.var(rr) - sd1**2), 1e-8)))
    tp = np.sum((drr[:-1] * drr[1:]) < 0) / max(drr.size - 1, 1)  # turning-point ratio
    out[:] = [
        1.0,
        np.log(60.0 / med),
        np.std(rr) / mean,
        np.sqrt(np.mean(drr**2)) / mean,
        np.median(np.abs(drr)) / med,
        np.mean(np.abs(drr) > 0.05),
        np.mean(np.abs(rel) > 0.10),
        np.mean(np.abs(rr - med) / med > 0.15),
        sd1 / mean,
        sd1 / sd2,
        np.min(rr) / med,
        np.max(rr) / med,
        tp,
        np.log1p(rr.size),
    ]
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Window start indices covering ``n`` samples (one window when ``n <= window``; last one flush)."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window + 1, hop))
    if starts[-1] != n - window:
        starts.append(n - window)
    return starts


def make_windows(
    x: np.ndarray, peaks: np.ndarray, fs: int, window: int, hop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-padded windows (k, window), their valid lengths (k,) and raw RR features (k, n_rr)."""
    starts = window_starts(x.size, window, hop)
    wins = np.zeros((len(starts), window), dtype=np.float32)
    lengths = np.zeros(len(starts), dtype=np.int64)
    feats = np.zeros((len(starts), N_RR_FEATURES), dtype=np.float32)
    for i, s in enumerate(starts):
        seg = x[s : s + window]
        wins[i, : seg.size] = seg
        lengths[i] = max(seg.size, 1)
        feats[i] = rr_features(peaks, fs, s, s + window)
    return wins, lengths, feats


# ----------------------------------------------------------------------------- network


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.short(x))


class RhythmNet(nn.Module):
    """Residual 1-D CNN (stride 2 per stage) + masked mean/max pooling + RR-feature branch -> 4 logits."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 48, 64, 96, 96),
        kernel: int = 7,
        stem_kernel: int = 15,
        rr_hidden: int = 32,
        head_hidden: int = 64,
        dropout: float = 0.3,
        n_rr: int = N_RR_FEATURES,
        n_classes: int = 4,
    ) -> None:
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(
            nn.Conv1d(1, c0, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm1d(c0),
            nn.ReLU(),
        )
        blocks = [_ResBlock(a, b, kernel, 2) for a, b in zip([c0, *channels[:-1]], channels)]
        self.blocks = nn.Sequential(*blocks)
        self.stride = 2 ** (len(channels) + 1)
        self.rr = nn.Sequential(nn.Linear(n_rr, rr_hidden), nn.ReLU())
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * channels[-1] + rr_hidden, head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, n_classes),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, T) windows, ``lengths`` (B,) valid samples, ``rr`` (B, n_rr) standardised features."""
        h = self.blocks(self.stem(x))
        steps = h.shape[-1]
        valid = torch.clamp(torch.ceil(lengths.float() / self.stride), 1, steps)
        mask = torch.arange(steps, device=h.device)[None, :] < valid[:, None]
        m = mask[:, None, :].to(h.dtype)
        mean = (h * m).sum(-1) / valid[:, None]
        mx = h.masked_fill(~mask[:, None, :], float("-inf")).amax(-1)
        return self.head(torch.cat([mean, mx, self.rr(rr)], dim=1))


def build_net(hyper: Mapping[str, Any]) -> RhythmNet:
    """The network described by a card's ``hyper``."""
    return RhythmNet(
        channels=tuple(hyper["channels"]),
        kernel=int(hyper["kernel"]),
        stem_kernel=int(hyper["stem_kernel"]),
        rr_hidden=int(hyper["rr_hidden"]),
        head_hidden=int(hyper["head_hidden"]),
        dropout=float(hyper["dropout"]),
    )


class RhythmEnsemble(nn.Module):
    """K ``RhythmNet`` members (same architecture, different seeds); ``forward`` returns the mean softmax.

    The state_dict keys are ``members.<i>.<RhythmNet key>``; every member sees the same input batch.
    """

    def __init__(self, members: Sequence[RhythmNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """Mean member probabilities (B, n_classes) of the windows ``x`` (B, 1, T)."""
        probs = torch.softmax(self.members[0](x, lengths, rr), dim=1)
        for net in self.members[1:]:
            probs = probs + torch.softmax(net(x, lengths, rr), dim=1)
        return probs / len(self.members)


def build_ensemble(hyper: Mapping[str, Any], members: int | None = None) -> RhythmEnsemble:
    """An ensemble of ``members`` (default ``hyper["members"]``, else 1) networks described by ``hyper``."""
    k = int(members if members is not None else hyper.get("members", 1))
    return RhythmEnsemble([build_net(hyper) for _ in range(max(k, 1))])


def ensemble_state(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state_dict (``members.<i>.`` prefixed keys) from the members' state_dicts."""
    return {f"members.{i}.{k}": v for i, st in enumerate(states) for k, v in st.items()}


# ----------------------------------------------------------------------------- predictor


@dataclass(frozen=True)
class RhythmPrediction:
    probs: dict[str, float]
    label: str
    windows: int


@dataclass(frozen=True)
class LeadsPrediction:
    probs: dict[str, float]  # averaged over the leads used
    label: str
    lead: str  # the lead with the highest AF probability
    per_lead: dict[str, dict[str, float]]


class RhythmModel:
    """Loaded predictor: ``predict``, ``predict_batch`` and ``predict_leads`` on signals in mV."""

    classes: tuple[str, ...] = CLASSES

    def __init__(self, card: Any, net: RhythmNet | RhythmEnsemble, hyper: Mapping[str, Any]) -> None:
        self.card = card
        self.net = (net if isinstance(net, RhythmEnsemble) else RhythmEnsemble([net])).eval()
        self.members = len(self.net.members)
        self.hyper = dict(hyper)
        self.fs = int(hyper["fs"])
        self.window = int(round(float(hyper["window_s"]) * self.fs))
        self.hop = int(round(float(hyper["hop_s"]) * self.fs))
        self.clip = float(hyper.get("clip", 20.0))
        self._rr_mean = np.asarray(hyper["rr_mean"], dtype=np.float32)
        self._rr_std = np.asarray(hyper["rr_std"], dtype=np.float32)

    def _windows(self, signal_mv: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = preprocess(signal_mv, fs, self.fs, self.clip)
        wins, lengths, feats = make_windows(x, detect_peaks(x, self.fs), self.fs, self.window, self.hop)
        return wins, lengths, (feats - self._rr_mean) / self._rr_std

    def _forward(self, wins: np.ndarray, lengths: np.ndarray, feats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            probs = self.net(torch.from_numpy(wins)[:, None, :], torch.from_numpy(lengths), torch.from_numpy(feats))
            return probs.numpy().astype(np.float64)

    def _make(self, p: np.ndarray, windows: int) -> RhythmPrediction:
        probs = {c: float(v) for c, v in zip(self.classes, p)}
        return RhythmPrediction(probs=probs, label=self.classes[int(np.argmax(p))], windows=windows)

    def predict_proba_batch(self, items: Sequence[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, int]]:
        """Mean window probabilities (4,) and window count per record, all windows in one forward pass."""
        if not items:
            return []
        parts = [self._windows(sig, fs) for sig, fs in items]
        probs = self._forward(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
        out, at = [], 0
        for wins, _, _ in parts:
            k = wins.shape[0]
            out.append((probs[at : at + k].mean(axis=0), k))
            at += k
        return out

    def predict(self, signal_mv: np.ndarray, fs: float) -> RhythmPrediction:
        """Rhythm class probabilities of one single-lead record (any rate, any length)."""
        return self.predict_batch([(signal_mv, fs)])[0]

    def predict_batch(self, items: list[tuple[np.ndarray, float]]) -> list[RhythmPrediction]:
        """``predict`` for several records, their windows batched in one forward pass."""
        return [self._make(p, k) for p, k in self.predict_proba_batch(items)]

    def predict_leads(
        self,
        signal_mv: np.ndarray,
        fs: float,
        lead_names: Sequence[str],
        prefer: Sequence[str] = ("II", "I", "V1", "V5", "MLII"),
    ) -> LeadsPrediction:
        """Average over up to 3 preferred leads (first lead if none match); name the lead with the top AF prob."""
        sig = np.asarray(signal_mv, dtype=np.float64)
        if sig.ndim == 1:
            sig = sig[:, None]
        names = [str(n) for n in lead_names]
        if len(names) != sig.shape[1]:
            raise ValueError("lead_names must match the number of signal columns")
        lower = [n.lower() for n in names]
        chosen: list[int] = []
        for want in prefer:
            if want.lower() in lower and lower.index(want.lower()) not in chosen:
                chosen.append(lower.index(want.lower()))
            if len(chosen) == 3:
                break
        if not chosen:
            chosen = [0]
        results = self.predict_proba_batch([(sig[:, j], fs) for j in chosen])
        per_lead = {names[j]: {c: float(v) for c, v in zip(self.classes, p)} for j, (p, _) in zip(chosen, results)}
        mean = np.mean([p for p, _ in results], axis=0)
        af = self.classes.index("A")
        top = max(zip(chosen, results), key=lambda jr: float(jr[1][0][af]))[0]
        return LeadsPrediction(
            probs={c: float(v) for c, v in zip(self.classes, mean)},
            label=self.classes[int(np.argmax(mean))],
            lead=names[top],
            per_lead=per_lead,
        )


def from_checkpoint(card: Any, state: Mapping[str, Any]) -> RhythmModel:
    """Rebuild the predictor from a registry card and its verified state_dict.

    Ensemble states carry ``members.<i>.`` keys (K from ``hyper["members"]``, else from the keys); a plain
    single-network state (no ``members.`` keys, version 1.0.0) loads as an ensemble of one.
    """
    hyper = {**DEFAULT_HYPER, **dict(card.hyper)}
    state = dict(state)
    if any(k.startswith("members.") for k in state):
        found = len({k.split(".", 2)[1] for k in state if k.startswith("members.")})
        k = int(hyper.get("members", found))
        if k != found:
            raise ValueError(f"card says {k} ensemble members, the state_dict holds {found}")
    else:
        k, state = 1, ensemble_state([state])
    net = build_ensemble(hyper, members=k)
    net.load_state_dict(state)
    return RhythmModel(card, net, hyper)
