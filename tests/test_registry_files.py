"""The model registry writes weights and cards atomically: a save that fails half-way leaves the
earlier weights and card whole and no temporary file, and the card names the weights' SHA-256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from teleread.models.inference import registry


def _save(folder: Path, weights: dict[str, Any], version: str) -> registry.ModelCard:
    return registry.save(
        "toy", state_dict=weights, module="teleread.models.inference.ecg_rhythm", version=version, task="test",
        training_data="none", seed=1, weights_dir=folder,
    )  # fmt: skip


def test_a_saved_model_loads_back_verified(tmp_path: Path) -> None:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    card = _save(tmp_path, weights, "1")
    assert card.sha256 == hashlib.sha256((tmp_path / "toy.pt").read_bytes()).hexdigest()
    loaded, state = registry.load_state("toy", tmp_path)
    assert loaded.version == "1" and torch.equal(state["w"], weights["w"])
    registry.update_card("toy", tmp_path, thresholds={"af": 0.4})
    assert registry.card("toy", tmp_path).thresholds == {"af": 0.4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.pt"]


def test_a_save_that_fails_keeps_the_earlier_model_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, {"w": torch.ones(3)}, "1")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = torch.save

    def save_half(obj: Any, f: Any) -> None:
        real_save(obj, f)
        raise OSError("disk full while writing the weights")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError):
        _save(tmp_path, {"w": torch.zeros(3)}, "2")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    card, state = registry.load_state("toy", tmp_path)
    assert card.version == "1" and torch.equal(state["w"], torch.ones(3))
