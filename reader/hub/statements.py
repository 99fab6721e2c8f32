"""The ECG statement library and the checks of what an ECG report carries beside its text.

The library (``teleread/defaults/ecg_statements.toml``) is data: groups as a cardiologist reads an
ECG (overall, rhythm, conduction, axis, chamber, ischaemia, repolarisation, pacing, technical), each
statement with a stable code, English and Chinese text, and which triage finding codes suggest which
statements (an ST finding by the territory its leads fall in). It is loaded and checked once at the
hub; a malformed file stops the hub naming the entry, never a report.

A report's statements are checked against the library (an unknown code is refused naming it; the
text is always the library's), and the reader's measurements against plausible ranges. Statement
codes and measurement names are vocabulary, never patient data, so errors may name them.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from teleread.errors import InvalidInput

CODE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
SOURCES = ("machine", "reader")
MAX_STATEMENTS = 60
# Plausible values of a reader's ECG measurement (ms unless named): outside them it is a typo.
RANGES: Mapping[str, tuple[float, float]] = {
    "heart_rate_bpm": (10.0, 350.0),
    "rr_ms": (150.0, 6000.0),
    "pr_ms": (40.0, 600.0),
    "qrs_ms": (40.0, 300.0),
    "qt_ms": (150.0, 800.0),
    "qtc_bazett_ms": (150.0, 800.0),
    "qtc_fridericia_ms": (150.0, 800.0),
    "p_axis_deg": (-180.0, 180.0),
    "qrs_axis_deg": (-180.0, 180.0),
    "t_axis_deg": (-180.0, 180.0),
}


class LibraryError(ValueError):
    """The statement library's file is malformed (names the entry, never a report)."""


@dataclass(frozen=True)
class Group:
    code: str
    title: str
    title_zh: str


@dataclass(frozen=True)
class Statement:
    code: str
    group: str
    text: str
    text_zh: str
    suggested_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suggestion:
    """A triage finding ``finding`` suggests ``statements``; with ``leads``, only when its evidence
    names at least ``min_leads`` of them."""

    finding: str
    statements: tuple[str, ...]
    leads: tuple[str, ...] = ()
    min_leads: int = 2


@dataclass(frozen=True)
class ReportStatement:
    """A statement of one report version: the library's text, who proposed it, whether confirmed."""

    code: str
    text: str
    text_zh: str
    source: str = "reader"
    confirmed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "text": self.text,
            "text_zh": self.text_zh,
            "source": self.source,
            "confirmed": self.confirmed,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ReportStatement:
        return cls(
            code=str(raw["code"]),
            text=str(raw.get("text") or ""),
            text_zh=str(raw.get("text_zh") or ""),
            source=str(raw.get("source") or "reader"),
            confirmed=bool(raw.get("confirmed", True)),
        )


@dataclass(frozen=True)
class StatementLibrary:
    version: str
    groups: tuple[Group, ...]
    statements: tuple[Statement, ...]
    suggestions: tuple[Suggestion, ...] = ()
    by_code: Mapping[str, Statement] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_code", {s.code: s for s in self.statements})

    def suggest(self, findings: Iterable[Mapping[str, Any]]) -> list[ReportStatement]:
        """The statements a triage's findings (``{"code", "evidence": [{"lead"}...]}``) suggest, in
        the library's order, each once: source "machine", not confirmed."""
        wanted: set[str] = set()
        for finding in findings:
            leads = {str(e.get("lead") or "").upper() for e in finding.get("evidence") or ()} - {""}
            for rule in self.suggestions:
                if rule.finding != finding.get("code"):
                    continue
                if rule.leads and len(leads & {x.upper() for x in rule.leads}) < rule.min_leads:
                    continue
                wanted.update(rule.statements)
        return [
            ReportStatement(code=s.code, text=s.text, text_zh=s.text_zh, source="machine", confirmed=False)
            for s in self.statements
            if s.code in wanted
        ]

    def checked(self, raw: Sequence[Mapping[str, Any]], *, signed: bool = False) -> list[ReportStatement]:
        """A report's statements, checked: known codes (refused naming the first unknown one), each
        once, a known source; the text is the library's. ``signed``: only the confirmed ones."""
        if len(raw) > MAX_STATEMENTS:
            raise InvalidInput(f"a report holds at most {MAX_STATEMENTS} statements", reason="TOO_MANY_STATEMENTS")
        out: list[ReportStatement] = []
        seen: set[str] = set()
        for item in raw:
            code = str(item.get("code") or "")
            known = self.by_code.get(code)
            if known is None:
                shown = code[:64] if CODE.match(code[:64]) else "(not a statement code)"
                raise InvalidInput(
                    f"unknown statement code {shown}", reason="UNKNOWN_STATEMENT", metadata={"code": shown}
                )
            source = str(item.get("source") or "reader")
            if source not in SOURCES:
                raise InvalidInput("a statement's source is machine or reader", reason="BAD_STATEMENT_SOURCE")
            if code in seen:
                continue
            seen.add(code)
            confirmed = bool(item.get("confirmed")) or source == "reader"
            if signed and not confirmed:
                continue
            out.append(ReportStatement(known.code, known.text, known.text_zh, source, confirmed))
        return out


