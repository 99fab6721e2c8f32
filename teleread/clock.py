"""Time, passed in: services ask a clock instead of the machine.

``DatabaseClock`` reads PostgreSQL's ``clock_timestamp()``, so several hub processes on several
machines agree on when a lease lapses or a deadline passes, whatever their own clocks say; plus the
simulation clock's offset when one is set (``set_simulation_offset``: drills, replays and tests move
the time of every hub on the database at once). On the
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
        from teleread.db.schema import clock_offset

        offset = select(func.coalesce(func.max(clock_offset.c.seconds), 0.0)).scalar_subquery()
        with self._engine.connect() as conn:
            server, seconds = conn.execute(select(func.clock_timestamp(), offset)).one()
        value = as_utc(server)
        assert value is not None
        return value.astimezone(timezone.utc) + timedelta(seconds=float(seconds))

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


def clock_for(engine: Engine, *, refresh_seconds: float = 30.0) -> Clock:
    """The production clock for a hub on ``engine``."""
    return DatabaseClock(engine, refresh_seconds=refresh_seconds) if is_postgres(engine) else SystemClock()


def set_simulation_offset(engine: Engine, seconds: float) -> None:
    """Move the time of every hub process on this PostgreSQL database by ``seconds`` from the
    database's own (``0`` puts it back): for drills, replays and tests. Each process sees it at its
    clock's next reading."""
    from sqlalchemy import delete, insert

    from teleread.db.schema import clock_offset

    with engine.begin() as conn:
        conn.execute(delete(clock_offset))
        if seconds:
            conn.execute(insert(clock_offset).values(id=1, seconds=float(seconds)))
