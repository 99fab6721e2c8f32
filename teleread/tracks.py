"""The life cycles as data: the states an exam, a report, a critical result, an upload and a clinic
outbox's exam pass through, and the only moves allowed between them.

This module holds the tables and imports nothing but the standard library and the project's
vocabulary, so the clinic gateway (which does not load SQLAlchemy) uses the same tables as the hub.
Two movers apply them, and no other code writes a state: :mod:`teleread.lifecycle` for the hub's
database (SQLAlchemy, each move with its event in the caller's transaction), and
:func:`move_sqlite` / :func:`open_sqlite` here for the outbox's SQLite ledger, which keeps no event
table. ``tests/test_lifecycle.py`` checks that no other module assigns ``state``, ``status`` or
``critical_state`` (through SQLAlchemy or in an SQL string), and that ``ARCHITECTURE.md`` shows the
diagrams :func:`diagrams` draws from these tables (``python -m teleread.lifecycle``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from teleread.errors import Conflict, NotFound
from teleread.vocab import (
    CriticalState,
    ExamState,
    NotificationStatus,
    OutboxState,
    ReportStatus,
    TimerStatus,
    UploadStatus,
)


class InvalidTransition(Conflict):
    """A state change the life cycle does not allow (``FAILED_PRECONDITION`` / ``INVALID_TRANSITION``)."""

    def __init__(self, track: str, source: str | None, target: str, event: str | None = None) -> None:
        what = f" by {event}" if event else ""
        super().__init__(
            f"{track}: no move from {source or 'nothing'} to {target}{what}",
            reason="INVALID_TRANSITION",
            metadata={"track": track, "from": source or "", "to": target},
        )
        self.source = source
        self.target = target


@dataclass(frozen=True)
class Edge:
    """One allowed move. ``source`` None: the state a new row starts in. ``event`` is the type of
    the event row the move writes (None on the upload track, whose rows carry their own times; on
    the outbox track, which keeps no events, the move's name)."""

    source: str | None
    target: str
    event: str | None
    label: str = ""


@dataclass(frozen=True)
class Track:
    name: str
    states: type[StrEnum]
    edges: tuple[Edge, ...]
    note: str = ""

    def __post_init__(self) -> None:
        names = {str(s) for s in self.states}
        for e in self.edges:
            if e.target not in names or (e.source is not None and e.source not in names):
                raise ValueError(f"{self.name}: edge {e} names a state outside {self.states.__name__}")

    def edge(self, source: str | None, target: str, event: str | None) -> Edge:
        """The edge for this move, or :class:`InvalidTransition`."""
        for e in self.edges:
            if e.source == source and e.target == target and e.event == event:
                return e
        raise InvalidTransition(self.name, source, target, event)

    def sources(self, target: str, event: str | None) -> tuple[str, ...]:
        """The states a move to ``target`` by ``event`` may start from."""
        return tuple(e.source for e in self.edges if e.target == target and e.event == event and e.source)

    def initial(self, state: str, event: str | None) -> None:
        self.edge(None, state, event)

    def mermaid(self) -> str:
        lines = ["stateDiagram-v2"]
        for e in self.edges:
            source = "[*]" if e.source is None else e.source
            text = e.label or e.event or ""
            lines.append(f"    {source} --> {e.target}" + (f": {text}" if text else ""))
        return "\n".join(lines)


S, R, C, U = ExamState, ReportStatus, CriticalState, UploadStatus
B = OutboxState  # a clinic outbox's exam
T = TimerStatus
N = NotificationStatus

EXAM = Track(
    "exam",
    ExamState,
    (
        Edge(None, S.RECEIVING, "opened"),
        Edge(S.RECEIVING, S.RECEIVED, "received", "received (committed, all objects verified)"),
        Edge(S.RECEIVING, S.REJECTED, "rejected", "rejected (no valid object, or an incomplete record)"),
        Edge(S.RECEIVING, S.EXPIRED, "expired", "expired (abandoned)"),
        Edge(S.RECEIVED, S.TRIAGED, "triaged", "triaged (level, score, findings)"),
        Edge(S.TRIAGED, S.QUEUED, "queued", "queued (deadline set)"),
        Edge(S.QUEUED, S.IN_READING, "claimed"),
        Edge(S.IN_READING, S.IN_READING, "claimed", "claimed (a lapsed claim taken over)"),
        Edge(S.IN_READING, S.QUEUED, "released"),
        Edge(S.IN_READING, S.REPORTED, "reported", "reported (signed)"),
        Edge(S.IN_READING, S.REPORTED, "critical_result", "critical_result (signed critical)"),
        Edge(S.REPORTED, S.REPORTED, "amendment_claimed"),
        Edge(S.REPORTED, S.REPORTED, "amendment_released"),
        Edge(S.REPORTED, S.REPORTED, "amended", "amended (a new version)"),
        Edge(S.REPORTED, S.DELIVERED, "delivered", "delivered (the clinic fetched it)"),
        Edge(S.DELIVERED, S.ACKNOWLEDGED, "acknowledged", "acknowledged (a named person read it)"),
        Edge(S.DELIVERED, S.REPORTED, "amended", "amended (delivered again)"),
        Edge(S.ACKNOWLEDGED, S.REPORTED, "amended", "amended (delivered again)"),
    ),
    note="delivered and acknowledged are reached by result acknowledgement, not yet built",
)

REPORT = Track(
    "report",
    ReportStatus,
    (
        Edge(None, R.DRAFT, "drafted"),
        Edge(R.DRAFT, R.DRAFT, "draft_saved"),
        Edge(R.DRAFT, R.FINAL, "signed"),
        Edge(R.DRAFT, R.PRELIMINARY, "preliminary"),
        Edge(R.PRELIMINARY, R.FINAL, "signed"),
        Edge(R.DRAFT, R.AWAITING_COUNTERSIGNATURE, "submitted", "submitted (a trainee's report)"),
        Edge(R.AWAITING_COUNTERSIGNATURE, R.FINAL, "countersigned"),
        Edge(R.AWAITING_COUNTERSIGNATURE, R.DRAFT, "returned"),
        Edge(R.DRAFT, R.SECOND_READER_CHECK, "second_check_requested"),
        Edge(R.SECOND_READER_CHECK, R.FINAL, "second_check_passed"),
        Edge(R.SECOND_READER_CHECK, R.DRAFT, "returned"),
        Edge(R.FINAL, R.AMENDED, "amended", "amended (a new version; every version kept)"),
        Edge(R.AMENDED, R.AMENDED, "amended", "amended again"),
    ),
    note="the status is that of the report's latest version; signed versions are never changed",
)

CRITICAL = Track(
    "critical result",
    CriticalState,
    (
        Edge(None, C.NOTIFIED, "critical_result", "published critical"),
        Edge(C.NOTIFIED, C.ACKNOWLEDGED, "critical_acknowledged", "read back by a named person"),
        Edge(C.NOTIFIED, C.ESCALATED, "critical_escalated", "deadline passed"),
        Edge(C.ESCALATED, C.ESCALATED, "critical_escalated", "next step of the escalation"),
        Edge(C.ESCALATED, C.ACKNOWLEDGED, "critical_acknowledged"),
    ),
    note="one per critical result version; acknowledgement and escalation are not yet built",
)

UPLOAD = Track(
    "upload",
    UploadStatus,
    (
        Edge(None, U.PARTIAL, None, "begun"),
        Edge(U.PARTIAL, U.STORED, None, "stored"),
        Edge(U.PARTIAL, U.DUPLICATE, None, "duplicate"),
        Edge(U.PARTIAL, U.REFUSED, None, "refused"),
        Edge(U.PARTIAL, U.REJECTED, None, "rejected"),
        Edge(U.STORED, U.REFUSED, None, "exam rejected"),
        Edge(U.DUPLICATE, U.REFUSED, None, "exam rejected"),
        Edge(U.PARTIAL, U.EXPIRED, None, "exam expired"),
        Edge(U.STORED, U.EXPIRED, None, "exam expired"),
        Edge(U.DUPLICATE, U.EXPIRED, None, "exam expired"),
    ),
    note="no event per object: the exam's events say what happened to its objects",
)

TIMER = Track(
    "timer",
    TimerStatus,
    (
        Edge(None, T.PENDING, None, "scheduled"),
        Edge(T.PENDING, T.FIRED, None, "due: its handler ran"),
        Edge(T.PENDING, T.PENDING, None, "its handler failed: tried again"),
        Edge(T.PENDING, T.FAILED, None, "its handler failed every attempt"),
    ),
    note="no event of its own: what a firing records is its handler's",
)

NOTIFICATION = Track(
    "notification",
    NotificationStatus,
    (
        Edge(None, N.PENDING, None, "written with what made it necessary"),
        Edge(N.PENDING, N.SENT, None, "the hooks took it"),
        Edge(N.PENDING, N.PENDING, None, "a hook failed: tried again later"),
        Edge(N.PENDING, N.FAILED, None, "every attempt failed, or no hook is set"),
    ),
    note="no event of its own: the alert or escalation it carries is the exam's event",
)

OUTBOX = Track(
    "outbox exam",
    OutboxState,
    (
        Edge(None, B.COLLECTING, "collected", "first object"),
        Edge(B.COLLECTING, B.COLLECTING, "collected", "another object"),
        Edge(B.READY, B.COLLECTING, "collected", "another object (not yet taken)"),
        Edge(B.COLLECTING, B.READY, "completed", "completed (the sender said so, or no object for the quiet period)"),
        Edge(B.READY, B.UPLOADING, "claimed", "claimed by the forwarder"),
        Edge(B.UPLOADING, B.READY, "failed", "failed (next try after a backoff)"),
        Edge(B.UPLOADING, B.READY, "released", "released (the link was down)"),
        Edge(B.UPLOADING, B.READY, "recovered", "recovered (its forwarder died)"),
        Edge(B.UPLOADING, B.COMMITTED, "committed", "committed by the hub"),
        Edge(B.UPLOADING, B.REJECTED, "rejected", "rejected by the hub"),
    ),
    note="a clinic gateway's own SQLite ledger, in another process and database than the hub's; no event rows",
)

TRACKS = (EXAM, REPORT, CRITICAL, UPLOAD, TIMER, NOTIFICATION, OUTBOX)

# Exam states grouped by what they mean to the services.
READABLE = (S.QUEUED, S.IN_READING, S.REPORTED, S.DELIVERED, S.ACKNOWLEDGED)  # a reader may open it
SIGNED = (S.REPORTED, S.DELIVERED, S.ACKNOWLEDGED)  # a signed report exists
COMMITTED = (S.RECEIVED, S.TRIAGED, S.QUEUED, S.IN_READING, *SIGNED)  # its objects are all in
REFUSED_UPLOADS = (U.REJECTED, U.REFUSED)  # an upload whose bytes are gone, with a refusal record
HOLDING_UPLOADS = (U.STORED, U.DUPLICATE)  # an upload that points to an object row


def _sources(track: Track, target: str, event: str | None, expect: str | Iterable[str] | None) -> tuple[str, ...]:
    allowed = track.sources(target, event)
    if not allowed:
        raise InvalidTransition(track.name, None, target, event)
    if expect is None:
        return allowed
    wanted = (expect,) if isinstance(expect, str) else tuple(expect)
    for state in wanted:
        track.edge(state, target, event)  # a caller expecting a move the table lacks is a bug
    return wanted


def open_sqlite(
    db: sqlite3.Connection, track: Track, table: str, target: str, *, event: str, values: Mapping[str, Any]
) -> None:
    """Insert a new row of ``table`` in ``target`` (a state ``track`` starts in), with ``values``."""
    track.initial(target, event)
    columns = [*values, "state"]
    db.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        (*values.values(), str(target)),
    )


