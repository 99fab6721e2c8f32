"""Results for requesting sites: list after a cursor, get one exam's latest result, and wait for new
ones. Each site sees only its own results; the cursor is the site's gapless result sequence."""

from __future__ import annotations

from teleread.auth import Principal, require_result_reader
from teleread.errors import InvalidInput, NotFound
from teleread.events import EventBus
from teleread.reader.hub.repository import ResultRecord, UnitOfWork


class ResultsService:
    def __init__(self, *, uow: UnitOfWork, bus: EventBus) -> None:
        self._uow = uow
        self._bus = bus

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
