"""Triage rules: the packaged rule file, ECG critical values with evidence, image rules, scoring."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import datasets_dir, needs_datasets
from teleread.errors import InvalidInput
from teleread.models.inference.ecg_measure import EcgMeasurements, measure_ecg
from teleread.models.inference.ecg_rules import DEFAULT_RULES_PATH, RuleSet, load_rules
from teleread.vocab import Level
from teleread.models.inference.synthetic import LEAD_NAMES, synthetic_ecg
from teleread.models.inference.triage import (
    Finding,
    TriageResult,
    triage_ecg,
    triage_image,
    unmeasurable_ecg,
)

DATASETS = datasets_dir()


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules()


def _measurements(**changes: Any) -> EcgMeasurements:
    """A normal sinus ECG's measurements, with ``changes`` applied."""
    base = EcgMeasurements(
        heart_rate_bpm=70.0,
        rr_intervals_s=np.full(10, 0.857),
        longest_pause_s=0.86,
        shortest_rr_s=0.85,
        rr_cv=0.01,
        rr_irregularity=0.01,
        regular=True,
        qrs_duration_ms=90.0,
        st_deviation_mv={lead: 0.0 for lead in LEAD_NAMES},
        n_beats=11,
        lead_used="II",
        duration_s=10.0,
        beat_times_s=np.arange(11) * 0.857,
    )
    return dataclasses.replace(base, **changes)


def _finding(result: TriageResult, code: str) -> Finding:
    matches = [f for f in result.findings if f.code == code]
    assert matches, f"{code} not in {[f.code for f in result.findings]}"
    return matches[0]


# --- the packaged rule file --------------------------------------------------------------------


def test_default_rule_file_holds_the_clinical_defaults(rules: RuleSet) -> None:
    assert DEFAULT_RULES_PATH.name == "default.toml" and DEFAULT_RULES_PATH.parent.name == "rules"
    assert rules.version == "ecg-rules-2026.11-1"
    assert rules.sla_minutes == {Level.CRITICAL: 10, Level.URGENT: 60, Level.ROUTINE: 1440}
    groups = {g.name: set(g.leads) for g in rules.lead_groups}
    assert groups["inferior"] == {"II", "III", "aVF"}
    assert groups["lateral"] == {"I", "aVL", "V5", "V6"}
    assert groups["anterior"] == {"V1", "V2", "V3", "V4"}
    by_code = {r.code: r for r in rules.ecg_rules}
    pause = by_code["ecg.pause"].when[0]
    assert (pause.metric, pause.op, pause.value) == ("longest_pause_s", ">=", 3.0)
    assert by_code["ecg.severe_bradycardia"].when[0].value == 35
    assert by_code["ecg.af_rvr"].when[0].value == 180
    assert by_code["ecg.svt"].when[0].value == 230
    assert rules.priority_floor["stat"] is Level.URGENT
    stemi = next(r for r in rules.st_rules if r.code == "ecg.stemi")
    assert stemi.threshold_for("V2") == 0.3 and stemi.threshold_for("aVF") == 0.1


def test_a_hospital_rule_file_changes_thresholds(tmp_path: Path) -> None:
    text = (
        DEFAULT_RULES_PATH.read_text(encoding="utf-8")
        .replace(
            'when = [{ metric = "longest_pause_s", op = ">=", value = 3.0, unit = "s" }]',
            'when = [{ metric = "longest_pause_s", op = ">=", value = 2.0, unit = "s" }]',
        )
        .replace('version = "ecg-rules-2026.11-1"', 'version = "site-7"')
    )
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    custom = load_rules(path)
    m = _measurements(longest_pause_s=2.4)
    assert triage_ecg(m, rules=custom).level is Level.CRITICAL
    assert triage_ecg(m, rules=load_rules()).level is Level.ROUTINE
    assert triage_ecg(m, rules=custom).rules_version == "site-7"


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ('metric = "longest_pause_s"', 'metric = "patient_age"', "RULES_INVALID"),
        ('op = ">="', 'op = "=>"', "RULES_INVALID"),
        ('level = "critical"', 'level = "panic"', "RULES_INVALID"),
        ("critical = 10,", "", "RULES_INVALID"),
        ('version = "ecg-rules-2026.11-1"', "version = ", "RULES_INVALID"),
    ],
)
def test_broken_rule_files_are_rejected(tmp_path: Path, old: str, new: str, reason: str) -> None:
    text = DEFAULT_RULES_PATH.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(InvalidInput) as err:
        load_rules(path)
    assert err.value.reason == reason


