"""The roster: who may read which exam, and who is on duty now.

Each reader (a cardiologist or radiologist of a lead hospital) has a grade (attending, trainee,
department head), subspecialties (neuro, chest, MSK, cardiac, ...), the sites and modalities they are
credentialed for (none listed: every site of their hospital, every modality of their specialty) and
shifts by the working-hours calendar (``reader/hub/workdays.py``). A reader with no roster entry is
an attending credentialed for everything and always on duty, so a hospital without a roster works
as before; a reader with a roster entry but no shifts is never on duty (only the explicit claim of
an exam they are credentialed for is open to them).

One rule decides, for the offer of a new exam, its alerts, claim-next and ``teleread read why``:
:func:`decide`. A reader may read an exam when they are enabled, of its hospital and specialty,
credentialed for its site and modality; an exam of a subspecialty is reserved for that
subspecialty's readers while one of them is on duty (otherwise any reader of the specialty takes
it). They are offered it when they may read it and are on duty. Claim-next asks the database with
the same rule (:meth:`Roster.scope`, the reader's :class:`ClaimScope`), so the explanation of a
decision and the decision agree; ``tests/test_roster.py`` checks they do.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from teleread.auth import READER_SPECIALTY
from teleread.db.engine import reading, utcnow
from teleread.db.schema import exams, principals, reader_profiles, shifts, sites
from teleread.errors import InvalidInput, NotFound
from teleread.reader.hub.workdays import WEEKDAYS, WorkCalendar, parse_hhmm
from teleread.vocab import ExamState, Grade, ShiftKind

READER_ROLES = tuple(str(role) for role in READER_SPECIALTY)
_DAY_WORDS = ("workdays", "restdays", "daily")


def _split(value: str | None) -> frozenset[str]:
    return frozenset(part.strip() for part in (value or "").split(",") if part.strip())


def _join(values: Iterable[str]) -> str:
    return ",".join(sorted({v.strip() for v in values if v.strip()}))


@dataclass(frozen=True)
class Shift:
    """A recurring shift: ``days`` by the calendar, local ``starts``-``ends`` (past midnight when
    ``ends`` is not after ``starts``: the shift belongs to the day it starts on)."""

    days: str
    starts: time
    ends: time
    kind: ShiftKind = ShiftKind.DUTY

    @classmethod
    def parse(cls, days: str, starts: str, ends: str, kind: str = "duty") -> Shift:
        words = [d.strip().lower() for d in str(days).split(",") if d.strip()]
        if not words:
            raise InvalidInput("a shift needs days", reason="BAD_ROSTER")
        for word in words:
            if word not in _DAY_WORDS and word not in WEEKDAYS:
                try:
                    date.fromisoformat(word)
                except ValueError as exc:
                    raise InvalidInput(
                        "shift days are workdays, restdays, daily, mon..sun or dates YYYY-MM-DD", reason="BAD_ROSTER"
                    ) from exc
        try:
            shift_kind = ShiftKind(kind)
        except ValueError as exc:
            raise InvalidInput("a shift's kind is duty or on_call", reason="BAD_ROSTER") from exc
        return cls(",".join(words), parse_hhmm(starts, what="shift start"), parse_hhmm(ends, what="shift end"),
                   shift_kind)  # fmt: skip

    def _day_matches(self, day: date, calendar: WorkCalendar) -> bool:
        for word in self.days.split(","):
            if word == "daily":
                return True
            if word == "workdays" and calendar.is_workday(day):
                return True
            if word == "restdays" and not calendar.is_workday(day):
                return True
            if word in WEEKDAYS and WEEKDAYS[day.weekday()] == word:
                return True
            if word == day.isoformat():
                return True
        return False

    def covers(self, at: datetime, calendar: WorkCalendar) -> bool:
        local = calendar.local(at)
        now, today = local.time(), local.date()
        if self.starts < self.ends:
            return self._day_matches(today, calendar) and self.starts <= now < self.ends
        return (self._day_matches(today, calendar) and now >= self.starts) or (
            self._day_matches(today - timedelta(days=1), calendar) and now < self.ends
        )

    def describe(self) -> str:
        return f"{self.days} {self.starts:%H:%M}-{self.ends:%H:%M}" + (" on call" if self.kind == "on_call" else "")


@dataclass(frozen=True)
class ReaderProfile:
    id: int
    name: str
    hospital: str
    specialty: str
    disabled: bool = False
    rostered: bool = False  # has a roster entry (else: an attending for everything, always on duty)
    grade: Grade = Grade.ATTENDING
    subspecialties: frozenset[str] = frozenset()
    sites: frozenset[str] = frozenset()  # site codes; empty: every site of the hospital
    modalities: frozenset[str] = frozenset()  # empty: every modality of the specialty
    shifts: tuple[Shift, ...] = ()

    def duty(self, at: datetime, calendar: WorkCalendar) -> str:
        """``duty``, ``on_call`` or '' (off) at ``at``; a reader with no roster entry is on duty."""
        if not self.rostered:
            return ShiftKind.DUTY
        kinds = {s.kind for s in self.shifts if s.covers(at, calendar)}
        return ShiftKind.DUTY if ShiftKind.DUTY in kinds else ShiftKind.ON_CALL if kinds else ""

    @property
    def signs_alone(self) -> bool:
        """Whether this reader's signature is final (a trainee's needs a countersignature)."""
        return self.grade != Grade.TRAINEE


@dataclass(frozen=True)
class ExamFacts:
    """What routing decides on of an exam."""

    id: str
    hospital: str
    specialty: str
    subspecialty: str
    site_code: str
    modality: str


@dataclass(frozen=True)
class Decision:
    """One reader's place in the routing of one exam."""

    reader: ReaderProfile
    may_read: bool
    on_duty: bool
    reasons: tuple[str, ...] = ()  # why not (empty when offered)
    duty: str = ""

    @property
    def offered(self) -> bool:
        return self.may_read and self.on_duty


