"""Exam events: the audit trail, and the feed that wakes watching clients.

``record_event`` writes a row inside the caller's transaction. ``EventBus`` wakes the hub's one
watch feed (``reader/hub/feed.py``) after a commit; the feed then reads the table after the last event
id it read, so nothing is missed even when a wake-up is (it also polls, which covers commits of
other hub processes on the same database), and hands the rows to every live stream.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from sqlalchemy import Connection, insert

from teleread.db.engine import utcnow
from teleread.db.schema import events


def record_event(
    conn: Connection,
    *,
    type: str,
    exam_id: str | None = None,
    site_id: int | None = None,
    hospital: str = "",
    specialty: str = "",
    actor_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        insert(events).values(
            exam_id=exam_id,
            site_id=site_id,
            hospital=hospital,
            specialty=specialty,
            type=type,
            actor_id=actor_id,
            detail=json.dumps(detail or {}, sort_keys=True),
            at=utcnow(),
        )
    )


class EventBus:
    """A generation counter with a condition variable: cheap wake-ups for the watch feed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = False

    def publish(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def generation(self) -> int:
        with self._cond:
            return self._generation

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the generation moves past ``seen`` or ``timeout`` passes; return it."""
        with self._cond:
            if self._generation == seen and not self._closed:
                self._cond.wait(timeout)
            return self._generation

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