def test_missing_rule_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        load_rules(tmp_path / "absent.toml")
    assert err.value.reason == "RULES_UNREADABLE"


# --- synthetic ECGs end to end ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rhythm", "code", "evidence_name", "threshold"),
    [
        ("pause", "ecg.pause", "longest_pause_s", 3.0),
        ("brady", "ecg.severe_bradycardia", "heart_rate_bpm", 35.0),
        ("af_rvr", "ecg.af_rvr", "heart_rate_bpm", 180.0),
        ("stemi", "ecg.stemi", "st_deviation_mv", None),
    ],
)
def test_synthetic_critical_rhythms_are_flagged_with_evidence(
    rules: RuleSet, rhythm: str, code: str, evidence_name: str, threshold: float | None
) -> None:
    signal, leads = synthetic_ecg(rhythm=rhythm, fs=500, seed=1)
    result = triage_ecg(measure_ecg(signal, fs=500, lead_names=leads), rules=rules)
    assert result.level is Level.CRITICAL and result.sla_minutes == 10
    assert result.findings[0].level is Level.CRITICAL
    finding = _finding(result, code)
    evidence = [e for e in finding.evidence if e.name == evidence_name]
    assert evidence
    if threshold is not None:
        assert evidence[0].threshold == threshold
    assert result.score >= 0.7


def test_synthetic_pause_evidence_has_the_measured_pause(rules: RuleSet) -> None:
    signal, leads = synthetic_ecg(rhythm="pause", fs=500, seed=2)
    result = triage_ecg(measure_ecg(signal, fs=500, lead_names=leads), rules=rules)
    (evidence,) = _finding(result, "ecg.pause").evidence
    assert evidence.value == pytest.approx(3.8, abs=0.1) and evidence.unit == "s"
    assert "3.8" in result.summary and "Pause" in result.summary


def test_synthetic_stemi_names_the_anterior_leads(rules: RuleSet) -> None:
    signal, leads = synthetic_ecg(rhythm="stemi", fs=500, seed=2)
    result = triage_ecg(measure_ecg(signal, fs=500, lead_names=leads), rules=rules)
    evidence = {e.lead: e for e in _finding(result, "ecg.stemi").evidence}
    assert {"V2", "V3", "V4"} <= set(evidence) <= {"V1", "V2", "V3", "V4"}
    assert evidence["V2"].value >= 0.3 and evidence["V2"].threshold == 0.3
    assert evidence["V4"].threshold == 0.1 and evidence["V2"].unit == "mV"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_normal_ecg_is_routine(rules: RuleSet, seed: int) -> None:
    signal, leads = synthetic_ecg(rhythm="normal", fs=500, seed=seed)
    result = triage_ecg(measure_ecg(signal, fs=500, lead_names=leads), rules=rules)
    assert result.level is Level.ROUTINE and result.findings == []
    assert result.sla_minutes == 1440 and result.score < 0.3
    assert "HR 70 bpm" in result.summary


# --- rule semantics on hand-made measurements -------------------------------------------------


def test_pause_threshold_is_inclusive(rules: RuleSet) -> None:
    assert triage_ecg(_measurements(longest_pause_s=3.0), rules=rules).level is Level.CRITICAL
    assert triage_ecg(_measurements(longest_pause_s=2.99), rules=rules).level is Level.ROUTINE


