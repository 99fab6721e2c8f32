"""The life cycles, as data: which states an exam, a report, a critical result and an upload pass
through, and the only moves allowed between them.

Every state change in the hub goes through this module. ``open_exam`` and ``move_exam`` write the
exam's new state and its event in the caller's transaction, so the event table (the audit trail and
the feed of the live streams) never disagrees with the rows. A move the table does not allow raises
:class:`InvalidTransition`, naming both states. ``tests/test_static.py`` checks that no other module
assigns ``state`` or ``status`` on these tables, and ``ARCHITECTURE.md`` shows the diagrams that
:func:`mermaid` draws from the tables (``tests/test_lifecycle.py`` fails when they drift).

A move is made by one conditional ``UPDATE ... WHERE state IN (allowed sources) RETURNING``, so two
hub processes racing for the same exam cannot both move it: the loser sees no row. With ``expect``
the caller says which states it is moving from and gets ``None`` when the row has moved on (a triage
worker finding the exam already triaged, the janitor finding an upload arrived); without it a row in
a state the move does not start from is an :class:`InvalidTransition`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, insert, select, update

from teleread.db.engine import utcnow
from teleread.db.schema import exams, reports, results, uploads
from teleread.errors import Conflict, NotFound
from teleread.events import record_event
from teleread.vocab import CriticalState, ExamState, ReportStatus, UploadStatus


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
    the event row the move writes (None on the upload track, whose rows carry their own times)."""

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

TRACKS = (EXAM, REPORT, CRITICAL, UPLOAD)

# Exam states grouped by what they mean to the services.
READABLE = (S.QUEUED, S.IN_READING, S.REPORTED, S.DELIVERED, S.ACKNOWLEDGED)  # a reader may open it
SIGNED = (S.REPORTED, S.DELIVERED, S.ACKNOWLEDGED)  # a signed report exists
COMMITTED = (S.RECEIVED, S.TRIAGED, S.QUEUED, S.IN_READING, *SIGNED)  # its objects are all in
REFUSED_UPLOADS = (U.REJECTED, U.REFUSED)  # an upload whose bytes are gone, with a refusal record
HOLDING_UPLOADS = (U.STORED, U.DUPLICATE)  # an upload that points to an object row


def open_exam(
    conn: Connection, *, values: Mapping[str, Any], actor_id: int | None, detail: dict[str, Any] | None
) -> None:
    """Insert a new exam in ``receiving`` with its ``opened`` event."""
    EXAM.initial(S.RECEIVING, "opened")
    conn.execute(insert(exams).values(**values, state=S.RECEIVING))
    record_event(
        conn, type="opened", exam_id=str(values["id"]), site_id=int(values["site_id"]), actor_id=actor_id, detail=detail
    )


def move_exam(
    conn: Connection,
    exam_id: str,
    target: ExamState,
    *,
    event: str,
    expect: ExamState | Iterable[ExamState] | None = None,
    when: ColumnElement[bool] | None = None,
    values: Mapping[str, Any] | None = None,
    actor_id: int | None = None,
    detail: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    also: Iterable[tuple[str, dict[str, Any] | None]] = (),
) -> dict[str, Any] | None:
    """Move the exam to ``target`` by ``event``, with ``values`` set on its row, and write the event
    (then each of ``also``, events that change no state) in the caller's transaction.

    The event carries the site, hospital and specialty of the row after the move, and ``detail``
    (or what ``detail`` makes of the row after the move, when it is a function). Returns the row
    after the move. With ``expect`` (or ``when``, an extra condition on the row), ``None`` when the
    exam is not in one of those states (or the condition fails): nothing changes. Without them, a row
    in a state the move does not start from raises :class:`InvalidTransition`."""
    allowed = EXAM.sources(target, event)
    if not allowed:
        raise InvalidTransition(EXAM.name, None, target, event)
    sources = allowed
    if expect is not None:
        wanted = (expect,) if isinstance(expect, ExamState) else tuple(expect)
        for state in wanted:
            EXAM.edge(state, target, event)  # a caller expecting a move the table lacks is a bug
        sources = wanted
    stmt = (
        update(exams)
        .where(exams.c.id == exam_id, exams.c.state.in_([str(s) for s in sources]))
        .values(**{"updated_at": utcnow(), **(values or {})}, state=target)
        .returning(*exams.c)
    )
    if when is not None:
        stmt = stmt.where(when)
    row = conn.execute(stmt).first()
    if row is None:
        if expect is not None or when is not None:
            return None
        current = conn.execute(select(exams.c.state).where(exams.c.id == exam_id)).scalar()
        if current is None:
            raise NotFound("no such exam", reason="NO_EXAM")
        raise InvalidTransition(EXAM.name, str(current), target, event)
    exam = dict(row._mapping)
    context = {"exam_id": exam_id, "site_id": exam["site_id"], "hospital": exam["hospital"] or ""}
    context["specialty"] = exam["specialty"] or ""
    record_event(conn, type=event, actor_id=actor_id, detail=detail(exam) if callable(detail) else detail, **context)
    for extra, extra_detail in also:
        record_event(conn, type=extra, actor_id=actor_id, detail=extra_detail, **context)
    return exam


