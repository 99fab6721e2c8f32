"""The database clock reads the server's time once per refresh and carries it forward on the
monotonic clock in between; the fake clock moves only when told."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from teleread import clock as clock_module
from teleread.clock import DatabaseClock, FakeClock

SERVER = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)


def test_the_database_clock_reads_the_server_once_per_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([100.0, 100.0, 105.0, 129.0, 131.0, 131.0, 131.0])
    monkeypatch.setattr(clock_module.time, "monotonic", lambda: next(ticks))
    reads: list[datetime] = []

    def read(self: DatabaseClock) -> datetime:
        reads.append(SERVER + timedelta(minutes=len(reads)))  # the server's clock differs from ours
        return reads[-1]

    monkeypatch.setattr(DatabaseClock, "_read", read)
    db = DatabaseClock(engine=None, refresh_seconds=30.0)  # type: ignore[arg-type]
    assert db.now() == SERVER  # first reading
    assert db.now() == SERVER + timedelta(seconds=5)  # carried forward, no query
    assert db.now() == SERVER + timedelta(seconds=29)
    assert len(reads) == 1
    assert db.now() == SERVER + timedelta(minutes=1)  # 31 s on: read again
    assert len(reads) == 2


def test_the_fake_clock_moves_only_when_told() -> None:
    fake = FakeClock(SERVER)
    assert fake.now() == fake.now() == SERVER
    assert fake.advance(90) == SERVER + timedelta(seconds=90)
    with pytest.raises(ValueError):
        FakeClock(datetime(2026, 1, 1))
