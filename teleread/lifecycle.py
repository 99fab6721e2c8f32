"""The hub's life-cycle mover: every state change of an exam, a report, a critical result, an upload,
a timer and a notification in the hub's database goes through this module, by the tables of
:mod:`teleread.tracks` (which it re-exports). ``open_exam`` and ``move_exam`` write the exam's new
state and its event in the caller's transaction, so the event table (the audit trail and the feed
of the live streams) never disagrees with the rows. A move the table does not allow raises
:class:`InvalidTransition`, naming both states. ``tests/test_lifecycle.py`` checks that no module
but this one and :mod:`teleread.tracks` (whose SQLite mover serves the clinic outbox) assigns
``state``, ``status`` or ``critical_state``, and ``ARCHITECTURE.md`` shows the diagrams drawn from
the tables (``python -m teleread.lifecycle``; ``tests/test_lifecycle.py`` fails when they drift).

A move is made by one conditional ``UPDATE ... WHERE state IN (allowed sources) RETURNING``, so two
hub processes racing for the same exam cannot both move it: the loser sees no row. With ``expect``
the caller says which states it is moving from and gets ``None`` when the row has moved on (a
triage worker finding the exam already triaged, the janitor finding an upload arrived); without it
a row in a state the move does not start from is an :class:`InvalidTransition`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, insert, select, update

from teleread.db.engine import utcnow
from teleread.db.schema import exams, notifications, reports, results, timers, uploads
from teleread.errors import NotFound
from teleread.events import record_event
from teleread.tracks import (  # noqa: F401  (the tables, re-exported for the hub's services)
    COMMITTED,
    CRITICAL,
    EXAM,
    HOLDING_UPLOADS,
    OUTBOX,
    READABLE,
    REFUSED_UPLOADS,
    NOTIFICATION,
    REPORT,
    SIGNED,
    TIMER,
    TRACKS,
    UPLOAD,
    Edge,
    InvalidTransition,
    Track,
    diagrams,
    mermaid,
)
from teleread.vocab import CriticalState, ExamState, NotificationStatus, ReportStatus, TimerStatus, UploadStatus

S, R, C, U, T, N = ExamState, ReportStatus, CriticalState, UploadStatus, TimerStatus, NotificationStatus


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


def open_timer(conn: Connection, *, values: Mapping[str, Any]) -> None:
    """A pending timer, unless one of the same kind, subject and step exists (then nothing)."""
    from sqlalchemy.dialects import postgresql, sqlite

    TIMER.initial(T.PENDING, None)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(timers).values(**values, status=T.PENDING)
    conn.execute(statement.on_conflict_do_nothing(index_elements=["kind", "subject", "step"]))


def move_timer(conn: Connection, timer_id: str, target: TimerStatus, *, values: Mapping[str, Any]) -> None:
    """Move a pending timer to ``target`` (fired, failed, or pending again after a failed attempt)."""
    _move_row(conn, TIMER, timers, "status", timers.c.id == timer_id, target, None, values, source=T.PENDING)


def open_notification(conn: Connection, *, values: Mapping[str, Any]) -> None:
    """A pending notification, unless one of the same kind, exam and step exists (then nothing)."""
    from sqlalchemy.dialects import postgresql, sqlite

    NOTIFICATION.initial(N.PENDING, None)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(notifications).values(**values, status=N.PENDING)
    conn.execute(statement.on_conflict_do_nothing(index_elements=["kind", "exam_id", "step", "ref"]))


def move_notification(
    conn: Connection, notification_id: str, target: NotificationStatus, *, values: Mapping[str, Any]
) -> None:
    """Move a pending notification to ``target`` (sent, failed, or pending again to retry)."""
    _move_row(conn, NOTIFICATION, notifications, "status", notifications.c.id == notification_id, target, None,
              values, source=N.PENDING)  # fmt: skip


def _exam_event(conn: Connection, exam: Mapping[Any, Any], event: str, actor_id: int | None, detail: Any) -> None:
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


def move_critical(
    conn: Connection, result_id: int, target: CriticalState, *, event: str, exam: Mapping[Any, Any],
    values: Mapping[str, Any] | None = None, actor_id: int | None = None, detail: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Move a critical result's communication to ``target`` and record ``event`` for its exam."""
    _move_row(conn, CRITICAL, results, "critical_state", results.c.id == result_id, target, event, values or {})
    _exam_event(conn, exam, event, actor_id, detail)


if __name__ == "__main__":  # python -m teleread.lifecycle: the ARCHITECTURE.md block
    print(diagrams())
