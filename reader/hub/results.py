"""Results for requesting sites: list after a cursor, get one exam's latest result, and wait for new
ones; acknowledge a critical result by a named person. Each site sees only its own results; the
cursor is the site's gapless result sequence."""

from __future__ import annotations

import re

from teleread.auth import Principal, require_result_reader
from teleread.errors import InvalidInput, NotFound
from teleread.clock import Clock, SystemClock
from teleread.events import EventBus
from teleread.reader.hub.repository import ResultRecord, UnitOfWork


class ResultsService:
    def __init__(self, *, uow: UnitOfWork, bus: EventBus, clock: Clock | None = None) -> None:
        self._uow = uow
        self._bus = bus
        self._clock = clock or SystemClock()

    @property
    def bus(self) -> EventBus:
        return self._bus

    def list_after(self, p: Principal, *, after: int, limit: int = 100) -> list[ResultRecord]:
        site_id = require_result_reader(p)
        if after < 0:
            raise InvalidInput("cursor cannot be negative", reason="BAD_CURSOR")
        with self._uow.read() as tx:
            return tx.results.after(site_id, after=after, limit=max(1, min(limit or 100, 500)))

    def get(self, p: Principal, *, exam_id: str) -> ResultRecord:
        site_id = require_result_reader(p)
        with self._uow.read() as tx:
            found = tx.results.latest_for(site_id, exam_id)
        if found is None:
            raise NotFound("no result for that exam at this site", reason="RESULT_NOT_FOUND")
        return found

    def acknowledge(
        self, p: Principal, *, cursor: int, name: str, role: str, method: str, read_back: str
    ) -> ResultRecord:
        """A named person at the caller's site received critical result ``cursor`` and read it back."""
        site_id = require_result_reader(p)
        values = {
            "ack_name": _text(name, "name", 100), "ack_role": _text(role, "role", 50),
            "ack_method": _method(method), "ack_read_back": _text(read_back, "read_back", 2000),
            "acknowledged_at": self._clock.now(),
        }  # fmt: skip
        with self._uow() as tx:
            found = tx.results.acknowledge(site_id, seq=cursor, values=values, actor_id=p.id)
        self._bus.publish()
        return found


METHODS = ("phone", "in_person", "system")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(value: str, field: str, limit: int) -> str:
    value = value.strip()
    if not value or len(value) > limit or _CONTROL.search(value):
        raise InvalidInput(f"{field} must be 1-{limit} characters of text", reason="BAD_ACKNOWLEDGEMENT")
    return value


def _method(value: str) -> str:
    if value not in METHODS:
        raise InvalidInput(f"method must be one of {', '.join(METHODS)}", reason="BAD_ACKNOWLEDGEMENT")
    return value