@dataclass(frozen=True)
class ClaimScope:
    """What claim-next may give one reader now (the database's side of :func:`decide`)."""

    reader_id: int
    site_ids: frozenset[int] | None  # None: every site
    modalities: frozenset[str] | None  # None: every modality
    reserved: frozenset[str] = field(default_factory=frozenset)  # subspecialties another reader covers


def credential_gaps(reader: ReaderProfile, exam: ExamFacts) -> list[str]:
    """Why ``reader`` may not read ``exam`` at all (empty: credentialed)."""
    gaps = []
    if reader.disabled:
        gaps.append("disabled")
    if reader.hospital != exam.hospital:
        gaps.append(f"reads for another hospital ({reader.hospital})")
    if reader.specialty != exam.specialty:
        gaps.append(f"another specialty ({reader.specialty})")
    if reader.sites and exam.site_code not in reader.sites:
        gaps.append(f"not credentialed for site {exam.site_code}")
    if reader.modalities and exam.modality.upper() not in reader.modalities:
        gaps.append(f"not credentialed for modality {exam.modality or '(none)'}")
    return gaps


def covered(readers: Sequence[ReaderProfile], at: datetime, calendar: WorkCalendar) -> frozenset[str]:
    """The subspecialties some enabled reader covers on duty now."""
    found: set[str] = set()
    for reader in readers:
        if not reader.disabled and reader.duty(at, calendar) == ShiftKind.DUTY:
            found |= reader.subspecialties
    return frozenset(found)


