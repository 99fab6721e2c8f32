"""The triage result's one schema: JSON round trip, the protobuf form readers get, and the stored
JSON of an earlier version still read."""

from __future__ import annotations

import json

from teleread.messages import triage_message
from teleread.triage_result import Evidence, Finding, TriageResult
from teleread.v1 import common_pb2
from teleread.vocab import Level

RESULT = TriageResult(
    level=Level.CRITICAL,
    score=0.93,
    findings=[
        Finding("PAUSE", "Sinus pause 3.8 s", Level.CRITICAL, [Evidence("longest_pause", 3.8, "s", "II", 3.0)]),
        Finding("ST_ELEVATION", "ST elevation", Level.URGENT, [Evidence("st", 0.21, "mV", "V2")]),
    ],
    rules_version="rules-3",
    summary="pause 3.8 s",
    sla_minutes=10,
    models=("ecg_rhythm@2",),
)


def test_json_round_trip_keeps_every_field() -> None:
    assert TriageResult.from_json(RESULT.to_json()) == RESULT
    assert "暂停" in TriageResult.from_json(RESULT.to_json().replace("pause 3.8 s", "暂停")).to_json()


def test_protobuf_form_carries_levels_evidence_and_thresholds() -> None:
    msg = triage_message(RESULT.to_json())
    assert msg is not None
    assert msg.level == common_pb2.LEVEL_CRITICAL and abs(msg.score - 0.93) < 1e-9
    assert [f.level for f in msg.findings] == [common_pb2.LEVEL_CRITICAL, common_pb2.LEVEL_URGENT]
    pause = msg.findings[0].evidence[0]
    assert (pause.name, pause.value, pause.unit, pause.lead, pause.threshold) == ("longest_pause", 3.8, "s", "II", 3.0)
    assert msg.findings[1].evidence[0].threshold == 0.0  # no threshold: 0 on the wire
    assert list(msg.models) == ["ecg_rhythm@2"] and msg.rules_version == "rules-3"
    assert triage_message("") is None


def test_stored_json_without_the_newer_keys_is_read() -> None:
    old = {"level": "urgent", "score": 0.5, "findings": [], "rules_version": "rules-1"}
    result = TriageResult.from_json(json.dumps(old))
    assert (result.level, result.summary, result.sla_minutes, result.models) == (Level.URGENT, "", 0, ())
