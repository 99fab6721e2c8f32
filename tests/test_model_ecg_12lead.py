"""The trained 12-lead superclass model: weights load, fold-10 AUC, rate/lead-order invariance, missing leads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import signal as sps

from helpers import datasets_dir
from teleread.models.inference import ecg_12lead, registry
from teleread.models.training.metrics import macro_auc

EVAL = datasets_dir() / "ptbxl-fold10-eval.npz"
MEASURED_MACRO_AUC = 0.869  # fold-10 subset, seed-0 weights (models/cards/ecg_12lead.md)


@pytest.fixture(scope="module")
def model() -> Any:
    return registry.get("ecg_12lead")


@pytest.fixture(scope="module")
def records() -> tuple[np.ndarray, list[str], np.ndarray]:
    with np.load(EVAL) as z:
        return z["X"].astype(np.float64) / 1000.0, [str(n) for n in z["lead_names"]], z["y_super"]


def _probs(pred: Any) -> np.ndarray:
    return np.array([pred.probs[c] for c in ecg_12lead.CLASSES])


def test_weights_load_through_registry(model: Any) -> None:
    assert model.classes == ("NORM", "MI", "STTC", "CD", "HYP")
    assert model.card.name == "ecg_12lead"
    assert set(model.card.thresholds) >= {"NORM", "MI", "STTC", "CD", "HYP", "mi_urgent"}
    assert not model.net.training


def test_fold10_macro_auc_above_bound(model: Any, records: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    x, names, y = records
    preds = model.predict_batch([(rec, 100.0, names) for rec in x])
    probs = np.stack([_probs(p) for p in preds])
    assert macro_auc(y, probs) > MEASURED_MACRO_AUC - 0.03


def test_500_hz_close_to_100_hz(model: Any, records: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    x, names, _ = records
    for rec in x[:4]:
        up = sps.resample_poly(rec, 5, 1, axis=0)
        assert np.abs(_probs(model.predict(up, 500.0, names)) - _probs(model.predict(rec, 100.0, names))).max() < 0.02


def test_lead_order_and_spelling_do_not_matter(model: Any, records: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    x, names, _ = records
    rec = x[1]
    base = _probs(model.predict(rec, 100.0, names))
    other = [n.lower() if n.startswith("AV") else n for n in names[::-1]]  # aVR spelt "avr", reversed order
    np.testing.assert_allclose(_probs(model.predict(rec[:, ::-1], 100.0, other)), base, atol=1e-5)
    assert ecg_12lead.lead_index("MLII") == ecg_12lead.lead_index("II")
    assert ecg_12lead.lead_index("aVR") == ecg_12lead.lead_index("AVR") == 3


def test_missing_lead_reported(model: Any, records: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    x, names, _ = records
    keep = [i for i, n in enumerate(names) if n != "V3"]
    pred = model.predict(x[2][:, keep], 100.0, [names[i] for i in keep])
    assert pred.missing_leads == ("V3",)
    assert all(lead != "V3" for ranked in pred.lead_importance.values() for lead, _ in ranked)
    assert model.predict(x[2], 100.0, names).missing_leads == ()


def test_predict_batch_equals_predict(model: Any, records: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    x, names, _ = records
    items = [(x[0], 100.0, names), (x[3][:700], 100.0, names), (np.concatenate([x[4], x[5]]), 100.0, names)]
    batch = model.predict_batch(items)
    assert len(batch) == len(items)
    for item, got in zip(items, batch):
        single = model.predict(*item)
        np.testing.assert_allclose(_probs(got), _probs(single), atol=1e-5)
        assert got.lead_importance.keys() == single.lead_importance.keys()


def test_lead_importance_names_real_leads(model: Any, records: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    x, names, _ = records
    explained = 0
    for pred in model.predict_batch([(rec, 100.0, names) for rec in x]):
        flagged = pred.mi_urgent or any(c != "NORM" for c in pred.flagged)
        if not flagged:  # nothing to explain: the occlusion pass is skipped
            assert pred.lead_importance == {}
            continue
        explained += 1
        assert {"MI", "STTC"} <= set(pred.lead_importance)
        assert all(c in pred.lead_importance for c, p in pred.probs.items() if p >= 0.5)
        for ranked in pred.lead_importance.values():
            assert len(ranked) == 3
            assert all(lead in ecg_12lead.LEADS for lead, _ in ranked)
            weights = [w for _, w in ranked]
            assert weights == sorted(weights, reverse=True)
    assert explained >= 5  # the evaluation records include flagged ones
