"""12-lead ECG diagnostic superclasses (PTB-XL NORM / MI / STTC / CD / HYP), multi-label, with lead occlusion.

A compact residual 1-D CNN over the twelve standard leads at 100 Hz. Preprocessing (shared by training and
inference): leads reordered to I, II, III, aVR, aVL, aVF, V1..V6 (names matched case-insensitively, MLII -> II;
a missing lead is zero-filled and reported), resampled to 100 Hz with ``scipy.signal.resample_poly``, in mV,
each lead's median removed and clipped to +-10 mV. A record shorter than 10 s is zero-padded; a longer one is cut
into 10-s windows whose probabilities are averaged.

The "which lead drove the flag" explanation is occlusion: each lead is zeroed in turn (twelve copies in one
forward pass with the original) and the drop of a class's probability is that lead's importance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import signal as sps
from torch import nn

__all__ = [
    "CLASSES",
    "LEADS",
    "EcgNet",
    "TwelveLeadModel",
    "TwelveLeadPrediction",
    "from_checkpoint",
    "lead_index",
    "prepare",
]

CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
FS_HZ = 100
WINDOW = 1000  # samples: 10 s at 100 Hz
CLIP_MV = 10.0
_KEY = {name.upper(): i for i, name in enumerate(LEADS)} | {"MLII": 1, "MLI": 0, "MLIII": 2}
_PREFIX = re.compile(r"^(?:lead|ecg)[\s_-]*", re.IGNORECASE)
_PARENS = re.compile(r"\([^)]*\)")
#: Classes whose lead importance is always reported (others only when flagged, prob >= 0.5).
ALWAYS_EXPLAIN = ("MI", "STTC")
TOP_LEADS = 3


def lead_index(name: str) -> int | None:
    """Index of a lead label in :data:`LEADS` ("AVR", "aVR", "Lead II", "MLII" ...), or None."""
    key = _PREFIX.sub("", _PARENS.sub("", str(name)).strip()).replace(" ", "").upper()
    return _KEY.get(key)


def _resample(x: np.ndarray, fs: float) -> np.ndarray:
    if abs(fs - FS_HZ) < 1e-6:
        return x
    ratio = Fraction(FS_HZ / fs).limit_denominator(1000)
    return np.asarray(sps.resample_poly(x, ratio.numerator, ratio.denominator, axis=0))


def prepare(signal_mv: np.ndarray, fs: float, lead_names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(windows (k, 12, 1000) float32, missing lead names) from an (n_samples, n_leads) signal in mV."""
    x = np.asarray(signal_mv, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(lead_names):
        raise ValueError("signal_mv must be (n_samples, n_leads) with one name per lead")
    if not (math.isfinite(fs) and fs > 0):
        raise ValueError("fs must be positive")
    canon = np.zeros((x.shape[0], len(LEADS)), dtype=np.float64)
    present = [False] * len(LEADS)
    for col, name in enumerate(lead_names):
        idx = lead_index(name)
        if idx is not None and not present[idx]:
            canon[:, idx] = x[:, col]
            present[idx] = True
    canon = np.nan_to_num(canon, nan=0.0, posinf=0.0, neginf=0.0)
    canon = _resample(canon, float(fs))
    n = canon.shape[0]
    if n <= WINDOW:
        starts = [0]
    else:  # non-overlapping 10-s windows, the last one aligned to the end
        count = math.ceil(n / WINDOW)
        starts = sorted({int(round(s)) for s in np.linspace(0, n - WINDOW, count)})
    out = np.zeros((len(starts), len(LEADS), WINDOW), dtype=np.float32)
    for k, s in enumerate(starts):
        seg = canon[s : s + WINDOW]
        seg = seg - np.median(seg, axis=0, keepdims=True)
        out[k, :, : seg.shape[0]] = np.clip(seg, -CLIP_MV, CLIP_MV).T
    out[:, [not p for p in present], :] = 0.0
    missing = tuple(name for name, p in zip(LEADS, present) if not p)
    return out, missing


class _Block(nn.Module):
    """Two convolutions with batch norm, a residual connection, then max-pool by 2."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dropout: float) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.skip = nn.Conv1d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.pool = nn.MaxPool1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(self.drop(h)))
        return self.pool(torch.relu(h + self.skip(x)))


class EcgNet(nn.Module):
    """Stem (stride 2) + residual stages + global average and max pooling + linear head (logits)."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 24, 32),
        kernel: int = 7,
        stem_kernel: int = 7,
        dropout: float = 0.1,
        head_dropout: float = 0.5,
        n_classes: int = len(CLASSES),
    ) -> None:
        super().__init__()
        c0 = int(channels[0])
        self.stem = nn.Sequential(
            nn.Conv1d(len(LEADS), c0, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm1d(c0),
            nn.ReLU(),
        )
        blocks = []
        c_prev = c0
        for c in channels:
            blocks.append(_Block(c_prev, int(c), kernel, dropout))
            c_prev = int(c)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(2 * c_prev, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


def build_net(hyper: Mapping[str, Any]) -> EcgNet:
    """The network described by a card's ``hyper`` dictionary."""
    return EcgNet(
        channels=tuple(int(c) for c in hyper.get("channels", (16, 24, 32))),
        kernel=int(hyper.get("kernel", 7)),
        stem_kernel=int(hyper.get("stem_kernel", 7)),
        dropout=float(hyper.get("dropout", 0.1)),
        head_dropout=float(hyper.get("head_dropout", 0.5)),
    )


@dataclass(frozen=True)
class TwelveLeadPrediction:
    """Per-class probabilities, leads that were missing (zero-filled), and the top leads per explained class."""

    probs: dict[str, float]
    missing_leads: tuple[str, ...] = ()
    # only for records with a flag (a class at its threshold, or MI at the triage threshold): which leads drove it
    lead_importance: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    flagged: tuple[str, ...] = ()  # classes at or above their validation-chosen threshold
    mi_urgent: bool = False  # MI probability at or above the sensitivity-first triage threshold


class TwelveLeadModel:
    """The loaded predictor: ``predict`` one record or ``predict_batch`` many in one forward pass."""

    classes = CLASSES

    def __init__(self, card: Any, net: EcgNet) -> None:
        self.card = card
        self.net = net.eval()
        thresholds = dict(getattr(card, "thresholds", {}) or {})
        self.thresholds = {c: float(thresholds.get(c, 0.5)) for c in CLASSES}
        self.mi_urgent_threshold = float(thresholds.get("mi_urgent", 0.5))

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        """Sigmoid probabilities (n, 5) for prepared windows (n, 12, 1000)."""
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)))
            return torch.sigmoid(logits).numpy().astype(np.float64)

    def predict(self, signal_mv: np.ndarray, fs: float, lead_names: Sequence[str]) -> TwelveLeadPrediction:
        """Prediction for one (n_samples, n_leads) record in mV at ``fs`` Hz."""
        return self.predict_batch([(signal_mv, fs, lead_names)])[0]

    def predict_batch(self, items: Sequence[tuple[np.ndarray, float, Sequence[str]]]) -> list[TwelveLeadPrediction]:
        """Predictions for many records: one forward pass over all windows; then one over the occluded copies
        of the records that need an explanation (a class at its threshold, or MI at the triage threshold)."""
        prepared = [prepare(sig, fs, names) for sig, fs, names in items]
        if not prepared:
            return []
        probs = self.probabilities(np.concatenate([w for w, _ in prepared], axis=0))
        bases, offset = [], 0
        for windows, _ in prepared:
            bases.append(probs[offset : offset + windows.shape[0]].mean(axis=0))
            offset += windows.shape[0]
        explain = [i for i, b in enumerate(bases) if self._needs_explanation(b)]
        drops: dict[int, np.ndarray] = {}
        if explain:
            n_leads = len(LEADS)
            stacks = []
            for i in explain:
                windows = prepared[i][0]
                occluded = np.repeat(windows[:, None], n_leads, axis=1)  # (k, 12, 12, T)
                for j in range(n_leads):
                    occluded[:, j, j, :] = 0.0
                stacks.append(occluded.reshape(-1, n_leads, WINDOW))
            occ = self.probabilities(np.concatenate(stacks, axis=0))
            offset = 0
            for i in explain:
                k = prepared[i][0].shape[0]
                block = occ[offset : offset + k * n_leads].reshape(k, n_leads, len(CLASSES)).mean(axis=0)
                offset += k * n_leads
                drops[i] = bases[i][None, :] - block  # (12, 5): probability lost when each lead is zeroed
        return [self._result(bases[i], prepared[i][1], drops.get(i)) for i in range(len(prepared))]

    def _needs_explanation(self, base: np.ndarray) -> bool:
        return bool(base[CLASSES.index("MI")] >= self.mi_urgent_threshold) or any(
            base[i] >= self.thresholds[c] for i, c in enumerate(CLASSES) if c != "NORM"
        )

    def _result(self, base: np.ndarray, missing: tuple[str, ...], drops: np.ndarray | None) -> TwelveLeadPrediction:
        probs = {c: float(base[i]) for i, c in enumerate(CLASSES)}
        importance: dict[str, list[tuple[str, float]]] = {}
        usable = [j for j, name in enumerate(LEADS) if name not in missing]
        for i, c in enumerate(CLASSES):
            if drops is not None and (probs[c] >= 0.5 or c in ALWAYS_EXPLAIN):
                order = sorted(usable, key=lambda j: (-drops[j, i], j))[:TOP_LEADS]
                importance[c] = [(LEADS[j], float(drops[j, i])) for j in order]
        flagged = tuple(c for c in CLASSES if probs[c] >= self.thresholds[c])
        return TwelveLeadPrediction(
            probs=probs,
            missing_leads=missing,
            lead_importance=importance,
            flagged=flagged,
            mi_urgent=probs["MI"] >= self.mi_urgent_threshold,
        )


def from_checkpoint(card: Any, state: Mapping[str, Any]) -> TwelveLeadModel:
    """Registry entry point: build the network from ``card.hyper`` and load the weights."""
    net = build_net(dict(getattr(card, "hyper", {}) or {}))
    net.load_state_dict(dict(state))
    return TwelveLeadModel(card, net)
