"""Claims on exams, as typed objects and the repository the queue works them through.

A claim is a lease with a fencing token: claiming increments the exam's fence, and every later act
on the claim presents the fence and is refused when it is stale or the lease has lapsed. The rules
(:func:`claimable`, :func:`live_claim`, :func:`check_claim`) are plain functions of an
:class:`ExamRecord` and a time. The storage is an :class:`ExamRepository` opened by a
:class:`UnitOfWork` (one transaction): :class:`SqlUnitOfWork` on the database, where claim-next
locks its row with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, and :class:`MemoryUnitOfWork` for unit
tests, which keeps the same life-cycle table and rolls back on error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, or_, select, update

from teleread import lifecycle
from teleread.db.engine import as_utc, is_postgres
from teleread.db.schema import exams
from teleread.errors import LeaseLost, NotFound
from teleread.vocab import ExamState

CLAIMABLE = (ExamState.QUEUED, ExamState.IN_READING)


@dataclass(frozen=True)
class ExamRecord:
    """What the queue decides on, and the whole row for the caller to show."""

    id: str
    site_id: int
    state: ExamState
    hospital: str
    specialty: str
    claimed_by: int | None
    lease_expires_at: datetime | None
    fence: int
    row: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> ExamRecord:
        return cls(
            id=str(row["id"]),
            site_id=int(row["site_id"]),
            state=ExamState(row["state"]),
            hospital=row["hospital"] or "",
            specialty=row["specialty"] or "",
            claimed_by=row["claimed_by"],
            lease_expires_at=as_utc(row["lease_expires_at"]),
            fence=int(row["fence"] or 0),
            row=row,
        )


def live_claim(exam: ExamRecord, now: datetime) -> bool:
    """Whether someone holds an unexpired claim on the exam."""
    return exam.claimed_by is not None and exam.lease_expires_at is not None and exam.lease_expires_at > now


def claimable(exam: ExamRecord, now: datetime) -> bool:
    """Queued, or in reading under a lapsed lease."""
    return exam.state == ExamState.QUEUED or (
        exam.state == ExamState.IN_READING and (exam.lease_expires_at or now) < now
    )


def check_claim(exam: ExamRecord, *, reader_id: int, fence: int, states: tuple[str, ...], now: datetime) -> None:
    """LeaseLost unless ``reader_id`` holds a live claim with ``fence`` on an exam in ``states``."""
    if (
        exam.state not in states
        or exam.claimed_by != reader_id
        or exam.fence != int(fence)
        or exam.lease_expires_at is None
        or exam.lease_expires_at <= now
    ):
        raise LeaseLost("the claim lapsed or was taken over; claim the exam again", reason="LEASE_LOST")


def claim_event(state: ExamState) -> str:
    # an amendment claim is not a queue event: the worklist watch does not show it
    return "claimed" if state == ExamState.IN_READING else "amendment_claimed"


class ExamRepository(Protocol):
    def get(self, exam_id: str, *, lock: bool = False) -> ExamRecord | None: ...

    def next_claimable(self, *, hospital: str, specialty: str, now: datetime) -> ExamRecord | None:
        """The most urgent claimable exam of the hospital and specialty (locked, skipping locked rows)."""
        ...

    def take(self, exam_id: str, state: ExamState, *, reader_id: int, until: datetime, now: datetime) -> ExamRecord:
        """Claim: ``state`` (in reading, or reported for an amendment), the next fence, the lease."""
        ...

    def extend(self, exam_id: str, *, until: datetime, now: datetime) -> ExamRecord: ...

    def drop(self, exam_id: str, state: ExamState, *, event: str, actor_id: int, now: datetime) -> ExamRecord:
        """End the claim, moving the exam to ``state`` by ``event``."""
        ...


class UnitOfWork(Protocol):
    def __call__(self) -> Any:
        """A context manager: one transaction, yielding an :class:`ExamRepository`."""
        ...


def _order_key(row: dict[str, Any]) -> Any:
    return (row["level_rank"], as_utc(row["deadline"]), as_utc(row["received_at"]), row["id"])


def queue_order() -> list[Any]:
    return [exams.c.level_rank, exams.c.deadline, exams.c.received_at, exams.c.id]


class SqlExamRepository:
    def __init__(self, conn: Connection, *, postgres: bool) -> None:
        self.conn = conn
        self._pg = postgres

    def get(self, exam_id: str, *, lock: bool = False) -> ExamRecord | None:
        query = select(exams).where(exams.c.id == exam_id)
        if lock and self._pg:
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        return None if row is None else ExamRecord.of(dict(row._mapping))

    def next_claimable(self, *, hospital: str, specialty: str, now: datetime) -> ExamRecord | None:
        pick = (
            select(exams)
            .where(
                exams.c.hospital == hospital,
                exams.c.specialty == specialty,
                exams.c.state.in_(CLAIMABLE),  # lets the planner use ix_exams_claimable
                or_(exams.c.state == ExamState.QUEUED, exams.c.lease_expires_at < now),
            )
            .order_by(*queue_order())
            .limit(1)
        )
        if self._pg:
            pick = pick.with_for_update(skip_locked=True)
        row = self.conn.execute(pick).first()
        return None if row is None else ExamRecord.of(dict(row._mapping))

    def take(self, exam_id: str, state: ExamState, *, reader_id: int, until: datetime, now: datetime) -> ExamRecord:
        row = lifecycle.move_exam(
            self.conn,
            exam_id,
            state,
            event=claim_event(state),
            values={"claimed_by": reader_id, "lease_expires_at": until, "fence": exams.c.fence + 1, "updated_at": now},
            actor_id=reader_id,
            detail=lambda after: {"fence": after["fence"]},
        )
        assert row is not None  # without expect a refused move raises
        return ExamRecord.of(row)

    def extend(self, exam_id: str, *, until: datetime, now: datetime) -> ExamRecord:
        self.conn.execute(update(exams).where(exams.c.id == exam_id).values(lease_expires_at=until, updated_at=now))
        record = self.get(exam_id)
        assert record is not None
        return record

    def drop(self, exam_id: str, state: ExamState, *, event: str, actor_id: int, now: datetime) -> ExamRecord:
        row = lifecycle.move_exam(
            self.conn,
            exam_id,
            state,
            event=event,
            values={"claimed_by": None, "lease_expires_at": None, "updated_at": now},
            actor_id=actor_id,
        )
        assert row is not None
        return ExamRecord.of(row)


class SqlUnitOfWork:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pg = is_postgres(engine)

    @contextmanager
    def __call__(self) -> Iterator[SqlExamRepository]:
        with self._engine.begin() as conn:
            yield SqlExamRepository(conn, postgres=self._pg)


@dataclass
class MemoryStore:
    """The rows and events a :class:`MemoryUnitOfWork` keeps."""

    exams: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        base = {"claimed_by": None, "lease_expires_at": None, "fence": 0, "deadline": None, "received_at": None}
        self.exams[str(row["id"])] = {**base, **row}


class MemoryExamRepository:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def get(self, exam_id: str, *, lock: bool = False) -> ExamRecord | None:
        row = self._s.exams.get(exam_id)
        return None if row is None else ExamRecord.of(dict(row))

    def next_claimable(self, *, hospital: str, specialty: str, now: datetime) -> ExamRecord | None:
        rows = [
            r
            for r in self._s.exams.values()
            if r["hospital"] == hospital and r["specialty"] == specialty and claimable(ExamRecord.of(r), now)
        ]
        rows.sort(key=_order_key)
        return ExamRecord.of(dict(rows[0])) if rows else None

    def _move(self, exam_id: str, state: ExamState, event: str, values: dict[str, Any], actor_id: int) -> ExamRecord:
        row = self._s.exams.get(exam_id)
        if row is None:
            raise NotFound("no such exam", reason="NO_EXAM")
        lifecycle.EXAM.edge(row["state"], state, event)
        row.update(values, state=state)
        detail = {"fence": row["fence"]} if event.endswith("claimed") else {}
        self._s.events.append({"type": event, "exam_id": exam_id, "actor_id": actor_id, "detail": detail})
        return ExamRecord.of(dict(row))

    def take(self, exam_id: str, state: ExamState, *, reader_id: int, until: datetime, now: datetime) -> ExamRecord:
        fence = int(self._s.exams[exam_id]["fence"]) + 1
        values = {"claimed_by": reader_id, "lease_expires_at": until, "fence": fence, "updated_at": now}
        return self._move(exam_id, state, claim_event(state), values, reader_id)

    def extend(self, exam_id: str, *, until: datetime, now: datetime) -> ExamRecord:
        self._s.exams[exam_id].update(lease_expires_at=until, updated_at=now)
        return ExamRecord.of(dict(self._s.exams[exam_id]))

    def drop(self, exam_id: str, state: ExamState, *, event: str, actor_id: int, now: datetime) -> ExamRecord:
        values = {"claimed_by": None, "lease_expires_at": None, "updated_at": now}
        return self._move(exam_id, state, event, values, actor_id)


class MemoryUnitOfWork:
    """One transaction over a :class:`MemoryStore`: what it changed is undone when it raises."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()

    @contextmanager
    def __call__(self) -> Iterator[MemoryExamRepository]:
        saved = copy.deepcopy((self.store.exams, self.store.events))
        try:
            yield MemoryExamRepository(self.store)
        except BaseException:
            self.store.exams, self.store.events = saved
            raise


__all__ = [
    "ExamRecord",
    "ExamRepository",
    "MemoryExamRepository",
    "MemoryStore",
    "MemoryUnitOfWork",
    "SqlExamRepository",
    "SqlUnitOfWork",
    "UnitOfWork",
    "check_claim",
    "claimable",
    "live_claim",
    "queue_order",
]