def test_no_beats_is_one_critical_finding(rules: RuleSet) -> None:
    m = _measurements(
        heart_rate_bpm=0.0,
        n_beats=0,
        longest_pause_s=10.0,
        shortest_rr_s=None,
        qrs_duration_ms=None,
        st_deviation_mv={},
        rr_intervals_s=np.zeros(0),
    )
    result = triage_ecg(m, rules=rules)
    assert [f.code for f in result.findings] == ["ecg.no_qrs"]
    assert result.level is Level.CRITICAL


def test_regular_narrow_tachycardia_over_230_is_critical(rules: RuleSet) -> None:
    result = triage_ecg(_measurements(heart_rate_bpm=240.0, qrs_duration_ms=80.0), rules=rules)
    assert [f.code for f in result.findings] == ["ecg.svt"]
    irregular = _measurements(heart_rate_bpm=240.0, rr_irregularity=0.2, regular=False)
    assert [f.code for f in triage_ecg(irregular, rules=rules).findings] == ["ecg.af_rvr"]


def test_wide_qrs_tachycardia_is_suspected_vt_and_says_duration_is_unchecked(
    rules: RuleSet,
) -> None:
    result = triage_ecg(_measurements(heart_rate_bpm=160.0, qrs_duration_ms=150.0), rules=rules)
    finding = _finding(result, "ecg.vt_suspected")
    assert result.level is Level.CRITICAL and "30 s" in finding.title
    assert {e.name for e in finding.evidence} == {"heart_rate_bpm", "qrs_duration_ms"}
    assert "ecg.wide_qrs" not in {f.code for f in result.findings}  # covered by the VT finding


def test_urgent_rules(rules: RuleSet) -> None:
    cases = {
        "ecg.tachycardia": _measurements(heart_rate_bpm=130.0),
        "ecg.bradycardia": _measurements(heart_rate_bpm=45.0),
        "ecg.irregular_rhythm": _measurements(rr_irregularity=0.2, regular=False),
        "ecg.wide_qrs": _measurements(qrs_duration_ms=130.0),
    }
    for code, m in cases.items():
        result = triage_ecg(m, rules=rules)
        assert [f.code for f in result.findings] == [code]
        assert result.level is Level.URGENT and result.sla_minutes == 60


def test_unmeasured_qrs_never_satisfies_a_qrs_rule(rules: RuleSet) -> None:
    result = triage_ecg(_measurements(heart_rate_bpm=160.0, qrs_duration_ms=None), rules=rules)
    assert [f.code for f in result.findings] == ["ecg.tachycardia"]


def _st(**leads: float) -> dict[str, float]:
    values = {lead: 0.0 for lead in LEAD_NAMES}
    values.update(leads)
    return values


def test_st_elevation_needs_two_contiguous_leads(rules: RuleSet) -> None:
    inferior = triage_ecg(_measurements(st_deviation_mv=_st(II=0.15, aVF=0.2)), rules=rules)
    finding = _finding(inferior, "ecg.stemi")
    assert {(e.lead, e.value, e.threshold) for e in finding.evidence} == {("II", 0.15, 0.1), ("aVF", 0.2, 0.1)}
    scattered = _measurements(st_deviation_mv=_st(II=0.3, V5=0.3))
    assert triage_ecg(scattered, rules=rules).level is Level.ROUTINE
    below_v2 = _measurements(st_deviation_mv=_st(V2=0.25, V3=0.25))
    assert triage_ecg(below_v2, rules=rules).level is Level.ROUTINE


def test_st_depression_is_urgent_with_negative_evidence(rules: RuleSet) -> None:
    result = triage_ecg(_measurements(st_deviation_mv=_st(V5=-0.15, V6=-0.12)), rules=rules)
    finding = _finding(result, "ecg.st_depression")
    assert result.level is Level.URGENT
    assert {(e.lead, e.threshold) for e in finding.evidence} == {("V5", -0.1), ("V6", -0.1)}