def decide(readers: Sequence[ReaderProfile], exam: ExamFacts, at: datetime, calendar: WorkCalendar) -> list[Decision]:
    """Each reader's decision for ``exam`` at ``at``: who may read it, who is offered it, and why not."""
    reserved_by = covered([r for r in readers if r.hospital == exam.hospital and r.specialty == exam.specialty],
                          at, calendar)  # fmt: skip
    decisions = []
    for reader in readers:
        gaps = credential_gaps(reader, exam)
        sub = exam.subspecialty
        reserved = bool(not gaps and sub and sub not in reader.subspecialties and sub in reserved_by)
        reasons = gaps + ([f"reserved for the {sub} readers on duty"] if reserved else [])
        duty = reader.duty(at, calendar)
        on_duty = duty == ShiftKind.DUTY
        if not reasons and not on_duty:
            local = calendar.local(at)
            what = "on call" if duty == ShiftKind.ON_CALL else "off duty"
            reasons.append(f"{what} ({calendar.day_kind(local.date())} {local:%H:%M})")
        decisions.append(Decision(reader, may_read=not gaps and not reserved, on_duty=on_duty,
                                  reasons=tuple(reasons), duty=duty))  # fmt: skip
    return decisions


class Roster:
    """The roster as the hub reads it (each time: a change from ``teleread roster load`` or ``users
    update`` counts at once, on every hub process)."""

    def __init__(self, calendar: WorkCalendar) -> None:
        self.calendar = calendar

    @classmethod
    def default(cls) -> Roster:
        """On the packaged calendar (``defaults/calendar.toml``)."""
        from teleread.reader.hub.workdays import load_calendar

        return cls(load_calendar())

    @staticmethod
    def readers(conn: Connection, *, hospital: str, specialty: str) -> list[ReaderProfile]:
        query = (
            select(principals, reader_profiles)
            .select_from(principals.outerjoin(reader_profiles, reader_profiles.c.principal_id == principals.c.id))
            .where(principals.c.role.in_(READER_ROLES), principals.c.hospital == hospital,
                   principals.c.specialty == specialty)
            .order_by(principals.c.id)
        )  # fmt: skip
        return _profiles(conn, [r._mapping for r in conn.execute(query)])

    @staticmethod
    def profile(conn: Connection, principal_id: int) -> ReaderProfile | None:
        query = (
            select(principals, reader_profiles)
            .select_from(principals.outerjoin(reader_profiles, reader_profiles.c.principal_id == principals.c.id))
            .where(principals.c.id == principal_id, principals.c.role.in_(READER_ROLES))
        )
        found = _profiles(conn, [r._mapping for r in conn.execute(query)])
        return found[0] if found else None

    @staticmethod
    def facts(conn: Connection, exam: Mapping[str, Any]) -> ExamFacts:
        code = conn.execute(select(sites.c.code).where(sites.c.id == exam["site_id"])).scalar() or ""
        return ExamFacts(id=str(exam["id"]), hospital=exam["hospital"] or "", specialty=exam["specialty"] or "",
                         subspecialty=exam.get("subspecialty") or "", site_code=str(code),
                         modality=(exam["modality"] or "").upper())  # fmt: skip

    def decisions(self, conn: Connection, exam: Mapping[str, Any], at: datetime) -> list[Decision]:
        facts = self.facts(conn, exam)
        return decide(self.readers(conn, hospital=facts.hospital, specialty=facts.specialty), facts, at,
                      self.calendar)  # fmt: skip

    def scope(self, conn: Connection, reader_id: int, at: datetime) -> ClaimScope | None:
        """What claim-next may give the reader now; None when they are not on duty."""
        me = self.profile(conn, reader_id)
        if me is None or me.disabled or me.duty(at, self.calendar) != ShiftKind.DUTY:
            return None
        site_ids = None
        if me.sites:
            found = conn.execute(select(sites.c.id).where(sites.c.code.in_(sorted(me.sites))))
            site_ids = frozenset(int(i) for (i,) in found)
        others = self.readers(conn, hospital=me.hospital, specialty=me.specialty)
        reserved = covered(others, at, self.calendar) - me.subspecialties
        return ClaimScope(reader_id, site_ids, frozenset(me.modalities) or None, frozenset(reserved))

    @staticmethod
    def open_claims(conn: Connection, *, hospital: str, specialty: str, at: datetime) -> dict[int, int]:
        query = (
            select(exams.c.claimed_by, func.count())
            .where(exams.c.hospital == hospital, exams.c.specialty == specialty,
                   exams.c.state == ExamState.IN_READING, exams.c.lease_expires_at > at)
            .group_by(exams.c.claimed_by)
        )  # fmt: skip
        return {int(reader): int(count) for reader, count in conn.execute(query) if reader is not None}

    def first_offer(
        self, conn: Connection, exam: Mapping[str, Any], at: datetime, *, besides: Iterable[int] = ()
    ) -> tuple[ReaderProfile | None, list[Decision]]:
        """The reader a new exam is offered to first (offered, with the fewest open claims, then the
        longest on the roster; not one of ``besides``), and every decision."""
        decisions = self.decisions(conn, exam, at)
        load = self.open_claims(conn, hospital=exam["hospital"], specialty=exam["specialty"], at=at)
        skip = set(besides)
        offered = sorted((d.reader for d in decisions if d.offered and d.reader.id not in skip),
                         key=lambda r: (load.get(r.id, 0), r.id))  # fmt: skip
        return (offered[0] if offered else None), decisions

    def audience(self, conn: Connection, exam: Mapping[str, Any], audience: str, at: datetime) -> list[str]:
        """The readers a notification for ``audience`` names: ``readers`` (those offered the exam),
        ``on-call`` (credentialed and on call now, else the department heads), ``department-head``;
        any other audience (the site's contacts, the duty office) is the hooks' to resolve: []."""
        decisions = self.decisions(conn, exam, at)
        if audience == "readers":
            return [d.reader.name for d in decisions if d.offered]
        heads = [d.reader.name for d in decisions if d.may_read and d.reader.grade == Grade.DEPARTMENT_HEAD]
        if audience == "on-call":
            return [d.reader.name for d in decisions if d.may_read and d.duty == ShiftKind.ON_CALL] or heads
        if audience == "department-head":
            return heads
        return []


