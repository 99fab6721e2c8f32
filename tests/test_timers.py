"""Durable deadlines: an exam's reading warning and breach are rows, fired once on the hub's clock,
after a restart too, and exactly once with two hub processes sweeping one PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, insert, select

from helpers import wait_for
from teleread.app.hub import build_hub
from teleread.clock import FakeClock, set_simulation_offset
from teleread.db.engine import as_utc, make_engine, utcnow
from teleread.db.schema import events, exams, sites, timers
from teleread.reader.hub import sla
from teleread.reader.hub.timers import TimerSweeper, schedule
from teleread.settings import QueueSettings, Settings
from test_queue_and_tenancy import _queued_ecg


def _events(engine, exam_id: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    with engine.connect() as conn:
        rows = conn.execute(select(events.c.type, events.c.detail).where(events.c.exam_id == exam_id,
                                                                         events.c.type.like("sla_%")))  # fmt: skip
        return [{"type": r.type, **json.loads(r.detail)} for r in rows]


def test_a_queued_exam_warns_at_80_percent_and_breaches_at_its_deadline_once(hub_stack, tmp_path: Path) -> None:
    hub = hub_stack.hub
    exam_id = _queued_ecg(hub_stack, tmp_path)
    with hub.engine.connect() as conn:
        row = conn.execute(
            select(exams.c.received_at, exams.c.deadline, exams.c.level).where(exams.c.id == exam_id)
        ).one()
        due = {r.kind: as_utc(r.due_at) for r in conn.execute(select(timers).where(timers.c.subject == exam_id))}
    arrived, deadline = as_utc(row.received_at), as_utc(row.deadline)
    assert due == {"reading_warning": arrived + (deadline - arrived) * 0.8, "reading_deadline": deadline}
    clock = FakeClock(arrived)
    sweeper = TimerSweeper(engine=hub.engine, clock=clock, handlers=sla.handlers(hub.queue.roster), interval_seconds=0)

    clock.advance(by=(deadline - arrived) * 0.8 - timedelta(seconds=1))
    assert sweeper.run_once() == 0 and _events(hub.engine, exam_id) == []
    clock.advance(2)
    assert sweeper.run_once() == 1
    assert [e["type"] for e in _events(hub.engine, exam_id)] == ["sla_warning"]
    clock.advance(by=deadline - clock.now())
    assert sweeper.run_once() == 1 and sweeper.run_once() == 0  # fired once
    found = _events(hub.engine, exam_id)
    assert [e["type"] for e in found] == ["sla_warning", "sla_breached"]
    assert (
        found[1]["level"] == row.level and found[1]["claimed"] is False and found[1]["deadline"] == deadline.isoformat()
    )
    clock.advance(3600)
    assert sweeper.run_once() == 0 and len(_events(hub.engine, exam_id)) == 2


def test_a_timer_due_while_the_hub_was_down_fires_once_after_the_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "hub", cpu_workers=0, queue=QueueSettings(timer_interval_seconds=0))
    hub = build_hub(settings)
    clock = FakeClock(utcnow())
    try:
        with hub.engine.begin() as conn:
            site_id = conn.execute(insert(sites).values(code="s1", name="S1", lead_hospital="h", created_at=utcnow())
                                   .returning(sites.c.id)).scalar_one()  # fmt: skip
            exam_id = _exam(conn, site_id)
            sla.schedule_reading(
                conn, exam_id=exam_id, arrived=clock.now(), deadline=clock.now() + timedelta(minutes=10)
            )
    finally:
        hub.close()
    clock.advance(700)  # both timers passed while no hub ran
    hub = build_hub(settings, migrate=False)
    try:
        sweeper = TimerSweeper(
            engine=hub.engine, clock=clock, handlers=sla.handlers(hub.queue.roster), interval_seconds=0
        )
        assert sweeper.run_once() == 2 and sweeper.run_once() == 0
        assert sorted(e["type"] for e in _events(hub.engine, exam_id)) == ["sla_breached", "sla_warning"]
    finally:
        hub.close()


def test_a_failing_handler_leaves_its_timer_for_the_next_pass_and_gives_up_after_five(tmp_path: Path) -> None:
    hub = build_hub(Settings(data_dir=tmp_path / "hub", cpu_workers=0, queue=QueueSettings(timer_interval_seconds=0)))
    clock = FakeClock(utcnow())
    calls: list[str] = []

    def broken(conn, timer, at):  # type: ignore[no-untyped-def]
        calls.append(timer.subject)
        raise RuntimeError("boom")

    def fine(conn, timer, at):  # type: ignore[no-untyped-def]
        calls.append(timer.subject)

    try:
        with hub.engine.begin() as conn:
            schedule(conn, kind="broken", subject="a", due_at=clock.now())
            schedule(conn, kind="fine", subject="b", due_at=clock.now())
            schedule(conn, kind="fine", subject="b", due_at=clock.now())  # the same timer again: nothing
        sweeper = TimerSweeper(engine=hub.engine, clock=clock, handlers={"broken": broken, "fine": fine},
                               interval_seconds=0)  # fmt: skip
        assert sweeper.run_once() == 1 and sorted(calls) == ["a", "b"]  # the broken one did not hold up the other
        for _ in range(6):
            sweeper.run_once()
        with hub.engine.connect() as conn:
            rows = {r.subject: r for r in conn.execute(select(timers))}
        assert calls.count("a") == 5 and calls.count("b") == 1
        assert (rows["a"].status, rows["a"].attempts, rows["a"].last_error) == ("failed", 5, "RuntimeError")
        assert rows["b"].status == "fired"
    finally:
        hub.close()


def _exam(conn, site_id: int) -> str:  # type: ignore[no-untyped-def]
    exam_id = uuid.uuid4().hex
    now = utcnow()
    conn.execute(insert(exams).values(
        id=exam_id, site_id=site_id, client_exam_key=exam_id, kind="ecg", state="queued", priority="routine",
        hospital="h", specialty="cardiology", level="routine", received_at=now, created_at=now, updated_at=now,
    ))  # fmt: skip
    return exam_id


def _hub_process(data_dir: Path, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TELEREAD_DATABASE_URL": url, "TELEREAD_CPU_WORKERS": "0", "TELEREAD_HTTP__PORT": "-1",
           "TELEREAD_QUEUE__TIMER_INTERVAL_SECONDS": "0.05", "TELEREAD_QUEUE__CLOCK_REFRESH_SECONDS": "0.05",
           "TELEREAD_INGEST__JANITOR_INTERVAL_SECONDS": "0", "TELEREAD_LOG_LEVEL": "WARNING"}  # fmt: skip
    log = open(data_dir.with_suffix(".log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "teleread.app.cli", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", "0"], env=env, stdout=log, stderr=log,
    )  # fmt: skip


def test_two_hubs_on_one_postgresql_fire_each_deadline_exactly_once(pg_url: str, tmp_path: Path) -> None:
    """200 exams' warnings and breaches come due together, by the simulation clock the test moves
    (the database's time plus an offset every hub process reads); two hub processes sweep them."""
    engine = make_engine(pg_url)
    first = _hub_process(tmp_path / "hub-a", pg_url)  # it migrates the database
    second = None
    try:
        wait_for(lambda: _has_table(engine), timeout=60)
        second = _hub_process(tmp_path / "hub-b", pg_url)
        with engine.begin() as conn:
            now = as_utc(conn.execute(select(func.now())).scalar_one())
            site_id = conn.execute(insert(sites).values(code="s1", name="S1", lead_hospital="h", created_at=now)
                                   .returning(sites.c.id)).scalar_one()  # fmt: skip
            ids = [_exam(conn, site_id) for _ in range(200)]
            for exam_id in ids:
                sla.schedule_reading(conn, exam_id=exam_id, arrived=now, deadline=now + timedelta(hours=1))
        set_simulation_offset(engine, 2 * 3600)  # two hours on, for every hub at once

        def all_fired() -> bool:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).where(timers.c.status == "pending")).scalar_one() == 0

        wait_for(all_fired, timeout=120, interval=0.2)
        with engine.connect() as conn:
            found = conn.execute(select(events.c.exam_id, events.c.type).where(events.c.type.like("sla_%"))).all()
        assert len(found) == 400 and len(set(found)) == 400  # each exam's warning and breach, once each
        assert first.poll() is None and second.poll() is None  # both were sweeping all along
    finally:
        for process in (first, second):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        set_simulation_offset(engine, 0)
        engine.dispose()


def _has_table(engine) -> bool:  # type: ignore[no-untyped-def]
    from sqlalchemy import inspect

    return "timers" in inspect(engine).get_table_names() and "sites" in inspect(engine).get_table_names()


def test_read_sla_lists_nothing_breached_for_a_fresh_exam(embedded_stack, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from teleread.app.cli import main

    exam_id = _queued_ecg(embedded_stack, tmp_path)
    hub = ["--hub", embedded_stack.address, "--token", embedded_stack.tokens["cardio"]]
    assert main(["read", "sla", *hub]) == 0
    shown = capsys.readouterr().out
    assert "Past the reading deadline (0)" in shown and "Past 80 % of the reading time (0)" in shown
    assert exam_id not in shown
