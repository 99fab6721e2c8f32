"""Claims on exams: the typed exam the queue decides on, and the claim rules.

A claim is a lease with a fencing token: claiming increments the exam's fence, and every later act
on the claim presents the fence and is refused when it is stale or the lease has lapsed. The rules
(:func:`claimable`, :func:`live_claim`, :func:`check_claim`, :func:`readable`) are plain functions of
an :class:`ExamRecord` and a time; the storage is the repository of ``reader/hub/repository.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from teleread import lifecycle
from teleread.db.engine import as_utc
from teleread.errors import LeaseLost, NotFound, PermissionDenied
from teleread.vocab import ExamState

CLAIMABLE = (ExamState.QUEUED, ExamState.IN_READING)
READING = (ExamState.IN_READING,)  # a claim to write and sign the first report
AMENDING = (ExamState.REPORTED,)  # a claim for amendment
CLAIMED = (*READING, *AMENDING)


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


def readable(exam: ExamRecord | None, *, hospital: str, specialty: str) -> ExamRecord:
    """The exam if a reader of ``hospital`` and ``specialty`` may open it; NotFound when it is not in
    that hospital's queue (or does not exist), PermissionDenied when it is another specialty's."""
    if exam is None or exam.hospital != hospital or exam.state not in lifecycle.READABLE:
        raise NotFound("no such exam in this reader's queue", reason="EXAM_NOT_FOUND")
    if exam.specialty != specialty:
        raise PermissionDenied("this exam belongs to another specialty", reason="WRONG_SPECIALTY")
    return exam


def claim_event(state: ExamState) -> str:
    # an amendment claim is not a queue event: the worklist watch does not show it
    return "claimed" if state == ExamState.IN_READING else "amendment_claimed"


__all__ = [
    "AMENDING",
    "CLAIMABLE",
    "CLAIMED",
    "READING",
    "ExamRecord",
    "check_claim",
    "claim_event",
    "claimable",
    "live_claim",
    "readable",
]
