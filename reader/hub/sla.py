"""The SLA clock of reading: a warning at 80 % of an exam's reading time, a breach at its deadline;
and a critical exam's alert and its escalation while nobody claims it.

When an exam is queued with its deadline (``QueueService.enqueue_triaged``), two durable timers are
written in the same transaction (``reader/hub/timers.py``): ``reading_warning`` at 80 % of the time
from arrival to the deadline, ``reading_deadline`` at the deadline. When one fires and the exam is
still waiting for its report (queued, or in reading), an ``sla_warning`` or ``sla_breached`` event is
recorded for the exam's hospital and specialty (who holds it, whether their lease has lapsed, the
level and the deadline); an exam reported in time makes its timers fire with nothing to say. A
claim whose lease has lapsed is claimable by the next eligible reader already (the queue's leases).

A critical exam is also announced to the hooks at once (a ``critical_alert`` notification to the
readers, ``reader/hub/notify.py``), announced again every 2 minutes while nobody claims it until
its first escalation step (a ``critical`` event, so stations and watches ring again, and the
notification again), and gets one ``critical_unclaimed`` timer per step of the
routing file's ``[critical_unclaimed]`` (by default the on-call list at 10 minutes, the department
head at 20): a step that fires while the exam is still unclaimed records an ``escalated`` event and
notifies that step's audience; once someone has claimed it, the remaining steps say nothing.

A critical result, once published to the site, gets one ``critical_unacknowledged`` timer per step
of ``[critical_unacknowledged]`` (by default a second contact at 15 minutes, the site's supervisor
at 30, the lead hospital's duty office at 45): a step that fires before a named person has
acknowledged it (``Results.AcknowledgeCritical``) moves the result to ``escalated``, records a
``critical_escalated`` event and notifies that step's audience.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select, update

from teleread.db.engine import as_utc
from teleread.db.schema import exams
from teleread.events import record_event
from teleread.reader.hub.notify import notify
from teleread.reader.hub.timers import Handler, Timer, schedule
from teleread.vocab import ExamState, Level

if TYPE_CHECKING:
    from teleread.reader.hub.roster import Roster

WARNING_SHARE = 0.8
WARNING, DEADLINE, UNCLAIMED = "reading_warning", "reading_deadline", "critical_unclaimed"
UNACKNOWLEDGED = "critical_unacknowledged"  # a critical result the site has not acknowledged
REALERT = "critical_realert"  # the critical alert again, while nobody claims
REPEAT_MINUTES = 2
WAITING = (ExamState.QUEUED, ExamState.IN_READING)
OFFER_SECONDS = 120  # an exam re-offered at its deadline is that reader's alone this long


def schedule_reading(conn: Connection, *, exam_id: str, arrived: datetime, deadline: datetime) -> None:
    """The exam's warning and deadline timers (in the transaction that queues it)."""
    warning = arrived + (deadline - arrived) * WARNING_SHARE
    detail = {"deadline": deadline.isoformat()}
    schedule(conn, kind=WARNING, subject=exam_id, due_at=warning, detail=detail)
    schedule(conn, kind=DEADLINE, subject=exam_id, due_at=deadline, detail=detail)


