"""The ECG statement library: the shipped file loads and is complete; malformed files are refused
naming the entry; suggestions follow the triage findings (ST by territory); a report's statements
and measurements are checked (unknown codes refused naming them, values in plausible ranges)."""

from __future__ import annotations

from typing import Any

import pytest

from teleread.errors import InvalidInput
from teleread.reader.hub.statements import LibraryError, checked_measurements, load_library, parse_library


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": "t",
        "groups": [{"code": "rhythm", "title": "Rhythm", "title_zh": "心律"}],
        "statements": [{"code": "rhythm.sinus", "group": "rhythm", "text": "Sinus rhythm", "text_zh": "窦性心律"}],
        "suggest": [],
    }
    doc.update(over)
    return doc


def test_the_shipped_library_is_complete() -> None:
    lib = load_library()
    assert 60 <= len(lib.statements) <= 100
    groups = [g.code for g in lib.groups]
    for wanted in ("overall", "rhythm", "conduction", "axis", "chamber", "ischaemia", "repolarisation", "pacing"):
        assert wanted in groups
    assert lib.by_code["rhythm.sinus"].text_zh == "窦性心律"
    assert lib.by_code["rhythm.af_rvr"].text_zh == "心房颤动伴快速心室率"
    assert lib.by_code["ischaemia.stemi_inferior"].text == "Acute inferior ST-elevation myocardial infarction"
    assert lib.by_code["ischaemia.stemi_inferior"].text_zh == "急性下壁ST段抬高型心肌梗死"
    assert "ecg.af_rvr" in lib.by_code["rhythm.af_rvr"].suggested_by
    # in group order, every statement with both languages
    order = [groups.index(s.group) for s in lib.statements]
    assert order == sorted(order) and all(s.text and s.text_zh for s in lib.statements)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"statements": [{"code": "Sinus", "group": "rhythm", "text": "x", "text_zh": "x"}]}, "group.name"),
        ({"statements": [{"code": "rhythm.x", "group": "nope", "text": "x", "text_zh": "x"}]}, "unknown group"),
        ({"statements": [{"code": "rhythm.x", "group": "rhythm", "text": "x"}]}, "text_zh"),
        (
            {"statements": [{"code": "rhythm.x", "group": "rhythm", "text": "x", "text_zh": "x"}] * 2},
            "duplicate code rhythm.x",
        ),
        ({"suggest": [{"finding": "ecg.pause", "statements": ["rhythm.nope"]}]}, "rhythm.nope"),
        ({"statements": []}, "no statements"),
    ],
)
def test_malformed_libraries_are_refused_naming_the_entry(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(LibraryError, match=needle):
        parse_library(_doc(**change))


def test_suggestions_follow_the_findings_and_the_st_territory() -> None:
    lib = load_library()
    af = lib.suggest([{"code": "ecg.af_rvr", "evidence": [{"lead": "II"}]}, {"code": "ecg.pause"}])
    assert [s.code for s in af] == ["rhythm.long_pause", "rhythm.af_rvr"]  # the library's order
    assert all(s.source == "machine" and not s.confirmed for s in af)
    inferior = [{"code": "ecg.stemi", "evidence": [{"lead": "II"}, {"lead": "III"}, {"lead": "aVF"}]}]
    assert [s.code for s in lib.suggest(inferior)] == ["ischaemia.stemi_inferior"]
    one_lead = [{"code": "ecg.stemi", "evidence": [{"lead": "II"}, {"lead": "V5"}]}]
    assert lib.suggest(one_lead) == []  # no territory has two of its leads
    assert lib.suggest([{"code": "image.model.pneumonia"}]) == []


def test_report_statements_are_checked_against_the_library() -> None:
    lib = load_library()
    raw = [
        {"code": "rhythm.af_rvr", "source": "machine", "confirmed": True},
        {"code": "rhythm.long_pause", "source": "machine", "confirmed": False},
        {"code": "repol.nonspecific_st_t", "source": "reader"},
        {"code": "rhythm.af_rvr", "source": "reader"},  # twice: kept once
    ]
    draft = lib.checked(raw)
    assert [s.code for s in draft] == ["rhythm.af_rvr", "rhythm.long_pause", "repol.nonspecific_st_t"]
    assert draft[0].text == "Atrial fibrillation with rapid ventricular response"  # the library's text
    signed = lib.checked(raw, signed=True)
    assert [s.code for s in signed] == ["rhythm.af_rvr", "repol.nonspecific_st_t"]
    with pytest.raises(InvalidInput, match="unknown statement code rhythm.made_up") as err:
        lib.checked([{"code": "rhythm.made_up"}])
    assert err.value.reason == "UNKNOWN_STATEMENT"
    with pytest.raises(InvalidInput, match="not a statement code"):
        lib.checked([{"code": "Wang Xiaoming 19560304"}])  # never echoed: it could be anything
    with pytest.raises(InvalidInput) as err:
        lib.checked([{"code": "rhythm.sinus", "source": "robot"}])
    assert err.value.reason == "BAD_STATEMENT_SOURCE"


def test_measurements_must_be_plausible() -> None:
    values, edited = checked_measurements({"heart_rate_bpm": 142.0, "qtc_bazett_ms": 452.04}, ["qtc_bazett_ms", "x"])
    assert values == {"heart_rate_bpm": 142.0, "qtc_bazett_ms": 452.0} and edited == ["qtc_bazett_ms"]
    for bad in ({"qrs_ms": 5.0}, {"heart_rate_bpm": 900.0}, {"qrs_axis_deg": 270.0}, {"pr_ms": float("nan")}):
        with pytest.raises(InvalidInput) as err:
            checked_measurements(bad)
        assert err.value.reason == "MEASUREMENT_OUT_OF_RANGE"
    with pytest.raises(InvalidInput) as err:
        checked_measurements({"weight_kg": 70.0})
    assert err.value.reason == "UNKNOWN_MEASUREMENT"