def test_st_rules_do_not_apply_to_wide_qrs(rules: RuleSet) -> None:
    m = _measurements(qrs_duration_ms=160.0, st_deviation_mv=_st(V1=0.5, V2=0.6, V3=0.5))
    assert [f.code for f in triage_ecg(m, rules=rules).findings] == ["ecg.wide_qrs"]


def test_lead_names_match_case_insensitively(rules: RuleSet) -> None:
    m = _measurements(st_deviation_mv={"II": 0.2, "III": 0.2, "AVF": 0.2})
    assert {e.lead for e in _finding(triage_ecg(m, rules=rules), "ecg.stemi").evidence} == {"II", "III", "AVF"}


# --- priority, indication, score, serialisation ------------------------------------------------


def test_stat_priority_is_at_least_urgent(rules: RuleSet) -> None:
    result = triage_ecg(_measurements(), rules=rules, priority="stat")
    assert result.level is Level.URGENT
    assert [f.code for f in result.findings] == ["request.priority.stat"]
    assert triage_ecg(_measurements(), rules=rules, priority="routine").level is Level.ROUTINE
    assert triage_ecg(_measurements(), rules=rules, priority="").level is Level.ROUTINE
    critical = triage_ecg(_measurements(longest_pause_s=4.0), rules=rules, priority="stat")
    assert critical.level is Level.CRITICAL


def test_chest_pain_ecg_is_due_in_ten_minutes(rules: RuleSet) -> None:
    result = triage_ecg(_measurements(), rules=rules, indication="胸痛2小时")
    assert result.level is Level.CRITICAL and result.sla_minutes == 10
    assert result.findings[0].code == "ecg.indication.chest_pain"


def test_score_is_monotone_in_level_and_severity(rules: RuleSet) -> None:
    routine = triage_ecg(_measurements(), rules=rules).score
    urgent = triage_ecg(_measurements(heart_rate_bpm=125.0), rules=rules).score
    mild = triage_ecg(_measurements(longest_pause_s=3.1), rules=rules).score
    severe = triage_ecg(_measurements(longest_pause_s=6.5), rules=rules).score
    assert 0.0 <= routine < urgent < mild < severe <= 1.0


def test_result_round_trips_through_json(rules: RuleSet) -> None:
    m = _measurements(heart_rate_bpm=190.0, rr_irregularity=0.2, regular=False, st_deviation_mv=_st(V5=-0.2, V6=-0.2))
    result = triage_ecg(m, rules=rules, priority="stat", indication="palpitations")
    data = json.loads(json.dumps(result.to_dict(), ensure_ascii=False))
    assert data["level"] == "critical" and data["rules_version"] == rules.version
    again = TriageResult.from_dict(data)
    assert again == result and again.level is Level.CRITICAL


def test_summary_and_findings_never_echo_the_indication(rules: RuleSet) -> None:
    indication = "Zhang San 张三 MRN 12345678, chest pain, r/o STEMI"
    result = triage_ecg(_measurements(longest_pause_s=3.4), rules=rules, indication=indication)
    text = json.dumps(result.to_dict(), ensure_ascii=False)
    for secret in ("Zhang", "张三", "12345678"):
        assert secret not in text
    assert "3.4" in result.summary and "3" in result.summary


