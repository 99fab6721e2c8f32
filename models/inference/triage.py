"""Triage: turn ECG measurements or an imaging request into a level, a score and findings.

``triage_ecg`` applies a :class:`~teleread.models.inference.ecg_rules.RuleSet` to
:class:`~teleread.models.inference.ecg_measure.EcgMeasurements`: threshold rules (pause, rate, rhythm,
QRS), ST-deviation rules over contiguous lead groups, indication keywords and the requested
priority. ``triage_image`` applies the priority floor and the indication keywords. Every finding
carries the measured evidence and the threshold it was compared with; the summary is short English
with numbers and never patient data. The result's schema, with its JSON and protobuf forms, is
:mod:`teleread.triage_result`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Sequence

from teleread.models.inference.ecg_rules import (
    KeywordRule,
    Level,
    RuleSet,
    StRule,
    ThresholdRule,
    load_rules,
)

from teleread.triage_result import Evidence, Finding, TriageResult

if TYPE_CHECKING:  # the measurement module imports wfdb; triage only reads its attributes
    from teleread.models.inference.ecg_measure import EcgMeasurements

__all__ = [
    "Evidence",
    "Finding",
    "Level",
    "Scored",
    "TriageResult",
    "compose",
    "ecg_findings",
    "load_rules",
    "triage_ecg",
    "triage_image",
    "unmeasurable_ecg",
]


@dataclass(frozen=True)
class Scored:
    """A finding with its severity, 0..1: how far past its threshold (sets the score in its level band)."""

    finding: Finding
    severity: float


_Scored = Scored


def ecg_findings(
    m: EcgMeasurements, *, rules: RuleSet, priority: str = "routine", indication: str = ""
) -> list[Scored]:
    """Every rule finding of one ECG (measurements, ST, indication, priority), unsorted."""
    scored = _threshold_findings(m, rules.ecg_rules)
    scored += [s for rule in rules.st_rules if (s := _st_finding(m, rule, rules)) is not None]
    scored += _keyword_findings(indication, rules.ecg_keywords, modality="ECG")
    scored += _priority_findings(priority, rules)
    return scored


def triage_ecg(m: EcgMeasurements, *, rules: RuleSet, priority: str = "routine", indication: str = "") -> TriageResult:
    """Level, score and findings of one ECG under ``rules`` (measurements only, no learned model)."""
    scored = ecg_findings(m, rules=rules, priority=priority, indication=indication)
    return _result(scored, rules=rules, context=ecg_context(m))


def image_findings(*, modality: str, priority: str, indication: str, rules: RuleSet) -> list[Scored]:
    scored = _keyword_findings(indication, rules.image_keywords, modality=modality)
    return scored + _priority_findings(priority, rules)


def compose(
    scored: list[Scored], *, rules: RuleSet, context: str, models: Sequence[str] = (), version: str = ""
) -> TriageResult:
    """One result from findings: the highest level wins; its strongest finding sets the score."""
    return _result(list(scored), rules=rules, context=context, models=tuple(models), version=version)


def triage_image(*, modality: str, priority: str, indication: str, rules: RuleSet) -> TriageResult:
    """Level, score and findings of one imaging exam from its request (priority, indication)."""
    scored = image_findings(modality=modality, priority=priority, indication=indication, rules=rules)
    return _result(scored, rules=rules, context=f"{modality.upper() or 'imaging'} request.")


def unmeasurable_ecg(*, priority: str, reason: str, rules: RuleSet) -> TriageResult:
    """Result for an ECG the measurement rejected: queued for a human, never dropped.

    ``reason`` is the stable reason code of the ``TelereadError`` (e.g. ``ECG_TOO_SHORT``).
    """
    fixed = rules.ecg_unmeasurable
    code = re.sub(r"[^A-Z0-9_]", "", reason.upper())[:64] or "UNKNOWN"
    finding = Finding(fixed.code, f"{fixed.title} ({code})", fixed.level, [])
    scored = [_Scored(finding, 0.0)] + _priority_findings(priority, rules)
    return _result(scored, rules=rules, context="No measurements.")


def _measured(m: EcgMeasurements, metric: str) -> float | None:
    value = getattr(m, metric)
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _severity(value: float, threshold: float) -> float:
    """Relative distance past the threshold, 0..1 (a zero threshold counts any excess as 1)."""
    if threshold == 0:
        return 1.0 if value != 0 else 0.0
    return min(1.0, abs(value - threshold) / abs(threshold))


def _threshold_findings(m: EcgMeasurements, rules: Sequence[ThresholdRule]) -> list[_Scored]:
    fired: dict[str, _Scored] = {}
    for rule in rules:
        values = [_measured(m, c.metric) for c in rule.when]
        if any(v is None or not c.holds(v) for v, c in zip(values, rule.when)):
            continue
        evidence = [
            _placed(m, Evidence(name=c.metric, value=round(float(v), 3), unit=c.unit, threshold=c.value))
            for v, c in zip(values, rule.when)
            if v is not None
        ]
        primary = rule.when[0]
        severity = _severity(evidence[0].value, primary.value)
        fired[rule.code] = _Scored(Finding(rule.code, rule.title, rule.level, evidence), severity)
    return [s for code, s in fired.items() if not any(u in fired for u in _rule(rules, code).unless)]


def _placed(m: EcgMeasurements, evidence: Evidence) -> Evidence:
    """The evidence with its place on the trace, for the values that have one (the longest pause)."""
    if evidence.name == "longest_pause_s" and m.longest_pause_at_s is not None:
        return replace(evidence, at_s=round(m.longest_pause_at_s, 3), duration_s=round(m.longest_pause_s, 3))
    return evidence


def _rule(rules: Sequence[ThresholdRule], code: str) -> ThresholdRule:
    return next(r for r in rules if r.code == code)


def _st_finding(m: EcgMeasurements, rule: StRule, rules: RuleSet) -> _Scored | None:
    """ST rule: leads past threshold, counted only where >= min_leads share a lead group."""
    qrs = m.qrs_duration_ms
    if rule.max_qrs_ms > 0 and qrs is not None and qrs >= rule.max_qrs_ms:
        return None
    st = {lead.upper(): (lead, value) for lead, value in m.st_deviation_mv.items()}
    sign = 1.0 if rule.direction == "elevation" else -1.0
    hits: dict[str, tuple[str, float, float]] = {}
    for group in rules.lead_groups:
        in_group = [(st[g.upper()][0], st[g.upper()][1], rule.threshold_for(g)) for g in group.leads if g.upper() in st]
        past = [h for h in in_group if sign * h[1] >= h[2]]
        if len(past) >= rule.min_leads:
            hits.update({lead: (lead, value, thr) for lead, value, thr in past})
    if not hits:
        return None
    evidence = [
        Evidence(name="st_deviation_mv", value=round(value, 3), unit="mV", lead=lead, threshold=round(sign * thr, 3))
        for lead, value, thr in hits.values()
    ]
    severity = max(_severity(abs(e.value), abs(e.threshold or 0.0)) for e in evidence)
    return _Scored(Finding(rule.code, rule.title, rule.level, evidence), severity)


def _keyword_findings(indication: str, rules: Iterable[KeywordRule], *, modality: str) -> list[_Scored]:
    text = indication.casefold()
    found: list[_Scored] = []
    for rule in rules:
        if rule.modalities and modality.upper() not in rule.modalities:
            continue
        word = next((w for w in rule.words if _mentions(text, w)), None)
        if word is not None:
            title = f'{rule.title} (indication mentions "{word}")'
            found.append(_Scored(Finding(rule.code, title, rule.level, []), 0.5))
    return found


def _mentions(text: str, word: str) -> bool:
    """Latin words match at a word start ("bleed" in "bleeding"); CJK text as a substring."""
    needle = word.casefold()
    if needle.isascii():
        return re.search(r"(?<![a-z0-9])" + re.escape(needle), text) is not None
    return needle in text


def _priority_findings(priority: str, rules: RuleSet) -> list[_Scored]:
    key = (priority or "routine").strip().lower()
    floor = rules.priority_floor.get(key, Level.ROUTINE)
    if floor is Level.ROUTINE:
        return []
    title = f"Requested priority {key.upper()}: at least {floor}"
    return [_Scored(Finding(f"request.priority.{key}", title, floor, []), 0.0)]


def _result(
    scored: list[_Scored], *, rules: RuleSet, context: str, models: tuple[str, ...] = (), version: str = ""
) -> TriageResult:
    scored.sort(key=lambda s: (-s.finding.level.rank, -s.severity))
    level = scored[0].finding.level if scored else Level.ROUTINE
    top = [s.severity for s in scored if s.finding.level is level]
    severity = max(top) if top else 0.0
    low, high = rules.score_bands[level]
    score = round(low + (high - low) * (0.3 + 0.7 * severity), 4)
    findings = [s.finding for s in scored]
    return TriageResult(
        level=level,
        score=score,
        findings=findings,
        rules_version=version or rules.version,
        summary=_summary(level, findings, context),
        sla_minutes=rules.sla_minutes[level],
        models=models,
    )


def ecg_context(m: EcgMeasurements) -> str:
    if m.n_beats < 2:
        return f"{m.n_beats} QRS detected in {m.duration_s:.1f} s."
    rhythm = "regular" if m.regular else "irregular"
    qrs = "QRS n/a" if m.qrs_duration_ms is None else f"QRS {m.qrs_duration_ms:.0f} ms"
    return (
        f"HR {m.heart_rate_bpm:.0f} bpm, {rhythm}, {qrs}, longest RR "
        f"{m.longest_pause_s:.2f} s, {m.n_beats} beats in {m.duration_s:.1f} s."
    )


def _format_evidence(evidence: Sequence[Evidence]) -> str:
    parts = []
    for e in evidence[:6]:
        where = f" in {e.lead}" if e.lead else ""
        limit = "" if e.threshold is None else f" vs {e.threshold:g}"
        parts.append(f"{e.name} {e.value:.3g}{(' ' + e.unit) if e.unit else ''}{where}{limit}")
    return "; ".join(parts)


def _summary(level: Level, findings: Sequence[Finding], context: str) -> str:
    if not findings:
        return f"{str(level).upper()}: no rule fired. {context}"
    lines = []
    for f in findings[:4]:
        detail = _format_evidence(f.evidence)
        lines.append(f"{f.title}" + (f" [{detail}]" if detail else ""))
    more = f" (+{len(findings) - 4} more)" if len(findings) > 4 else ""
    return f"{str(level).upper()}: " + " | ".join(lines) + more + f". {context}"