def _profiles(conn: Connection, rows: Sequence[Mapping[Any, Any]]) -> list[ReaderProfile]:
    ids = [int(r["id"]) for r in rows]
    by_reader: dict[int, list[Shift]] = {i: [] for i in ids}
    if ids:
        query = select(shifts).where(shifts.c.principal_id.in_(ids)).order_by(shifts.c.id)
        for s in conn.execute(query):
            by_reader[int(s.principal_id)].append(Shift.parse(s.days, s.starts, s.ends, s.kind))
    return [
        ReaderProfile(
            id=int(r["id"]),
            name=r["name"],
            hospital=r["hospital"] or "",
            specialty=r["specialty"] or "",
            disabled=bool(r["disabled"]),
            rostered=r["grade"] is not None,
            grade=Grade(r["grade"] or Grade.ATTENDING),
            subspecialties=_split(r["subspecialties"]),
            sites=_split(r["sites"]),
            modalities=frozenset(m.upper() for m in _split(r["modalities"])),
            shifts=tuple(by_reader[int(r["id"])]),
        )  # fmt: skip
        for r in rows
    ]


# ---- changing the roster (the hub's command line) ------------------------------------------------
@dataclass(frozen=True)
class RosterEntry:
    name: str
    grade: Grade = Grade.ATTENDING
    subspecialties: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    shifts: tuple[Shift, ...] | None = None  # None: leave the reader's shifts as they are


def _grade(value: Any) -> Grade:
    try:
        return Grade(str(value))
    except ValueError as exc:
        raise InvalidInput("grade is attending, trainee or department_head", reason="BAD_ROSTER") from exc