def critical_arrived(
    conn: Connection, *, exam: Any, arrived: datetime, at: datetime, steps: tuple[tuple[int, str], ...],
    readers: Sequence[str] = (),
) -> None:  # fmt: skip
    """The alert of a critical exam just queued (to ``readers``, those on duty who may read it), and
    its escalation timers (in that transaction)."""
    exam_id = str(exam["id"])
    notify(conn, kind="critical_alert", exam_id=exam_id, audience="readers", at=at,
           payload={**_about(exam), "readers": list(readers)})  # fmt: skip
    first = steps[0][0] if steps else 0
    for repeat in range(1, max(0, (first - 1) // REPEAT_MINUTES) + 1):  # again and again until the first step
        schedule(conn, kind=REALERT, subject=exam_id, step=repeat,
                 due_at=arrived + timedelta(minutes=repeat * REPEAT_MINUTES))  # fmt: skip
    for step, (minutes, audience) in enumerate(steps):
        schedule(conn, kind=UNCLAIMED, subject=exam_id, step=step, due_at=arrived + timedelta(minutes=minutes),
                 detail={"notify": audience, "after_minutes": minutes})  # fmt: skip


def _about(exam: Any) -> dict[str, Any]:
    """What a notification says of an exam (a row's mapping): never the patient."""
    return {"site_id": exam["site_id"], "hospital": exam["hospital"] or "", "specialty": exam["specialty"] or "",
            "modality": exam["modality"] or "", "level": "critical"}  # fmt: skip


def handlers(roster: Roster) -> dict[str, Handler]:
    """The deadline sweeper's handlers, naming the readers each notification is for from ``roster``."""

    def _realert(conn: Connection, timer: Timer, at: datetime) -> None:
        """The critical alert again while nobody has claimed the exam: the readers' stations and
        watches ring again (a ``critical`` event) and the hooks are notified again."""
        row = conn.execute(select(exams).where(exams.c.id == timer.subject)).mappings().first()
        if row is None or row["state"] != ExamState.QUEUED:
            return
        record_event(conn, type="critical", exam_id=row["id"], site_id=row["site_id"], hospital=row["hospital"],
                     specialty=row["specialty"], detail={"level": "critical", "repeat": timer.step})  # fmt: skip
        notify(conn, kind="critical_alert", exam_id=row["id"], audience="readers", at=at, step=timer.step,
               payload={**_about(row), "repeat": timer.step,
                        "readers": roster.audience(conn, row, "readers", at)})  # fmt: skip

    def _unclaimed(conn: Connection, timer: Timer, at: datetime) -> None:
        row = conn.execute(select(exams).where(exams.c.id == timer.subject)).mappings().first()
        if row is None or row["state"] != ExamState.QUEUED:
            return  # claimed (or read) in time: this step says nothing
        audience = str(timer.detail.get("notify", ""))
        names = roster.audience(conn, row, audience, at)
        detail = {"why": "critical unclaimed", "step": timer.step, "to": audience, "readers": names,
                  "after_minutes": timer.detail.get("after_minutes")}  # fmt: skip
        record_event(conn, type="escalated", exam_id=row["id"], site_id=row["site_id"], hospital=row["hospital"],
                     specialty=row["specialty"], detail=detail)  # fmt: skip
        notify(conn, kind="escalation", exam_id=row["id"], audience=audience, at=at, step=timer.step + 1,
               payload={**_about(row), "why": "critical unclaimed", "readers": names,
                        "after_minutes": timer.detail.get("after_minutes")})  # fmt: skip

    def _breached(conn: Connection, timer: Timer, at: datetime) -> None:
        """At the deadline: the breach is recorded (by ``_fired``), the department head notified (but
        of a critical exam, whose own steps run), and an exam nobody holds any more (a lapsed lease)
        offered to another reader who may read it."""
        row = conn.execute(select(exams).where(exams.c.id == timer.subject)).mappings().first()
        if row is None or row["state"] not in WAITING:
            return
        lease = as_utc(row["lease_expires_at"])
        held = row["claimed_by"] is not None and lease is not None and lease > at
        if row["level"] != Level.CRITICAL:  # a critical exam has its own steps (``critical_unclaimed``)
            notify(conn, kind="sla_breached", exam_id=row["id"], audience="department-head", at=at,
                   payload={**_about(row), "level": row["level"], "held": held,
                            "readers": roster.audience(conn, row, "department-head", at)})  # fmt: skip
        if held:
            return
        reader, _ = roster.first_offer(conn, row, at, besides={row["claimed_by"]} if row["claimed_by"] else set())
        if reader is not None:
            until = at + timedelta(seconds=OFFER_SECONDS)
            conn.execute(update(exams).where(exams.c.id == row["id"]).values(offered_to=reader.id, offer_until=until))
            detail = {"to": reader.name, "reader_id": reader.id, "until": until.isoformat(), "why": "deadline"}
            record_event(conn, type="offered", exam_id=row["id"], site_id=row["site_id"], hospital=row["hospital"],
                         specialty=row["specialty"], detail=detail)  # fmt: skip

    warning, deadline = _fired("sla_warning"), _fired("sla_breached")

    def _deadline(conn: Connection, timer: Timer, at: datetime) -> None:
        deadline(conn, timer, at)
        _breached(conn, timer, at)

    return {WARNING: warning, DEADLINE: _deadline, UNCLAIMED: _unclaimed, UNACKNOWLEDGED: _unacknowledged,
            REALERT: _realert}  # fmt: skip


def _unacknowledged(conn: Connection, timer: Timer, at: datetime) -> None:
    """A step of a critical result's escalation: while nobody at the site has acknowledged it, the
    result moves to (or stays) ``escalated``, the step is recorded and its audience notified."""
    from teleread import lifecycle
    from teleread.db.schema import results
    from teleread.vocab import CriticalState

    result = conn.execute(select(results).where(results.c.id == int(timer.subject))).first()
    if result is None or result.critical_state not in (CriticalState.NOTIFIED, CriticalState.ESCALATED):
        return  # acknowledged in time: this step says nothing
    exam = conn.execute(select(exams).where(exams.c.id == result.exam_id)).mappings().one()
    audience = str(timer.detail.get("notify", ""))
    minutes = timer.detail.get("after_minutes")
    detail = {"cursor": result.seq, "step": timer.step, "to": audience, "after_minutes": minutes}
    lifecycle.move_critical(conn, result.id, CriticalState.ESCALATED, event="critical_escalated", exam=exam,
                            detail=detail)  # fmt: skip
    notify(conn, kind="critical_unacknowledged", exam_id=exam["id"], audience=audience, at=at, step=timer.step + 1,
           ref=str(result.id), payload={**_about(exam), "cursor": result.seq, "why": "critical result unacknowledged",
                                        "after_minutes": timer.detail.get("after_minutes")})  # fmt: skip


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
