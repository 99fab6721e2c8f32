"""The triage result's schema, defined once, with its JSON form (``exams.triage_json``, written by
the triage worker) and its protobuf form (``teleread.v1.Triage``, read by readers) beside it.

Every finding carries the measured evidence and the threshold it was compared with; the summary is
short English with numbers and never patient data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from teleread.v1 import common_pb2
from teleread.vocab import Level

LEVELS = {
    Level.CRITICAL: common_pb2.LEVEL_CRITICAL,
    Level.URGENT: common_pb2.LEVEL_URGENT,
    Level.ROUTINE: common_pb2.LEVEL_ROUTINE,
}


@dataclass(frozen=True)
class Evidence:
    name: str
    value: float
    unit: str = ""
    lead: str = ""
    threshold: float | None = None
    at_s: float | None = None  # where on the trace, s from the record's start
    duration_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "lead": self.lead,
            "threshold": self.threshold,
        }
        if self.at_s is not None:
            out["at_s"] = self.at_s
            out["duration_s"] = self.duration_s or 0.0
        return out

    @classmethod
    def from_dict(cls, e: Mapping[str, Any]) -> Evidence:
        return cls(
            name=str(e["name"]),
            value=float(e["value"]),
            unit=str(e.get("unit") or ""),
            lead=str(e.get("lead") or ""),
            threshold=None if e.get("threshold") is None else float(e["threshold"]),
            at_s=None if e.get("at_s") is None else float(e["at_s"]),
            duration_s=None if e.get("duration_s") is None else float(e["duration_s"]),
        )

    def to_proto(self) -> common_pb2.Evidence:
        return common_pb2.Evidence(
            name=self.name,
            value=self.value,
            unit=self.unit,
            lead=self.lead,
            threshold=self.threshold or 0.0,
            at_s=self.at_s or 0.0,
            duration_s=self.duration_s or 0.0,
        )


# The measured values an ECG's triage result keeps (EcgMeasurements in common.proto), ms unless named.
ECG_VALUES = (
    "heart_rate_bpm", "rr_ms", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms", "qtc_fridericia_ms",
    "p_axis_deg", "qrs_axis_deg", "t_axis_deg",
)  # fmt: skip


@dataclass(frozen=True)
class EcgSummary:
    """An ECG's measurements as readers see them; a value not measured is absent from ``values``."""

    values: Mapping[str, float] = field(default_factory=dict)
    rhythm_lead: str = ""
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": {k: self.values[k] for k in ECG_VALUES if k in self.values},
            "rhythm_lead": self.rhythm_lead,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EcgSummary:
        values = data.get("values") or {}
        return cls(
            values={k: float(values[k]) for k in ECG_VALUES if values.get(k) is not None},
            rhythm_lead=str(data.get("rhythm_lead") or ""),
            method=str(data.get("method") or ""),
        )

    def to_proto(self) -> common_pb2.EcgMeasurements:
        return common_pb2.EcgMeasurements(
            **{k: v for k, v in self.values.items() if k in ECG_VALUES},
            rhythm_lead=self.rhythm_lead,
            method=self.method,
        )


@dataclass(frozen=True)
class Finding:
    code: str
    title: str
    level: Level
    evidence: list[Evidence] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "title": self.title,
            "level": str(self.level),
            "evidence": [e.to_dict() for e in self.evidence],
        }

    @classmethod
    def from_dict(cls, f: Mapping[str, Any]) -> Finding:
        return cls(
            code=str(f["code"]),
            title=str(f["title"]),
            level=Level(f["level"]),
            evidence=[Evidence.from_dict(e) for e in f.get("evidence", [])],
        )

    def to_proto(self) -> common_pb2.Finding:
        return common_pb2.Finding(
            code=self.code, title=self.title, level=LEVELS[self.level], evidence=[e.to_proto() for e in self.evidence]
        )


@dataclass(frozen=True)
class TriageResult:
    level: Level
    score: float
    findings: list[Finding]
    rules_version: str
    summary: str
    sla_minutes: int
    models: tuple[str, ...] = ()  # name@version of every learned model that contributed
    ecg: EcgSummary | None = None  # an ECG's measurements

    def to_dict(self) -> dict[str, Any]:
        out = {
            "level": str(self.level),
            "score": self.score,
            "findings": [f.to_dict() for f in self.findings],
            "rules_version": self.rules_version,
            "summary": self.summary,
            "sla_minutes": self.sla_minutes,
            "models": list(self.models),
        }
        if self.ecg is not None:
            out["ecg"] = self.ecg.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TriageResult:
        return cls(
            level=Level(data["level"]),
            score=float(data["score"]),
            findings=[Finding.from_dict(f) for f in data.get("findings", [])],
            rules_version=str(data["rules_version"]),
            summary=str(data.get("summary", "")),
            sla_minutes=int(data.get("sla_minutes", 0)),
            models=tuple(str(m) for m in data.get("models", ())),
            ecg=None if not data.get("ecg") else EcgSummary.from_dict(data["ecg"]),
        )

    def to_json(self) -> str:
        """The ``exams.triage_json`` form (UTF-8 text, not ASCII-escaped)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> TriageResult:
        return cls.from_dict(json.loads(raw))

    def to_proto(self) -> common_pb2.Triage:
        return common_pb2.Triage(
            level=LEVELS[self.level],
            score=self.score,
            findings=[f.to_proto() for f in self.findings],
            rules_version=self.rules_version,
            summary=self.summary,
            models=list(self.models),
            ecg=None if self.ecg is None else self.ecg.to_proto(),
        )
