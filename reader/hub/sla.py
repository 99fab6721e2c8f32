"""The SLA clock of reading: a warning at 80 % of an exam's reading time, a breach at its deadline.

When an exam is queued with its deadline (``QueueService.enqueue_triaged``), two durable timers are
written in the same transaction (``reader/hub/timers.py``): ``reading_warning`` at 80 % of the time
from arrival to the deadline, ``reading_deadline`` at the deadline. When one fires and the exam is
still waiting for its report (queued, or in reading), an ``sla_warning`` or ``sla_breached`` event is
recorded for the exam's hospital and specialty (who holds it, whether their lease has lapsed, the
level and the deadline); an exam reported in time makes its timers fire with nothing to say. A
claim whose lease has lapsed is claimable by the next eligible reader already (the queue's leases).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from teleread.db.engine import as_utc
from teleread.db.schema import exams
from teleread.events import record_event
from teleread.reader.hub.timers import Handler, Timer, schedule
from teleread.vocab import ExamState

WARNING_SHARE = 0.8
WARNING, DEADLINE = "reading_warning", "reading_deadline"
WAITING = (ExamState.QUEUED, ExamState.IN_READING)


def schedule_reading(conn: Connection, *, exam_id: str, arrived: datetime, deadline: datetime) -> None:
    """The exam's warning and deadline timers (in the transaction that queues it)."""
    warning = arrived + (deadline - arrived) * WARNING_SHARE
    detail = {"deadline": deadline.isoformat()}
    schedule(conn, kind=WARNING, subject=exam_id, due_at=warning, detail=detail)
    schedule(conn, kind=DEADLINE, subject=exam_id, due_at=deadline, detail=detail)


def _fired(event: str) -> Handler:
    def handle(conn: Connection, timer: Timer, at: datetime) -> None:
        row = conn.execute(
            select(exams.c.state, exams.c.site_id, exams.c.hospital, exams.c.specialty, exams.c.level,
                   exams.c.claimed_by, exams.c.lease_expires_at, exams.c.deadline)
            .where(exams.c.id == timer.subject)
        ).mappings().first()  # fmt: skip
        if row is None or row["state"] not in WAITING:
            return  # reported (or withdrawn) in time: nothing to say
        lease = as_utc(row["lease_expires_at"])
        claimed = row["claimed_by"] is not None
        detail: dict[str, Any] = {
            "level": row["level"], "deadline": timer.detail.get("deadline", ""), "step": timer.step, "claimed": claimed,
            "lease_lapsed": bool(claimed and lease is not None and lease <= at),
        }  # fmt: skip
        record_event(conn, type=event, exam_id=timer.subject, site_id=row["site_id"], hospital=row["hospital"],
                     specialty=row["specialty"], detail=detail)  # fmt: skip

    return handle


HANDLERS: dict[str, Handler] = {WARNING: _fired("sla_warning"), DEADLINE: _fired("sla_breached")}
