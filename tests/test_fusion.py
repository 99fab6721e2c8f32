"""Fusion of rule findings and model outputs: levels, superseded rules, evidence, model names, and
the registry's failure modes (a missing or altered model falls back to the rules, named)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from teleread.errors import InvalidInput
from teleread.models.inference import fusion, pipeline, registry, triage
from teleread.vocab import Level
from teleread.models.inference.synthetic import synthetic_ecg, write_wfdb_record
from teleread.models.inference.triage import Finding, Scored

RULES = triage.load_rules()
POLICY = fusion.FusionPolicy(version="fusion-test", superseded_by_rhythm=("ecg.irregular_rhythm",))


@dataclass(frozen=True)
class _Card:
    name: str
    version: str = "9.9"
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class _Rhythm:
    probs: dict[str, float]
    lead: str = "II"


@dataclass(frozen=True)
class _Twelve:
    probs: dict[str, float]
    lead_importance: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Chest:
    probability: float
    regions: list[tuple[str, float]]


RHYTHM_CARD = _Card("ecg_rhythm", thresholds={"af_urgent": 0.2})
TWELVE_CARD = _Card("ecg_12lead", thresholds={"mi_urgent": 0.4})


def _finding(code: str, level: Level) -> Scored:
    return Scored(Finding(code, code, level, []), 0.5)


def _fuse(scored: list[Scored], rhythm: Any = None, twelve: Any = None, unavailable: tuple[str, ...] = ()) -> Any:
    outputs = fusion.ModelOutputs(
        rhythm=rhythm,
        rhythm_card=RHYTHM_CARD if rhythm is not None else None,
        twelve=twelve,
        twelve_card=TWELVE_CARD if twelve is not None else None,
        unavailable=unavailable,
    )
    return fusion.fuse_ecg(scored, outputs, rules=RULES, policy=POLICY, context="ctx")


def test_af_above_threshold_is_urgent_with_lead_and_threshold_as_evidence() -> None:
    result = _fuse([], rhythm=_Rhythm({"N": 0.1, "A": 0.7, "O": 0.15, "~": 0.05}, lead="V1"))
    assert result.level is Level.URGENT
    af = next(f for f in result.findings if f.code == "ecg.model.af")
    assert af.evidence[0].name == "p_af" and af.evidence[0].lead == "V1" and af.evidence[0].threshold == 0.2
    assert "lead V1" in af.title
    assert result.models == ("ecg_rhythm@9.9",)
    assert result.rules_version.endswith("+fusion-test")
    low, high = RULES.score_bands[Level.URGENT]
    assert low <= result.score <= high


def test_af_below_threshold_stays_routine_but_shows_the_model_output() -> None:
    result = _fuse([], rhythm=_Rhythm({"N": 0.85, "A": 0.1, "O": 0.04, "~": 0.01}))
    assert result.level is Level.ROUTINE
    (f,) = result.findings
    assert f.code == "ecg.model.rhythm" and "normal sinus rhythm" in f.title
    assert {e.name for e in f.evidence} == {"p_N", "p_A", "p_O", "p_noisy"}


def test_the_rules_af_proxy_is_left_to_the_rhythm_model_only_when_it_ran() -> None:
    irregular = [_finding("ecg.irregular_rhythm", Level.URGENT)]
    with_model = _fuse(irregular, rhythm=_Rhythm({"N": 0.9, "A": 0.05, "O": 0.05, "~": 0.0}))
    assert with_model.level is Level.ROUTINE
    demoted = next(f for f in with_model.findings if f.code == "ecg.irregular_rhythm")
    assert demoted.level is Level.ROUTINE and "rhythm model" in demoted.title
    without_model = _fuse(irregular, unavailable=("ecg_rhythm: weight file missing",))
    assert without_model.level is Level.URGENT
    assert any(f.code == "model.unavailable" and "weight file missing" in f.title for f in without_model.findings)
    assert without_model.models == ()


def test_a_model_never_lowers_a_critical_value_or_the_requested_priority() -> None:
    calm = _Rhythm({"N": 0.99, "A": 0.0, "O": 0.01, "~": 0.0})
    assert _fuse([_finding("ecg.pause", Level.CRITICAL)], rhythm=calm).level is Level.CRITICAL
    floor = triage._priority_findings("urgent", RULES)
    assert _fuse(floor, rhythm=calm).level is Level.URGENT


def test_mi_flag_names_the_leads_that_drove_it() -> None:
    twelve = _Twelve({"NORM": 0.1, "MI": 0.8, "STTC": 0.3, "CD": 0.1, "HYP": 0.1}, {"MI": [("V2", 0.3), ("V3", 0.2)]})
    result = _fuse([], twelve=twelve)
    mi = next(f for f in result.findings if f.code == "ecg.model.mi")
    assert mi.level is Level.URGENT and "V2, V3" in mi.title
    assert [(e.name, e.lead) for e in mi.evidence] == [("p_mi", ""), ("lead_weight", "V2"), ("lead_weight", "V3")]
    calm = _fuse([], twelve=_Twelve({"NORM": 0.9, "MI": 0.1, "STTC": 0.1, "CD": 0.0, "HYP": 0.0}))
    assert calm.level is Level.ROUTINE and calm.findings[0].code == "ecg.model.superclass"


def test_policy_threshold_overrides_the_card() -> None:
    policy = fusion.FusionPolicy(thresholds={"af_urgent": 0.9})
    assert policy.threshold("af_urgent", RHYTHM_CARD, "af_urgent", 0.3) == 0.9
    assert POLICY.threshold("af_urgent", RHYTHM_CARD, "af_urgent", 0.3) == 0.2
    assert POLICY.threshold("af_urgent", None, "af_urgent", 0.3) == 0.3


def test_chest_fusion_flags_names_regions_and_says_when_no_model_applies() -> None:
    card = _Card("chest_pneumonia", thresholds={"urgent": 0.3})
    pred = _Chest(0.8, [("right lower zone", 0.5), ("left lower zone", 0.3)])
    flagged = fusion.fuse_chest([], pred, card, rules=RULES, policy=POLICY, context="DX request.")
    assert flagged.level is Level.URGENT and "right lower zone" in flagged.findings[0].title
    assert flagged.models == ("chest_pneumonia@9.9",)
    calm = fusion.fuse_chest([], _Chest(0.1, [("central", 0.4)]), card, rules=RULES, policy=POLICY, context="")
    assert calm.level is Level.ROUTINE and "not flagged" in calm.findings[0].title
    none = fusion.fuse_chest([], "modality CT", None, rules=RULES, policy=POLICY, context="")
    assert none.findings[0].code == "image.model.none" and "modality CT" in none.findings[0].title
    assert none.models == ()


def test_fusion_policy_file_round_trip_and_malformed_file(tmp_path: Path) -> None:
    path = fusion.save_policy(POLICY, tmp_path / "fusion.json")
    assert fusion.load_policy(path) == POLICY
    path.write_text(json.dumps({"superseded_by_rhythm": []}))
    with pytest.raises(InvalidInput) as err:
        fusion.load_policy(path)
    assert err.value.reason == "FUSION_POLICY_INVALID"


def test_triage_result_json_keeps_the_model_names() -> None:
    result = _fuse([], rhythm=_Rhythm({"N": 0.1, "A": 0.8, "O": 0.1, "~": 0.0}))
    again = triage.TriageResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result and again.models == ("ecg_rhythm@9.9",)


def _wfdb_item(folder: Path) -> dict[str, Any]:
    sig, leads = synthetic_ecg(rhythm="normal", seed=3)
    hea, dat = write_wfdb_record(folder, "ecg", sig, 500.0, leads)
    return {"files": {"wfdb_header": str(hea), "wfdb_signal": str(dat)}, "priority": "routine", "indication": ""}


def test_missing_or_altered_weights_fall_back_to_the_rules_and_say_so(tmp_path: Path, monkeypatch) -> None:
    item = _wfdb_item(tmp_path)
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in registry.available():  # a copy of the packaged models, one of them altered
        for ext in (".pt", ".json"):
            shutil.copy(registry.WEIGHTS_DIR / f"{name}{ext}", weights / f"{name}{ext}")
    data = bytearray((weights / "ecg_rhythm.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (weights / "ecg_rhythm.pt").write_bytes(bytes(data))
    (weights / "ecg_12lead.pt").unlink()
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights)
    registry.clear_cache()
    try:
        with pytest.raises(registry.ModelUnavailable) as err:
            registry.get("ecg_rhythm")
        assert err.value.reason == "MODEL_WEIGHTS_MISMATCH"
        (result,) = pipeline.triage_ecg_batch([item])
    finally:
        registry.clear_cache()
    problems = [f["title"] for f in result["findings"] if f["code"] == "model.unavailable"]
    assert any("ecg_rhythm" in p and "SHA-256" in p for p in problems)
    assert any("ecg_12lead" in p and "missing" in p for p in problems)
    assert result["models"] == []


def test_triage_of_an_ecg_file_names_both_ecg_models(tmp_path: Path) -> None:
    (result,) = pipeline.triage_ecg_batch([_wfdb_item(tmp_path)])
    labels = {registry.card(n).label for n in ("ecg_rhythm", "ecg_12lead")}
    assert set(result["models"]) == labels
    codes = {f["code"] for f in result["findings"]}
    assert codes & {"ecg.model.af", "ecg.model.rhythm"} and codes & {"ecg.model.mi", "ecg.model.superclass"}


def test_batch_equals_one_by_one(tmp_path: Path) -> None:
    items = []
    for i, rhythm in enumerate(("normal", "af_rvr", "pause", "stemi")):
        sig, leads = synthetic_ecg(rhythm=rhythm, seed=i)
        hea, dat = write_wfdb_record(tmp_path, f"r{i}", sig, 500.0, leads)
        items.append(
            {"files": {"wfdb_header": str(hea), "wfdb_signal": str(dat)}, "priority": "routine", "indication": ""}
        )
    together = pipeline.triage_ecg_batch(items)
    alone = [pipeline.triage_ecg_batch([it])[0] for it in items]
    assert [r["level"] for r in together] == [r["level"] for r in alone]
    for a, b in zip(together, alone):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert np.isfinite([r["score"] for r in together]).all()


def test_the_pause_is_placed_on_the_trace_and_the_measurements_reach_the_reader(tmp_path: Path) -> None:
    from teleread.models.inference.synthetic import synthetic_r_peaks
    from teleread.triage_result import TriageResult

    sig, leads = synthetic_ecg(rhythm="pause", seed=3)
    hea, dat = write_wfdb_record(tmp_path, "p", sig, 500.0, leads)
    item = {"files": {"wfdb_header": str(hea), "wfdb_signal": str(dat)}, "priority": "routine", "indication": ""}
    (raw,) = pipeline.triage_ecg_batch([item])
    result = TriageResult.from_dict(raw)
    [pause] = [e for f in result.findings if f.code == "ecg.pause" for e in f.evidence if e.name == "longest_pause_s"]
    truth = np.asarray(synthetic_r_peaks(rhythm="pause", seed=3))
    gap = int(np.argmax(np.diff(truth)))
    assert pause.at_s == pytest.approx(truth[gap], abs=0.02)  # starts at the beat before the pause
    assert pause.duration_s == pytest.approx(truth[gap + 1] - truth[gap], abs=0.02)
    assert result.ecg is not None and result.ecg.rhythm_lead == "II"
    message = TriageResult.from_json(result.to_json()).to_proto()  # kept in triage_json, read by readers
    assert message.ecg.HasField("qrs_ms") and 60 <= message.ecg.qrs_ms <= 120
    assert not message.ecg.HasField("pr_ms")  # the second pass measures PR, QT and the axes
    [full] = pipeline.ecg_intervals_batch([item])
    assert full is not None and {"pr_ms", "qt_ms", "qtc_bazett_ms", "qrs_axis_deg"} <= set(full["values"])
    assert full["values"]["qrs_ms"] == message.ecg.qrs_ms and full["rhythm_lead"] == "II"
    assert message.ecg.rr_ms == pytest.approx(float(np.median(np.diff(truth))) * 1000, abs=15)
    [placed] = [e for f in message.findings for e in f.evidence if e.name == "longest_pause_s"]
    assert (placed.at_s, placed.duration_s) == (pause.at_s, pause.duration_s)
