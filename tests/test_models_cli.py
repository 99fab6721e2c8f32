"""`teleread models ...`: list, show, evaluate, explain, and the errors an operator can meet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import datasets_dir, write_chest_dx
from teleread.app.cli import main
from teleread.models.inference import registry


def test_list_names_every_model_with_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("ecg_rhythm", "ecg_12lead", "chest_pneumonia"):
        card = registry.card(name)
        assert card.label in out and card.sha256[:12] in out


def test_show_prints_the_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "show", "ecg_12lead"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "ecg_12lead" and "mi_urgent" in card["thresholds"] and card["training_data"]


def test_unknown_model_and_missing_data_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "show", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert main(["models", "train", "no_such_model", "--data", str(tmp_path)]) == 2
    assert "known: ecg_rhythm" in capsys.readouterr().err
    assert main(["models", "evaluate", "--data", str(tmp_path)]) == 2
    assert "evaluation files" in capsys.readouterr().err


def test_evaluate_one_model_prints_and_saves_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    assert main(["models", "evaluate", "--model", "chest_pneumonia", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "pneumonia AUC" in printed and ">= 0.96" in printed and "Yang et al." in printed
    (section,) = json.loads(out_json.read_text())
    auc = next(m for m in section["metrics"] if m["name"] == "pneumonia AUC")
    assert auc["low"] <= auc["value"] <= auc["high"] and auc["value"] > 0.9


def test_explain_writes_a_saliency_overlay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = np.load(datasets_dir() / "pneumoniamnist-test-eval.npz")["images"][3]
    cxr = write_chest_dx(tmp_path / "cxr.dcm", image)
    png = tmp_path / "overlay.png"
    assert main(["models", "explain", str(cxr), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "p(pneumonia)" in out and "zone" in out
    assert png.read_bytes().startswith(b"\x89PNG")
    knee = write_chest_dx(tmp_path / "knee.dcm", image, body_part="KNEE")
    assert main(["models", "explain", str(knee)]) == 0
    assert "no model for this exam" in capsys.readouterr().out.lower()
