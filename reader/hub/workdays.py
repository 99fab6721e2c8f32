"""The working-hours calendar: which local days are working days (weekdays, less public holidays,
plus the make-up working days of 调休 that fall on a weekend), and the working hours of a day.

Configuration, not code: a TOML file (``TELEREAD_QUEUE__CALENDAR_FILE``, default the packaged
``defaults/calendar.toml``). The roster's shifts name days by this calendar (``workdays``,
``restdays``), and an SLA rule may count its time in working minutes (an outpatient CT's 4 working
hours), which :meth:`WorkCalendar.add_working_minutes` adds across evenings, weekends and holidays.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from teleread.errors import InvalidInput

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_CALENDAR = Path(str(resources.files("teleread") / "defaults" / "calendar.toml"))


def parse_hhmm(value: str, *, what: str) -> time:
    try:
        hours, minutes = (int(part) for part in str(value).split(":"))
        if value.count(":") != 1 or len(str(value)) != 5:
            raise ValueError(value)
        return time(23, 59, 59, 999999) if (hours, minutes) == (24, 0) else time(hours, minutes)
    except ValueError as exc:
        raise InvalidInput(f"{what} must be a time of day as HH:MM", reason="BAD_CALENDAR") from exc


def _dates(values: object, *, what: str) -> frozenset[date]:
    try:
        return frozenset(date.fromisoformat(str(v)) for v in (values or []))  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be dates as YYYY-MM-DD", reason="BAD_CALENDAR") from exc


@dataclass(frozen=True)
class WorkCalendar:
    timezone: str = "Asia/Shanghai"
    opens: time = time(8, 0)
    closes: time = time(17, 30)
    weekend: frozenset[str] = frozenset({"sat", "sun"})
    holidays: frozenset[date] = field(default_factory=frozenset)
    make_up_workdays: frozenset[date] = field(default_factory=frozenset)  # 调休: a weekend day worked
    version: str = "unversioned"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local(self, at: datetime) -> datetime:
        return at.astimezone(self.zone)

    def is_workday(self, day: date) -> bool:
        if day in self.make_up_workdays:
            return True
        return day not in self.holidays and WEEKDAYS[day.weekday()] not in self.weekend

    def day_kind(self, day: date) -> str:
        """How the calendar names the day, for explanations: a working day, a make-up working day, a
        public holiday or a weekend day."""
        if day in self.make_up_workdays:
            return "make-up working day"
        if day in self.holidays:
            return "public holiday"
        return "working day" if self.is_workday(day) else "weekend"

    def in_working_hours(self, at: datetime) -> bool:
        local = self.local(at)
        return self.is_workday(local.date()) and self.opens <= local.time() < self.closes

    def add_working_minutes(self, start: datetime, minutes: float) -> datetime:
        """The time ``minutes`` of working hours after ``start`` (counting from the next opening when
        ``start`` is outside working hours). At most a year of days is walked."""
        left = timedelta(minutes=minutes)
        local = self.local(start)
        for _ in range(400):
            day = local.date()
            opens = datetime.combine(day, self.opens, self.zone)
            closes = datetime.combine(day, self.closes, self.zone)
            if self.is_workday(day) and local < closes:
                begin = max(local, opens)
                if begin + left <= closes:
                    return (begin + left).astimezone(start.tzinfo)
                left -= closes - begin
            local = datetime.combine(day + timedelta(days=1), time(0, 0), self.zone)
        raise InvalidInput("the calendar has no working hours within a year", reason="BAD_CALENDAR")


def load_calendar(path: Path | None = None) -> WorkCalendar:
    source = path or DEFAULT_CALENDAR
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput("calendar file cannot be read or parsed", reason="BAD_CALENDAR") from exc
    hours = data.get("working_hours", {})
    weekend = frozenset(str(d).lower()[:3] for d in data.get("weekend", ["sat", "sun"]))
    if not weekend <= set(WEEKDAYS):
        raise InvalidInput("weekend must name days as mon..sun", reason="BAD_CALENDAR")
    calendar = WorkCalendar(
        timezone=str(data.get("timezone", "Asia/Shanghai")),
        opens=parse_hhmm(hours.get("from", "08:00"), what="working_hours.from"),
        closes=parse_hhmm(hours.get("to", "17:30"), what="working_hours.to"),
        weekend=weekend,
        holidays=_dates(data.get("holidays"), what="holidays"),
        make_up_workdays=_dates(data.get("make_up_workdays"), what="make_up_workdays"),
        version=str(data.get("version", "unversioned")),
    )
    try:
        ZoneInfo(calendar.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput("calendar timezone is not a known zone", reason="BAD_CALENDAR") from exc
    if calendar.opens >= calendar.closes:
        raise InvalidInput("working hours must open before they close", reason="BAD_CALENDAR")
    return calendar