def move_sqlite(
    db: sqlite3.Connection,
    track: Track,
    table: str,
    target: str,
    *,
    event: str,
    where: str,
    params: Sequence[Any] = (),
    expect: str | Iterable[str] | None = None,
    sets: str = "",
    set_params: Sequence[Any] = (),
    strict: bool = True,
) -> int:
    """Move the rows of ``table`` matching ``where`` (with ``params``) to ``target`` by ``event``,
    in the caller's SQLite transaction, setting also ``sets`` (SQL ``column=expression`` items, with
    ``set_params``); only rows in a state the move starts from (or in ``expect``) move. Returns how
    many moved. ``strict``: the caller names one row that must move; none moving raises
    :class:`InvalidTransition` naming its state (or :class:`NotFound`)."""
    sources = _sources(track, target, event, expect)
    extra = f", {sets}" if sets else ""
    moved = db.execute(
        f"UPDATE {table} SET state=?{extra} WHERE ({where}) AND state IN ({', '.join('?' * len(sources))})",
        (str(target), *set_params, *params, *(str(s) for s in sources)),
    ).rowcount
    if strict and moved != 1:
        current = db.execute(f"SELECT state FROM {table} WHERE {where}", tuple(params)).fetchone()
        if current is None:
            raise NotFound(f"no such {track.name}", reason=f"NO_{track.name.upper().replace(' ', '_')}")
        raise InvalidTransition(track.name, str(current[0]), target, event)
    return int(moved)


def mermaid(track: Track) -> str:
    return track.mermaid()


def diagrams() -> str:
    """The ``ARCHITECTURE.md`` block: one mermaid diagram per track."""
    parts = []
    for track in TRACKS:
        parts.append(f"**{track.name}** ({track.note})\n\n```mermaid\n{track.mermaid()}\n```")
    return "\n\n".join(parts)