def checked_measurements(values: Mapping[str, float], edited: Iterable[str] = ()) -> tuple[dict[str, float], list[str]]:
    """The reader's measurements (name -> value) in range, and which of them the reader edited."""
    out: dict[str, float] = {}
    for name, value in values.items():
        bounds = RANGES.get(name)
        if bounds is None:
            raise InvalidInput(f"unknown measurement {name[:40]}", reason="UNKNOWN_MEASUREMENT")
        number = float(value)
        if not math.isfinite(number) or not bounds[0] <= number <= bounds[1]:
            raise InvalidInput(
                f"{name} must be within {bounds[0]:g}..{bounds[1]:g}",
                reason="MEASUREMENT_OUT_OF_RANGE",
                metadata={"measurement": name},
            )
        out[name] = round(number, 1)
    marked = sorted({str(n) for n in edited if str(n) in out})
    return out, marked


# ---- loading ------------------------------------------------------------------------------------


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise LibraryError(f"{where}: {key} is missing or empty")
    return value.strip()


def parse_library(data: Mapping[str, Any]) -> StatementLibrary:
    """A library from its TOML document, checked: unique codes of the right shape, every statement
    in a declared group with English and Chinese text, every suggestion naming known statements."""
    groups: list[Group] = []
    for i, g in enumerate(data.get("groups") or ()):
        code = _text(g, "code", f"groups[{i}]")
        if code in {x.code for x in groups}:
            raise LibraryError(f"groups[{i}]: duplicate group {code}")
        groups.append(Group(code, _text(g, "title", f"group {code}"), _text(g, "title_zh", f"group {code}")))
    known_groups = {g.code for g in groups}
    raw_suggest = list(data.get("suggest") or ())
    statements: list[Statement] = []
    for i, s in enumerate(data.get("statements") or ()):
        code = _text(s, "code", f"statements[{i}]")
        if not CODE.match(code):
            raise LibraryError(f"statements[{i}]: code {code!r} is not of the form group.name")
        if code in {x.code for x in statements}:
            raise LibraryError(f"statements[{i}]: duplicate code {code}")
        group = _text(s, "group", f"statement {code}")
        if group not in known_groups:
            raise LibraryError(f"statement {code}: unknown group {group}")
        by = tuple(str(r["finding"]) for r in raw_suggest if code in (r.get("statements") or ()))
        statements.append(
            Statement(code, group, _text(s, "text", f"statement {code}"), _text(s, "text_zh", f"statement {code}"), by)
        )
    if not statements:
        raise LibraryError("the library has no statements")
    codes = {s.code for s in statements}
    suggestions: list[Suggestion] = []
    for i, r in enumerate(raw_suggest):
        finding = _text(r, "finding", f"suggest[{i}]")
        targets = tuple(str(x) for x in r.get("statements") or ())
        unknown = [t for t in targets if t not in codes]
        if not targets or unknown:
            raise LibraryError(f"suggest[{i}] ({finding}): unknown or no statements {unknown}")
        leads = tuple(str(x) for x in r.get("leads") or ())
        suggestions.append(Suggestion(finding, targets, leads, int(r.get("min_leads", 2))))
    order = {g.code: i for i, g in enumerate(groups)}
    statements.sort(key=lambda s: order[s.group])  # stable: the file's order within a group
    return StatementLibrary(
        version=str(data.get("version") or ""),
        groups=tuple(groups),
        statements=tuple(statements),
        suggestions=tuple(suggestions),
    )


def load_library(path: Path | None = None) -> StatementLibrary:
    """The library at ``path``, or the one shipped with teleread."""
    if path is None:
        raw = (resources.files("teleread") / "defaults" / "ecg_statements.toml").read_text(encoding="utf-8")
    else:
        raw = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise LibraryError(f"the statement library is not valid TOML: {exc}") from None
    return parse_library(data)
