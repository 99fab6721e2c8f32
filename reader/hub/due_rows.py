"""What the deadline sweeper and the notifier share: a thread that, every interval, takes the due
rows of a table one at a time until none is left (``RowPass``).

A subclass says how to take and handle one row (``_one``: 1 when it did, 0 when it could not and
the row stays for a later pass, None when nothing is due); the pass skips the rows it could not
handle this time, so one bad row cannot hold up the rest. The time of a pass is the clock's, or the
``now`` a test passes in.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Select, Table, select

from teleread.clock import Clock
from teleread.db.engine import locked_for_change

log = logging.getLogger("teleread.due_rows")


class RowPass:
    name = "rows"  # the thread's name and the log's

    def __init__(self, *, clock: Clock, interval_seconds: float) -> None:
        self._clock = clock
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """The background thread (none with an interval of 0: tests call :meth:`run_once`)."""
        if self._thread is None and self._interval > 0:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - the thread must live; the type only
                log.error("pass failed", extra={"what": self.name, "reason": type(exc).__name__})

    def run_once(self, now: datetime | None = None) -> int:
        """Handle every row due at ``now`` (the clock's time by default); how many were handled."""
        at = now if now is not None else self._clock.now()
        done, passed_over = 0, set[str]()
        while not self._stop.is_set():
            outcome = self._one(at, passed_over)
            if outcome is None:
                return done
            done += outcome
        return done

    def _one(self, at: datetime, passed_over: set[str]) -> int | None:
        """Take and handle the earliest due row not in ``passed_over`` (add it there when it could
        not be handled): 1, 0, or None when no row is due."""
        raise NotImplementedError


def earliest_due(table: Table, due: Column[Any], *, at: datetime, passed_over: set[str]) -> Select[Any]:
    """The earliest pending row of ``table`` due at ``at`` (by ``due``, then id), not passed over,
    locked to change it: on PostgreSQL one process takes each row, the others skip it."""
    query = (
        select(table)
        .where(table.c.status == "pending", due <= at, table.c.id.not_in(passed_over))
        .order_by(due, table.c.id)
        .limit(1)
    )
    return locked_for_change(query, skip_locked=True)
