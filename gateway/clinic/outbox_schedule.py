"""When each outbox exam goes to the hub: readiness, priority order, attempts and next-try times
(with :class:`teleread.backoff.Backoff`), and the upload lease. Time comes from the clock it is
given (or a ``now`` argument), never from the system directly.

An exam's states::

    collecting --complete()/settle()--> ready --claim_next()--> uploading --committed()--> committed
                                          ^                         |       --rejected()--> rejected
                                          +--failed() after a backoff, release() at once,
                                             recover() for a lease whose holder died

- *Ready.* The sender says a study is complete (:meth:`Scheduler.complete`), or no object came for
  the quiet period (:meth:`Scheduler.settle`); a WFDB record is completed by whoever took both of
  its files, never by the clock. An object arriving for a ready exam makes it collecting again.
- *Order.* :meth:`Scheduler.claim_next` takes the most urgent (stat, urgent, routine), then oldest,
  ready exam whose next-try time has come; outside the routine window only stat and urgent ones.
- *Attempts.* :meth:`Scheduler.failed` counts an attempt and sets the next-try time ``delay``
  seconds ahead, ``delay`` drawn by the outbox's backoff for that attempt count (capped, jittered:
  the count is on disk, so the schedule survives a restart). :meth:`Scheduler.release` makes the
  exam ready at once without counting (the link was down: the forwarder waits for the link).
- *The lease.* ``uploading`` is the claim of the one forwarder that uploads: it lasts until the
  outcome is recorded, and it has no expiry time (there is one forwarder per outbox, in the gateway
  process). A claim whose holder died without recording an outcome is returned by
  :meth:`Scheduler.recover`: at start, and by the forwarding loop after an interrupted attempt.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from typing import Protocol, Sequence

from teleread.backoff import Backoff
from teleread.gateway.clinic.outbox_ledger import ERROR_CHARS, PRIORITY_RANK, Ledger, OutboxExam, Refused, iso
from teleread.tracks import OUTBOX, move_sqlite
from teleread.vocab import OutboxState as B


def _move(
    db: sqlite3.Connection,
    target: B,
    event: str,
    *,
    where: str = "id=?",
    params: Sequence[object] = (),
    expect: B | None = None,
    strict: bool = True,
    sets: str = "",
    set_params: Sequence[object] = (),
) -> int:
    """One move of outbox exams by the outbox track (see :func:`teleread.tracks.move_sqlite`)."""
    return move_sqlite(
        db, OUTBOX, "exams", target, event=event, where=where, params=params, expect=expect, strict=strict,
        sets=sets, set_params=set_params,
    )  # fmt: skip


class Clock(Protocol):
    """What the outbox asks for the time: :class:`teleread.clock.Clock`'s protocol, so its
    ``SystemClock`` and ``FakeClock`` fit (that module is not imported here: the gateway does not
    load SQLAlchemy)."""

    def now(self) -> dt.datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class Scheduler:
    def __init__(self, ledger: Ledger, backoff: Backoff, clock: Clock | None = None) -> None:
        self.ledger = ledger
        self.backoff = backoff
        self.clock: Clock = clock if clock is not None else SystemClock()

    def _now(self, now: dt.datetime | None) -> dt.datetime:
        return now if now is not None else self.clock.now()

    def complete(self, group_key: str) -> None:
        """The sender says the study is complete: it may be uploaded now."""
        with self.ledger.write() as db:
            _move(db, B.READY, "completed", where="group_key=?", params=(group_key,), expect=B.COLLECTING, strict=False)

    def settle(self, *, quiet_s: float, now: dt.datetime | None = None) -> int:
        """Mark studies with no new object for ``quiet_s`` seconds ready; return how many."""
        cutoff = iso(self._now(now) - dt.timedelta(seconds=quiet_s))
        with self.ledger.write() as db:
            # a WFDB record is completed by whoever took both its files, never by the clock
            where = "last_object_at <= ? AND group_key NOT LIKE 'wfdb:%'"
            return _move(db, B.READY, "completed", where=where, params=(cutoff,), expect=B.COLLECTING, strict=False)

    def claim_next(self, now: dt.datetime | None = None, *, routine: bool = True) -> OutboxExam | None:
        """The most urgent, oldest ready exam whose retry time has come, marked uploading
        (stat and urgent exams only when ``routine`` is False: outside the routine window)."""
        at = iso(self._now(now))
        max_rank = PRIORITY_RANK["routine"] if routine else PRIORITY_RANK["urgent"]
        with self.ledger.write() as db:
            row = db.execute(
                "SELECT id FROM exams WHERE state='ready' AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
                " AND priority_rank <= ? ORDER BY priority_rank, created_at LIMIT 1",
                (at, max_rank),
            ).fetchone()
            if row is None:
                return None
            _move(db, B.UPLOADING, "claimed", params=(row[0],))
        return self.ledger.exam(row[0])

    def failed(
        self, exam_id: str, error: str, *, now: dt.datetime | None = None, rng: random.Random | None = None
    ) -> float:
        """An attempt failed (link down, hub busy): back to ready after a backoff; return the delay in s."""
        start = self._now(now)
        with self.ledger.write() as db:
            (attempts,) = db.execute("SELECT attempts FROM exams WHERE id=?", (exam_id,)).fetchone()
            delay = self.backoff.delay(attempts + 1, rng)
            when = iso(start + dt.timedelta(seconds=delay))
            sets, values = "attempts=attempts+1, next_attempt_at=?, last_error=?", (when, error[:ERROR_CHARS])
            _move(db, B.READY, "failed", params=(exam_id,), sets=sets, set_params=values)
        return delay

    def release(self, exam_id: str, error: str) -> None:
        """The link was down: the exam is ready again at once, with no backoff of its own (the
        forwarder waits for the link, then takes exams in priority order again)."""
        with self.ledger.write() as db:
            _move(db, B.READY, "released", params=(exam_id,), sets="last_error=?", set_params=(error[:ERROR_CHARS],))

    def rejected(self, exam_id: str, error: str) -> None:
        """The hub refused the exam for good (bad input): keep it for a person to look at."""
        with self.ledger.write() as db:
            _move(db, B.REJECTED, "rejected", params=(exam_id,), sets="last_error=?", set_params=(error[:ERROR_CHARS],))

    def committed(
        self, exam_id: str, hub_exam_id: str, *, refused: Sequence[Refused] = (), now: dt.datetime | None = None
    ) -> str:
        """The hub committed the exam (without the ``refused`` objects: then it is incomplete, and
        each refusal is recorded); return the time recorded."""
        at = iso(self._now(now))
        with self.ledger.write() as db:
            sets = "hub_exam_id=?, committed_at=?, last_error='', refused_count=?"
            _move(
                db, B.COMMITTED, "committed", params=(exam_id,), sets=sets, set_params=(hub_exam_id, at, len(refused))
            )
            for r in refused:
                self.ledger.add_refusal(db, at=at, source="hub", reason=r.reason, exam_id=exam_id)
        return at

    def recover(self) -> int:
        """Leases left by an attempt that could not record its outcome are ready again (call only
        when no upload is under way); return how many."""
        with self.ledger.write() as db:
            return _move(db, B.READY, "recovered", where="1=1", strict=False)
