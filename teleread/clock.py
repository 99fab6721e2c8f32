"""Time, passed in: services ask a clock instead of the machine.

``DatabaseClock`` reads PostgreSQL's ``clock_timestamp()``, so several hub processes on several
machines agree on when a lease lapses or a deadline passes, whatever their own clocks say. On the
embedded SQLite database there is one hub process, and ``SystemClock`` is that process's clock.
``FakeClock`` is for tests: it moves only when told.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol

from sqlalchemy import Engine, func, select

from teleread.db.engine import as_utc, is_postgres

EPOCH = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)  # a Monday morning


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class DatabaseClock:
    """The database server's time. It is read once every ``refresh_seconds`` (one round trip) and
    carried forward on this process's monotonic clock in between, so a claim or a lease costs no
    extra query, and processes on several machines agree to within the drift of a few seconds."""

    def __init__(self, engine: Engine, *, refresh_seconds: float = 30.0) -> None:
        self._engine = engine
        self._refresh = refresh_seconds
        self._lock = threading.Lock()
        self._base: tuple[float, datetime] | None = None  # (monotonic, server time) of the last reading

    def _read(self) -> datetime:
        with self._engine.connect() as conn:
            value = as_utc(conn.execute(select(func.clock_timestamp())).scalar_one())
        assert value is not None
        return value.astimezone(timezone.utc)

    def now(self) -> datetime:
        tick = time.monotonic()
        with self._lock:
            base = self._base
        if base is None or tick - base[0] >= self._refresh:
            server = self._read()
            with self._lock:
                self._base = (time.monotonic(), server)
            return server
        return base[1] + timedelta(seconds=tick - base[0])


class FakeClock:
    def __init__(self, start: datetime = EPOCH) -> None:
        if start.tzinfo is None:
            raise ValueError("a clock keeps timezone-aware UTC times")
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float = 0.0, *, by: timedelta | None = None) -> datetime:
        self._now += by if by is not None else timedelta(seconds=seconds)
        return self._now


def clock_for(engine: Engine) -> Clock:
    """The production clock for a hub on ``engine``."""
    return DatabaseClock(engine) if is_postgres(engine) else SystemClock()