def _move_row(
    conn: Connection, track: Track, table: Table, column: str, key: ColumnElement[bool], target: str, event: str | None,
    values: Mapping[str, Any], source: str | None = None,
) -> None:  # fmt: skip
    sources = (source,) if source is not None else track.sources(target, event)
    if source is not None:
        track.edge(source, target, event)
    if not sources:
        raise InvalidTransition(track.name, None, target, event)
    col = table.c[column]
    changed = conn.execute(update(table).where(key, col.in_(sources)).values(**values, **{column: target})).rowcount
    if changed != 1:
        current = conn.execute(select(col).where(key)).scalar()
        if current is None:
            raise NotFound(f"no such {track.name}", reason=f"NO_{track.name.upper().replace(' ', '_')}")
        raise InvalidTransition(track.name, str(current), target, event)


def open_upload(conn: Connection, *, values: Mapping[str, Any]) -> None:
    UPLOAD.initial(U.PARTIAL, None)
    conn.execute(insert(uploads).values(**values, state=U.PARTIAL))


def move_upload(conn: Connection, upload_id: str, target: UploadStatus, *, values: Mapping[str, Any]) -> None:
    """Move one upload to ``target`` (from any state the track allows it from)."""
    _move_row(conn, UPLOAD, uploads, "state", uploads.c.id == upload_id, target, None, values)


def move_uploads(
    conn: Connection, upload_ids: Iterable[str], target: UploadStatus, *, values: Mapping[str, Any]
) -> int:
    """Move many uploads to ``target``; those in a state the move does not start from stay as they are."""
    ids = list(upload_ids)
    if not ids:
        return 0
    sources = UPLOAD.sources(target, None)
    stmt = update(uploads).where(uploads.c.id.in_(ids), uploads.c.state.in_(sources))
    return int(conn.execute(stmt.values(**values, state=target)).rowcount)


def _exam_event(conn: Connection, exam: Mapping[str, Any], event: str, actor_id: int | None, detail: Any) -> None:
    record_event(
        conn, type=event, exam_id=str(exam["id"]), site_id=int(exam["site_id"]), hospital=exam["hospital"] or "",
        specialty=exam["specialty"] or "", actor_id=actor_id, detail=detail,
    )  # fmt: skip


def check_new_version(latest: str | None, status: ReportStatus, event: str) -> None:
    """Whether a report version in ``status`` may follow the exam's latest version (None: the first
    version): a draft only as the first, an amendment only after a final or amended version."""
    REPORT.edge(None if latest is None or status is R.DRAFT else str(latest), status, event)
    if status is R.DRAFT and latest is not None:
        raise InvalidTransition(REPORT.name, str(latest), status, event)


def new_report_version(
    conn: Connection,
    exam: Mapping[str, Any],
    status: ReportStatus,
    *,
    event: str,
    values: Mapping[str, Any],
    actor_id: int | None,
    record: bool,
) -> int:
    """Insert a report version of ``exam``: a first ``draft``, or an amendment (``amended``, after
    a final or amended latest version). Returns its id. ``record``: write ``event`` (False when the
    exam's own move in the same transaction is the record, as an amendment's ``amended`` is)."""
    latest = conn.execute(
        select(reports.c.status).where(reports.c.exam_id == exam["id"]).order_by(reports.c.version.desc()).limit(1)
    ).scalar()
    check_new_version(latest, status, event)
    stmt = insert(reports).values(**values, exam_id=exam["id"], status=status).returning(reports.c.id)
    report_id = int(conn.execute(stmt).scalar_one())
    if record:
        _exam_event(conn, exam, event, actor_id, {"report": report_id})
    return report_id


def move_report(
    conn: Connection,
    exam: Mapping[str, Any],
    report_id: int,
    target: ReportStatus,
    *,
    event: str,
    source: ReportStatus,
    values: Mapping[str, Any],
    actor_id: int | None,
    record: bool,
) -> None:
    """Move one report version of ``exam`` from ``source`` to ``target`` (a draft saved again, a
    draft signed); ``record`` as for :func:`new_report_version`."""
    _move_row(conn, REPORT, reports, "status", reports.c.id == report_id, target, event, values, source=source)
    if record:
        _exam_event(conn, exam, event, actor_id, {"report": report_id})


def new_result(conn: Connection, *, values: Mapping[str, Any], critical: bool) -> None:
    """Insert a published result version; a critical one starts its own track at ``notified``."""
    if critical:
        CRITICAL.initial(C.NOTIFIED, "critical_result")
    conn.execute(insert(results).values(**values, critical=critical, critical_state=C.NOTIFIED if critical else ""))


def mermaid(track: Track) -> str:
    return track.mermaid()


def diagrams() -> str:
    """The ``ARCHITECTURE.md`` block: one mermaid diagram per track."""
    parts = []
    for track in TRACKS:
        parts.append(f"**{track.name}** ({track.note})\n\n```mermaid\n{track.mermaid()}\n```")
    return "\n\n".join(parts)


if __name__ == "__main__":  # python -m teleread.lifecycle: the ARCHITECTURE.md block
    print(diagrams())
