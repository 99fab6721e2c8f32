"""The evaluation on the shared evaluation files, as `teleread models evaluate` prints it, guarded by
floors a little below the measured figures (`tests/eval_floors.json`), so a regression in a model,
its preprocessing or the fusion fails the build. Higher-is-better metrics have a floor; the flag
rates have a ceiling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleread.models.training import metrics
from helpers import datasets_dir
from teleread.models.training.evaluate import TRAINERS, Section, evaluate_all

FLOORS = json.loads((Path(__file__).parent / "eval_floors.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def sections() -> list[Section]:
    return evaluate_all(datasets_dir())


@pytest.fixture(scope="module")
def figures(sections: list[Section]) -> dict[str, metrics.Metric]:
    return {f"{s.name}: {m.name}": m for s in sections for m in s.metrics}


@pytest.mark.parametrize("name", sorted(FLOORS["at_least"]))
def test_metric_at_least_its_floor(figures: dict[str, metrics.Metric], name: str) -> None:
    m = figures[name]
    assert m.value >= FLOORS["at_least"][name], f"{name}: {m} fell below {FLOORS['at_least'][name]}"
    assert m.low <= m.value <= m.high  # the interval brackets the point estimate


@pytest.mark.parametrize("name", sorted(FLOORS["at_most"]))
def test_rate_at_most_its_ceiling(figures: dict[str, metrics.Metric], name: str) -> None:
    m = figures[name]
    assert m.value <= FLOORS["at_most"][name], f"{name}: {m} rose above {FLOORS['at_most'][name]}"


def test_every_section_prints_published_figures_beside_its_own(sections: list[Section]) -> None:
    assert [s.name for s in sections] == [*TRAINERS, "fused_ecg_triage"]
    for section in sections:
        assert section.published and all(isinstance(v, float) for _, v, _ in section.published)
        assert all(m.n > 0 for m in section.metrics), section.name
