"""Evaluation metrics with 95 % bootstrap confidence intervals (scikit-learn underneath).

Every figure that ``teleread models evaluate`` prints is a :class:`Metric`: the point estimate on
the whole evaluation set plus a percentile bootstrap interval over records (resampled with
replacement, a fixed seed, 1,000 resamples by default). A resample where the metric is undefined
(e.g. one class only, for an AUC) is skipped; ``n`` says how many resamples counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["Metric", "bootstrap", "f1_for", "mean_f1", "macro_auc", "auc", "sensitivity", "specificity", "accuracy"]


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    low: float
    high: float
    n: int  # resamples that counted

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "value": round(self.value, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
        }

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(
    name: str,
    fn: Callable[..., float],
    *arrays: np.ndarray,
    resamples: int = 1000,
    seed: int = 20261123,
) -> Metric:
    """``fn(*arrays)`` with a 95 % percentile bootstrap interval over the first axis."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    value = _safe(fn, *arrays)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        v = _safe(fn, *(a[idx] for a in arrays))
        if not math.isnan(v):
            stats.append(v)
    if not stats:
        return Metric(name, value, math.nan, math.nan, 0)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Metric(name, float(value), float(low), float(high), len(stats))


def _safe(fn: Callable[..., float], *arrays: np.ndarray) -> float:
    try:
        v = float(fn(*arrays))
    except ValueError:  # e.g. an AUC over one class
        return math.nan
    return v


def f1_for(label: object) -> Callable[[np.ndarray, np.ndarray], float]:
    """F1 of one class (one-vs-rest) from label arrays."""
    from sklearn.metrics import f1_score

    def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(f1_score(y_true == label, y_pred == label, zero_division=0.0))

    return f1


def mean_f1(labels: Sequence[object]) -> Callable[[np.ndarray, np.ndarray], float]:
    """Mean of the per-class F1 over ``labels`` (the CinC 2017 score uses N, A, O)."""
    parts = [f1_for(label) for label in labels]

    def score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(np.mean([p(y_true, y_pred) for p in parts]))

    return score


def auc(y_true: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        raise ValueError("one class")
    return float(roc_auc_score(y_true, score))


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC-AUC over the columns that have both classes (PTB-XL benchmark style)."""
    from sklearn.metrics import roc_auc_score

    cols = [j for j in range(y_true.shape[1]) if 0 < y_true[:, j].sum() < len(y_true)]
    if not cols:
        raise ValueError("no column has both classes")
    return float(np.mean([roc_auc_score(y_true[:, j], scores[:, j]) for j in cols]))


def sensitivity(y_true: np.ndarray, flagged: np.ndarray) -> float:
    pos = np.asarray(y_true, bool)
    if not pos.any():
        raise ValueError("no positives")
    return float(np.asarray(flagged, bool)[pos].mean())


def specificity(y_true: np.ndarray, flagged: np.ndarray) -> float:
    neg = ~np.asarray(y_true, bool)
    if not neg.any():
        raise ValueError("no negatives")
    return float((~np.asarray(flagged, bool))[neg].mean())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
