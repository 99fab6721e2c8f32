"""The triage rule set: typed rules loaded and validated from a TOML file.

The rules are data, not code (CLINICAL.md): the ECG critical-value thresholds, the ST-deviation
criteria per contiguous lead group, the urgent-level rules, the indication keywords for ECG and
imaging, the requested-priority floors, the SLA minutes per level and the score bands.
``load_rules()`` reads the packaged ``rules/default.toml``; a hospital passes its own file.
Evaluation lives in :mod:`teleread.models.inference.triage`.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from teleread.errors import InvalidInput
from teleread.vocab import Level

log = logging.getLogger("teleread.models.inference.ecg_rules")

DEFAULT_RULES_PATH = Path(__file__).resolve().parents[1] / "rules" / "default.toml"

#: Measurements a threshold rule may test (attributes of ``EcgMeasurements``).
ECG_METRICS = frozenset(
    {
        "heart_rate_bpm",
        "longest_pause_s",
        "shortest_rr_s",
        "rr_cv",
        "rr_irregularity",
        "qrs_duration_ms",
        "n_beats",
        "duration_s",
    }
)
OPERATORS = frozenset({">=", ">", "<", "<="})


@dataclass(frozen=True)
class Condition:
    """``metric op value``, e.g. ``longest_pause_s >= 3.0`` (unit for display)."""

    metric: str
    op: str
    value: float
    unit: str

    def holds(self, measured: float) -> bool:
        if self.op == ">=":
            return measured >= self.value
        if self.op == ">":
            return measured > self.value
        if self.op == "<":
            return measured < self.value
        return measured <= self.value


@dataclass(frozen=True)
class ThresholdRule:
    code: str
    title: str
    level: Level
    when: tuple[Condition, ...]
    unless: tuple[str, ...] = ()


@dataclass(frozen=True)
class LeadGroup:
    name: str
    leads: tuple[str, ...]


@dataclass(frozen=True)
class StRule:
    """ST elevation or depression beyond a per-lead threshold in ``min_leads`` leads of a group."""

    code: str
    title: str
    level: Level
    direction: str  # "elevation" | "depression"
    min_leads: int
    default_threshold_mv: float
    thresholds_mv: Mapping[str, float]
    max_qrs_ms: float = 0.0  # > 0: the rule is not applied when QRS >= this (wide QRS)

    def threshold_for(self, lead: str) -> float:
        return self.thresholds_mv.get(lead.upper(), self.default_threshold_mv)


@dataclass(frozen=True)
class KeywordRule:
    """Raises the level when the request's indication mentions one of ``words``."""

    code: str
    title: str
    level: Level
    words: tuple[str, ...]
    modalities: tuple[str, ...] = ()


@dataclass(frozen=True)
class FixedRule:
    """A finding raised by a situation rather than a measurement (e.g. an unmeasurable ECG)."""

    code: str
    title: str
    level: Level


_DEFAULT_UNMEASURABLE = FixedRule(
    code="ecg.unmeasurable",
    title="ECG could not be measured automatically: read it manually",
    level=Level.URGENT,
)


@dataclass(frozen=True)
class RuleSet:
    version: str
    sla_minutes: Mapping[Level, int]
    score_bands: Mapping[Level, tuple[float, float]]
    priority_floor: Mapping[str, Level]
    ecg_rules: tuple[ThresholdRule, ...]
    lead_groups: tuple[LeadGroup, ...]
    st_rules: tuple[StRule, ...]
    ecg_keywords: tuple[KeywordRule, ...]
    image_keywords: tuple[KeywordRule, ...]
    ecg_unmeasurable: FixedRule = _DEFAULT_UNMEASURABLE


def load_rules(path: Path | None = None) -> RuleSet:
    """Read and validate a rule file (default: the packaged ``rules/default.toml``)."""
    source = path or DEFAULT_RULES_PATH
    try:
        with source.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError:
        raise InvalidInput("rule file cannot be read", reason="RULES_UNREADABLE") from None
    except tomllib.TOMLDecodeError:
        raise InvalidInput("rule file is not valid TOML", reason="RULES_INVALID") from None
    rules = parse_rules(raw)
    log.info("triage rules loaded", extra={"event": "rules_loaded", "count": len(rules.ecg_rules)})
    return rules


def parse_rules(raw: Mapping[str, Any]) -> RuleSet:
    """Build a :class:`RuleSet` from the TOML document's tables; InvalidInput names the problem."""
    try:
        return _parse(raw)
    except (KeyError, TypeError, ValueError) as exc:
        # Our own rule file: the key name is configuration, not patient data.
        raise InvalidInput(
            f"rule file is incomplete or malformed ({type(exc).__name__}: {exc})", reason="RULES_INVALID"
        ) from None