def parse_roster(text: str) -> list[RosterEntry]:
    """A roster file: ``[[reader]]`` tables with name, grade, subspecialties, sites, modalities and
    ``shifts = [{days, from, to, kind}]``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput("roster file cannot be parsed", reason="BAD_ROSTER") from exc
    entries = []
    for item in data.get("reader", []):
        if not isinstance(item, dict) or not item.get("name"):
            raise InvalidInput("each [[reader]] needs a name", reason="BAD_ROSTER")
        try:
            found = tuple(Shift.parse(s["days"], s["from"], s["to"], s.get("kind", "duty"))
                          for s in item.get("shifts", []))  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise InvalidInput("each shift needs days, from and to", reason="BAD_ROSTER") from exc
        entries.append(RosterEntry(
            name=str(item["name"]), grade=_grade(item.get("grade", "attending")),
            subspecialties=tuple(str(s) for s in item.get("subspecialties", [])),
            sites=tuple(str(s) for s in item.get("sites", [])),
            modalities=tuple(str(m).upper() for m in item.get("modalities", [])),
            shifts=found,
        ))  # fmt: skip
    return entries


def save_entries(engine: Engine, entries: Sequence[RosterEntry]) -> int:
    """Write roster entries in one transaction (each reader's shifts replaced when given)."""
    with engine.begin() as conn:
        known = {str(r.code) for r in conn.execute(select(sites.c.code))}
        for entry in entries:
            row = conn.execute(
                select(principals.c.id, principals.c.role).where(principals.c.name == entry.name)
            ).first()
            if row is None or row.role not in READER_ROLES:
                raise NotFound("no reader of that name", reason="READER_NOT_FOUND")
            unknown = set(entry.sites) - known
            if unknown:
                raise NotFound("the roster names a site that is not registered", reason="SITE_NOT_FOUND")
            values = {"grade": entry.grade.value, "subspecialties": _join(entry.subspecialties),
                      "sites": _join(entry.sites), "modalities": _join(m.upper() for m in entry.modalities),
                      "updated_at": utcnow()}  # fmt: skip
            where = reader_profiles.c.principal_id == row.id
            if conn.execute(update(reader_profiles).where(where).values(**values)).rowcount == 0:
                conn.execute(insert(reader_profiles).values(principal_id=row.id, **values))
            if entry.shifts is not None:
                conn.execute(delete(shifts).where(shifts.c.principal_id == row.id))
                for s in entry.shifts:
                    conn.execute(insert(shifts).values(principal_id=row.id, days=s.days, starts=f"{s.starts:%H:%M}",
                                                       ends=f"{s.ends:%H:%M}", kind=s.kind.value))  # fmt: skip
    return len(entries)


def load_roster_file(engine: Engine, path: Path) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput("roster file cannot be read", reason="BAD_ROSTER") from exc
    return save_entries(engine, parse_roster(text))


def roster_table(engine: Engine, calendar: WorkCalendar, at: datetime) -> list[dict[str, Any]]:
    """Every reader with their roster entry and whether they are on duty at ``at`` (``roster show``)."""
    with reading(engine) as conn:
        query = (
            select(principals, reader_profiles)
            .select_from(principals.outerjoin(reader_profiles, reader_profiles.c.principal_id == principals.c.id))
            .where(principals.c.role.in_(READER_ROLES))
            .order_by(principals.c.hospital, principals.c.specialty, principals.c.name)
        )
        profiles = _profiles(conn, [r._mapping for r in conn.execute(query)])
    return [
        {
            "name": p.name,
            "hospital": p.hospital,
            "specialty": p.specialty,
            "grade": p.grade.value,
            "subspecialties": sorted(p.subspecialties),
            "sites": sorted(p.sites) or ["*"],
            "modalities": sorted(p.modalities) or ["*"],
            "shifts": [s.describe() for s in p.shifts],
            "now": "disabled" if p.disabled else (p.duty(at, calendar) or "off"),
            "rostered": p.rostered,
        }  # fmt: skip
        for p in profiles
    ]


__all__ = [
    "ClaimScope", "Decision", "ExamFacts", "ReaderProfile", "Roster", "RosterEntry", "Shift", "covered",
    "credential_gaps", "decide", "load_roster_file", "parse_roster", "roster_table", "save_entries",
]  # fmt: skip