def test_unmeasurable_ecg_is_queued_for_a_human(rules: RuleSet) -> None:
    result = unmeasurable_ecg(priority="routine", reason="ECG_TOO_SHORT", rules=rules)
    assert result.level is Level.URGENT and "ECG_TOO_SHORT" in result.findings[0].title
    injected = unmeasurable_ecg(priority="stat", reason="x<script> Zhang", rules=rules)
    assert "<script>" not in injected.summary and "Zhang" not in injected.summary


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("indication", "priority", "level", "code"),
    [
        ("cough for 3 days", "routine", Level.ROUTINE, None),
        ("cough for 3 days", "stat", Level.URGENT, "request.priority.stat"),
        ("Code stroke, left hemiparesis", "routine", Level.CRITICAL, "image.indication.stroke"),
        ("突发右侧肢体无力，疑似脑卒中", "routine", Level.CRITICAL, "image.indication.stroke"),
        ("fall, trauma to chest", "routine", Level.URGENT, "image.indication.trauma"),
        ("pneumothorax?", "routine", Level.URGENT, "image.indication.pneumothorax"),
        ("右侧气胸复查", "routine", Level.URGENT, "image.indication.pneumothorax"),
        ("left tension pneumothorax?", "routine", Level.CRITICAL, "image.indication.tension_pneumothorax"),
        ("headache, r/o subarachnoid HEMORRHAGE", "urgent", Level.CRITICAL, "image.indication.hemorrhage"),
        ("脑出血术后", "routine", Level.CRITICAL, "image.indication.hemorrhage"),
        ("GI bleeding", "routine", Level.CRITICAL, "image.indication.hemorrhage"),
        ("nonbleeding polyp follow-up", "routine", Level.ROUTINE, None),
    ],
)
def test_image_triage(rules: RuleSet, indication: str, priority: str, level: Level, code: str | None) -> None:
    result = triage_image(modality="CT", priority=priority, indication=indication, rules=rules)
    assert result.level is level
    assert result.sla_minutes == rules.sla_minutes[level]
    if code is None:
        assert result.findings == []
    else:
        assert result.findings[0].code == code
    assert indication not in result.summary


MINIMAL_RULES = """
version = "minimal-1"
[levels]
sla_minutes = { critical = 5, urgent = 30, routine = 600 }
score_bands = { routine = [0.0, 0.3], urgent = [0.35, 0.65], critical = [0.7, 1.0] }
[priority_floor]
stat = "critical"
[[image.keywords]]
code = "image.indication.stroke"
level = "critical"
title = "Suspected acute stroke"
words = ["stroke"]
modalities = ["CT", "MR"]
"""


def test_a_minimal_rule_file_limits_keywords_to_modalities(tmp_path: Path) -> None:
    path = tmp_path / "minimal.toml"
    path.write_text(MINIMAL_RULES, encoding="utf-8")
    minimal = load_rules(path)
    assert minimal.ecg_rules == () and minimal.ecg_unmeasurable.code == "ecg.unmeasurable"
    ct = triage_image(modality="ct", priority="routine", indication="stroke", rules=minimal)
    dx = triage_image(modality="DX", priority="routine", indication="stroke", rules=minimal)
    assert ct.level is Level.CRITICAL and ct.sla_minutes == 5 and dx.level is Level.ROUTINE
    stat = triage_image(modality="DX", priority="STAT", indication="", rules=minimal)
    assert stat.level is Level.CRITICAL


# --- real data sanity check ---------------------------------------------------------------------


@needs_datasets("ptbxl-fold9-val.npz")
def test_ptbxl_fold9_normals_are_rarely_critical(rules: RuleSet) -> None:
    data = np.load(DATASETS / "ptbxl-fold9-val.npz")
    leads = [str(n) for n in data["lead_names"]]
    classes = [str(c) for c in data["superclass_names"]]
    norm_critical, norm_total, ischaemic_st, ischaemic_total = 0, 0, 0, 0
    for i in range(data["X"].shape[0]):
        m = measure_ecg(data["X"][i] / 1000.0, fs=float(data["fs"]), lead_names=leads)
        result = triage_ecg(m, rules=rules)
        labels = {c for c, flag in zip(classes, data["y_super"][i]) if flag}
        codes = {f.code for f in result.findings}
        if labels == {"NORM"}:
            norm_total += 1
            norm_critical += result.level is Level.CRITICAL
        if labels & {"MI", "STTC"}:
            ischaemic_total += 1
            ischaemic_st += bool(codes & {"ecg.stemi", "ecg.st_depression"})
    assert norm_total >= 30 and norm_critical / norm_total <= 0.1
    assert ischaemic_total >= 20 and ischaemic_st >= 1  # a sanity check, not a benchmark