def _parse(raw: Mapping[str, Any]) -> RuleSet:
    levels = raw["levels"]
    ecg = raw.get("ecg", {})
    image = raw.get("image", {})
    version = str(raw["version"])
    if not version:
        raise ValueError("version is empty")
    names = {str(v) for v in Level}
    if not (set(levels["sla_minutes"]) >= names and set(levels["score_bands"]) >= names):
        raise ValueError("sla_minutes and score_bands need critical, urgent and routine")
    ecg_rules = tuple(_threshold_rule(r) for r in ecg.get("rules", []))
    if len({r.code for r in ecg_rules}) != len(ecg_rules):
        raise ValueError("ECG rule codes must be unique")
    return RuleSet(
        version=version,
        sla_minutes={_level(k): int(v) for k, v in levels["sla_minutes"].items()},
        score_bands={_level(k): _band(v) for k, v in levels["score_bands"].items()},
        priority_floor={str(k).lower(): _level(v) for k, v in raw["priority_floor"].items()},
        ecg_rules=ecg_rules,
        lead_groups=tuple(
            LeadGroup(name=str(g["name"]), leads=tuple(str(x) for x in g["leads"])) for g in ecg.get("lead_groups", [])
        ),
        st_rules=tuple(_st_rule(r) for r in ecg.get("st_rules", [])),
        ecg_keywords=tuple(_keyword_rule(r) for r in ecg.get("keywords", [])),
        image_keywords=tuple(_keyword_rule(r) for r in image.get("keywords", [])),
        ecg_unmeasurable=_fixed_rule(ecg["unmeasurable"]) if "unmeasurable" in ecg else _DEFAULT_UNMEASURABLE,
    )


def _level(value: Any) -> Level:
    try:
        return Level(str(value).lower())
    except ValueError:
        raise ValueError(f"unknown level {value!r}") from None


def _band(value: Any) -> tuple[float, float]:
    low, high = (float(x) for x in value)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError("score band must satisfy 0 <= low <= high <= 1")
    return low, high


def _condition(raw: Mapping[str, Any]) -> Condition:
    metric, op = str(raw["metric"]), str(raw["op"])
    if metric not in ECG_METRICS:
        raise ValueError(f"unknown ECG metric {metric!r}")
    if op not in OPERATORS:
        raise ValueError(f"unknown operator {op!r}")
    return Condition(metric=metric, op=op, value=float(raw["value"]), unit=str(raw.get("unit", "")))


def _threshold_rule(raw: Mapping[str, Any]) -> ThresholdRule:
    when = tuple(_condition(c) for c in raw["when"])
    if not when:
        raise ValueError(f"rule {raw['code']!r} has no conditions")
    return ThresholdRule(
        code=str(raw["code"]),
        title=str(raw["title"]),
        level=_level(raw["level"]),
        when=when,
        unless=tuple(str(u) for u in raw.get("unless", [])),
    )


def _st_rule(raw: Mapping[str, Any]) -> StRule:
    direction = str(raw["direction"])
    if direction not in ("elevation", "depression"):
        raise ValueError(f"unknown ST direction {direction!r}")
    if int(raw.get("min_leads", 2)) < 1:
        raise ValueError("min_leads must be >= 1")
    return StRule(
        code=str(raw["code"]),
        title=str(raw["title"]),
        level=_level(raw["level"]),
        direction=direction,
        min_leads=int(raw.get("min_leads", 2)),
        default_threshold_mv=float(raw["default_threshold_mv"]),
        thresholds_mv={str(k).upper(): float(v) for k, v in raw.get("thresholds_mv", {}).items()},
        max_qrs_ms=float(raw.get("max_qrs_ms", 0.0)),
    )


def _keyword_rule(raw: Mapping[str, Any]) -> KeywordRule:
    words = tuple(str(w) for w in raw["words"] if str(w).strip())
    if not words:
        raise ValueError(f"keyword rule {raw['code']!r} has no words")
    return KeywordRule(
        code=str(raw["code"]),
        title=str(raw["title"]),
        level=_level(raw["level"]),
        words=words,
        modalities=tuple(str(m).upper() for m in raw.get("modalities", [])),
    )


def _fixed_rule(raw: Mapping[str, Any]) -> FixedRule:
    return FixedRule(code=str(raw["code"]), title=str(raw["title"]), level=_level(raw["level"]))
