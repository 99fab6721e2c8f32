"""The worklist feed never loses an event that commits after a later one (ids are assigned at
insert, commits land in any order on PostgreSQL), and never sends one twice."""

from __future__ import annotations

from types import SimpleNamespace

from teleread.db.engine import utcnow
from teleread.reader.feed import EventCursor


def _rows(*ids: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(event_id=i, event_at=utcnow()) for i in ids]


def test_late_committed_event_is_sent_once() -> None:
    feed = EventCursor(start=4)
    assert [r.event_id for r in feed.new(_rows(3, 4, 5, 7))] == [5, 7]  # 3, 4: before the snapshot
    assert [r.event_id for r in feed.new(_rows(5, 6, 7, 8))] == [6, 8]  # 6 committed late
    assert feed.new(_rows(5, 6, 7, 8)) == []
