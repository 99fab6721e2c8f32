"""Durable deadlines: every deadline is a row of ``timers``, on the database's time, fired once.

A timer names what it is for (``kind``: an exam's reading-deadline warning, its breach, ...), its
subject (an exam id), the step of an escalation it stands for, and when it is due. It is written in
the transaction that makes it necessary (``schedule``: a second write of the same kind, subject and
step is a no-op), so a deadline exists exactly when the state that needs it does.

Every hub process runs a :class:`TimerSweeper`. A pass takes the due timers one at a time, each in
a transaction of its own: on PostgreSQL a row lock that skips locked rows (``locked_for_change``,
``FOR NO KEY UPDATE SKIP LOCKED``) hands each row to one process only, and the row's status is
checked again under that lock, so with several hubs on one database every timer fires exactly once
(a timer being fired by another process is skipped, not waited for). On the embedded SQLite
database there is one hub process and one sweeper. The handler of the timer's kind runs in that
transaction: what it records (an event, the next step's timer) commits with the timer's ``fired``
status or not at all, so a hub that stops between a deadline and its escalation fires it after the
restart, once. A handler that raises leaves the timer pending for the next pass, and is logged by
its kind and the error's type (a timer whose handler failed ``MAX_ATTEMPTS`` times is set
``failed`` and logged at ERROR, so one bad row cannot hold up the rest for ever).

Time is the hub's clock (``teleread/clock.py``: the database's time on PostgreSQL), passed in, so
tests move it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from teleread import lifecycle
from teleread.clock import Clock
from teleread.db.engine import as_utc
from teleread.db.schema import timers
from teleread.reader.hub.due_rows import RowPass, earliest_due
from teleread.vocab import TimerStatus

log = logging.getLogger("teleread.timers")
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Timer:
    id: str
    kind: str
    subject: str
    step: int
    due_at: datetime
    detail: dict[str, Any]


# A handler runs in the firing transaction: (connection, the timer, the time it fired at).
Handler = Callable[[Connection, Timer, datetime], None]


def schedule(
    conn: Connection, *, kind: str, subject: str, due_at: datetime, step: int = 0,
    detail: Mapping[str, Any] | None = None,
) -> None:  # fmt: skip
    """A timer, in the caller's transaction; nothing if one of the same kind, subject and step exists."""
    values = {
        "id": uuid.uuid4().hex, "kind": kind, "subject": subject, "step": step, "due_at": due_at, "attempts": 0,
        "detail": json.dumps(dict(detail or {}), sort_keys=True),
    }  # fmt: skip
    lifecycle.open_timer(conn, values=values)


class TimerSweeper(RowPass):
    name = "timers"

    def __init__(
        self, *, engine: Engine, clock: Clock, handlers: Mapping[str, Handler], interval_seconds: float = 1.0
    ) -> None:
        super().__init__(clock=clock, interval_seconds=interval_seconds)
        self._engine = engine
        self._handlers = dict(handlers)
        self.fired = 0

    def _one(self, at: datetime, passed_over: set[str]) -> int | None:
        """Fire the earliest due timer: 1 if it fired, 0 if its handler failed (it stays pending, and
        this pass goes on with the others), None when none is due."""
        query = earliest_due(timers, timers.c.due_at, at=at, passed_over=passed_over)
        with self._engine.begin() as conn:
            row = conn.execute(query).mappings().first()
            if row is None:
                return None
            timer = _timer(row)
            handler = self._handlers.get(timer.kind)
            try:
                with conn.begin_nested():
                    if handler is None:
                        raise LookupError(f"no handler for timer kind {timer.kind}")
                    handler(conn, timer, at)
            except Exception as exc:  # noqa: BLE001 - recorded on the row; the type only in the log
                attempts = int(row["attempts"]) + 1
                state = TimerStatus.FAILED if attempts >= MAX_ATTEMPTS else TimerStatus.PENDING
                lifecycle.move_timer(conn, timer.id, state, values={"attempts": attempts,
                                                                    "last_error": type(exc).__name__})  # fmt: skip
                level = logging.ERROR if state == TimerStatus.FAILED else logging.WARNING
                log.log(level, "timer handler failed", extra={"kind": timer.kind, "reason": type(exc).__name__})
                passed_over.add(timer.id)
                return 0
            lifecycle.move_timer(conn, timer.id, TimerStatus.FIRED, values={"fired_at": at})
        self.fired += 1
        return 1


def _timer(row: Any) -> Timer:
    due = as_utc(row["due_at"])
    assert due is not None
    return Timer(
        id=str(row["id"]), kind=str(row["kind"]), subject=str(row["subject"]), step=int(row["step"]), due_at=due,
        detail=json.loads(row["detail"] or "{}"),
    )  # fmt: skip
