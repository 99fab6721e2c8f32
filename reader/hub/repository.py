"""The reading side's repository: exams under claim, report versions and published results, as typed
objects, behind a unit of work (one transaction).

The queue, report and results services take a :class:`UnitOfWork` and never see a connection:
``with uow() as tx`` opens one write transaction, ``with uow.read() as tx`` a read-only one, and
``tx.exams``, ``tx.reports`` and ``tx.results`` are the three repositories in it. Every state change
they make goes through ``teleread.lifecycle`` with its event. :class:`SqlUnitOfWork` works on the
database (claim-next locks its row with ``FOR NO KEY UPDATE SKIP LOCKED`` on PostgreSQL, a site's next
result number is taken under the site's row lock); :class:`MemoryUnitOfWork` keeps plain rows for
unit tests, checks every move against the same life-cycle tables, and undoes what a transaction
changed when it raises.

What a screen shows (the worklist, an exam's objects and related exams, the watch feed's rows) is
read by plain queries beside the services; decisions and changes go through here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Select, or_, select, update

from teleread import lifecycle
from teleread.db.engine import as_utc, is_postgres, locked_for_change, reading
from teleread.db.schema import exams, principals, reports, results, sites
from teleread.errors import Conflict, NotFound
from teleread.lifecycle import InvalidTransition
from teleread.reader.hub.claims import CLAIMABLE, ExamRecord, claim_event, claimable
from teleread.reader.hub.roster import ClaimScope, Decision, ExamFacts, ReaderProfile, Roster
from teleread.reader.hub.sla import UNACKNOWLEDGED
from teleread.reader.hub.timers import schedule
from teleread.vocab import CriticalState, ExamState, ReportStatus

SIGNED = (ReportStatus.FINAL, ReportStatus.AMENDED)  # versions that are published and printed
Detail = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]] | None
Also = Iterable[tuple[str, dict[str, Any] | None]]


# ---- typed objects -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportRecord:
    """One version of an exam's report."""

    id: int
    exam_id: str
    version: int
    status: ReportStatus
    text: str
    impression: str
    critical: bool
    author_id: int
    signed_by: int | None
    signed_at: datetime | None
    amends_reason: str
    sha256: str
    created_at: datetime | None
    pdf_sha256: str = ""  # the printed report's bytes; '' until the hub rendered them
    pdf_size: int = 0
    statements_json: str = ""  # an ECG report's statements (JSON list); '' when none
    measurements_json: str = ""  # the reader's measurements (JSON: values and which were edited); '' when none

    @classmethod
    def of(cls, row: Mapping[Any, Any]) -> ReportRecord:
        return cls(
            id=int(row["id"]),
            exam_id=str(row["exam_id"]),
            version=int(row["version"]),
            status=ReportStatus(row["status"]),
            text=row["text"],
            impression=row["impression"] or "",
            critical=bool(row["critical"]),
            author_id=int(row["author_id"]),
            signed_by=row["signed_by"],
            signed_at=as_utc(row["signed_at"]),
            amends_reason=row["amends_reason"] or "",
            sha256=row["sha256"] or "",
            created_at=as_utc(row["created_at"]),
            pdf_sha256=row.get("pdf_sha256") or "",
            pdf_size=int(row.get("pdf_size") or 0),
            statements_json=row.get("statements_json") or "",
            measurements_json=row.get("measurements_json") or "",
        )

    @property
    def signed(self) -> bool:
        return self.status in SIGNED

    def fields(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResultRecord:
    """A report version published to the requesting site: the site's cursor ``seq``, the exam as it
    is now (a row to show) and the version published."""

    seq: int
    site_id: int
    critical: bool
    critical_state: str
    published_at: datetime | None
    report: ReportRecord
    signer_name: str
    exam: Mapping[str, Any] = field(repr=False, compare=False)
    # a critical result's acknowledgement (name, role, method, read_back, at), once given
    acknowledgement: Mapping[str, Any] | None = field(default=None, repr=False)


_R, _X = "report__", "result__"  # column label prefixes of the result query


def result_query(site_id: int) -> Select[Any]:
    """The site's published results with their exam, report version and signer's name; rows for
    :meth:`ResultRecord`-building by :func:`result_of`."""
    signer = principals.alias("signer")
    return (
        select(
            exams,
            *[c.label(_R + c.name) for c in reports.c],
            *[c.label(_X + c.name) for c in results.c],
            signer.c.name.label("signer_name"),
        )
        .select_from(
            results.join(exams, results.c.exam_id == exams.c.id)
            .join(reports, results.c.report_id == reports.c.id)
            .outerjoin(signer, reports.c.signed_by == signer.c.id)
        )
        .where(results.c.site_id == site_id)
    )


def result_of(row: Mapping[Any, Any]) -> ResultRecord:
    """A :class:`ResultRecord` from one row of :func:`result_query`."""
    return ResultRecord(
        seq=int(row[_X + "seq"]),
        site_id=int(row[_X + "site_id"]),
        critical=bool(row[_X + "critical"]),
        critical_state=row[_X + "critical_state"] or "",
        published_at=as_utc(row[_X + "published_at"]),
        report=ReportRecord.of({c.name: row[_R + c.name] for c in reports.c}),
        signer_name=row["signer_name"] or "",
        exam={c.name: row[c.name] for c in exams.c},
        acknowledgement=(
            {
                "name": row[_X + "ack_name"],
                "role": row[_X + "ack_role"],
                "method": row[_X + "ack_method"],
                "read_back": row[_X + "ack_read_back"],
                "at": as_utc(row[_X + "acknowledged_at"]),
            }
            if row[_X + "acknowledged_at"] is not None
            else None
        ),  # fmt: skip
    )


def queue_order() -> list[Any]:
    """Most urgent first: level, then deadline, then arrival."""
    return [exams.c.level_rank, exams.c.deadline, exams.c.received_at, exams.c.id]


def scope_clauses(scope: ClaimScope, now: datetime) -> list[Any]:
    """The database's side of the roster's rule for one reader (``roster.decide``)."""
    clauses: list[Any] = [
        or_(exams.c.offered_to.is_(None), exams.c.offered_to == scope.reader_id, exams.c.offer_until <= now)
    ]
    if scope.site_ids is not None:
        clauses.append(exams.c.site_id.in_(sorted(scope.site_ids)))
    if scope.modalities is not None:
        clauses.append(exams.c.modality.in_(sorted(scope.modalities)))
    if scope.reserved:
        clauses.append(exams.c.subspecialty.not_in(sorted(scope.reserved)))
    return clauses


def in_scope(row: Mapping[str, Any], scope: ClaimScope, now: datetime) -> bool:
    """:func:`scope_clauses` on a row (the in-memory repository)."""
    offer = as_utc(row.get("offer_until"))
    return (
        (row.get("offered_to") in (None, scope.reader_id) or (offer is not None and offer <= now))
        and (scope.site_ids is None or row["site_id"] in scope.site_ids)
        and (scope.modalities is None or row["modality"] in scope.modalities)
        and (row.get("subspecialty") or "") not in scope.reserved
    )


def _order_key(row: Mapping[str, Any]) -> Any:
    return (row["level_rank"], as_utc(row["deadline"]), as_utc(row["received_at"]), row["id"])


# ---- the repositories ----------------------------------------------------------------------------
class ExamRepository(Protocol):
    def get(self, exam_id: str, *, lock: bool = False) -> ExamRecord | None: ...

    def next_claimable(
        self, *, hospital: str, specialty: str, now: datetime, scope: ClaimScope | None = None
    ) -> ExamRecord | None:
        """The most urgent claimable exam of the hospital and specialty (locked, skipping locked rows)
        within ``scope``: the reader's sites, modalities and subspecialties, and not an exam first
        offered to another reader while that offer stands."""
        ...

    def take(self, exam_id: str, state: ExamState, *, reader_id: int, until: datetime, now: datetime) -> ExamRecord:
        """Claim: ``state`` (in reading, or reported for an amendment), the next fence, the lease."""
        ...

    def extend(self, exam_id: str, *, until: datetime, now: datetime) -> ExamRecord: ...

    def drop(
        self, exam_id: str, state: ExamState, *, event: str, actor_id: int, now: datetime, detail: Detail = None,
        also: Also = (),
    ) -> ExamRecord:  # fmt: skip
        """End the claim, moving the exam to ``state`` by ``event`` (then the events ``also``)."""
        ...


class ReportRepository(Protocol):
    def latest(self, exam_id: str) -> ReportRecord | None: ...

    def versions(self, exam_id: str) -> list[ReportRecord]: ...

    def add(
        self, exam: ExamRecord, status: ReportStatus, *, event: str, values: Mapping[str, Any], actor_id: int,
        record: bool,
    ) -> ReportRecord:  # fmt: skip
        """A new version (a first draft, or an amendment); ``record``: write ``event`` for the exam."""
        ...

    def move(
        self, exam: ExamRecord, report_id: int, target: ReportStatus, *, event: str, source: ReportStatus,
        values: Mapping[str, Any], actor_id: int, record: bool,
    ) -> ReportRecord:  # fmt: skip
        ...

    def set_pdf(self, report_id: int, *, sha256: str | None, size: int | None) -> None:
        """Record (or, with None, forget) the printed report of a signed version."""
        ...

    def without_pdf(self, *, limit: int) -> list[ReportRecord]:
        """Signed versions whose printed report is not recorded, oldest first."""
        ...


class ResultRepository(Protocol):
    def publish(
        self, exam: ExamRecord, *, report_id: int, critical: bool, now: datetime,
        unacknowledged: tuple[tuple[int, str], ...] = (),
    ) -> int:  # fmt: skip
        """Publish a report version as the site's next result; returns its cursor (gapless per site).
        A critical one gets a timer per step of ``unacknowledged`` (minutes, audience)."""
        ...

    def acknowledge(self, site_id: int, *, seq: int, values: Mapping[str, Any], actor_id: int) -> ResultRecord:
        """A named person's acknowledgement of the site's critical result ``seq``."""
        ...

    def after(self, site_id: int, *, after: int, limit: int) -> list[ResultRecord]: ...

    def latest_for(self, site_id: int, exam_id: str) -> ResultRecord | None: ...


class RosterView(Protocol):
    """The roster in a transaction (``reader/hub/roster.py``)."""

    def profile(self, reader_id: int) -> ReaderProfile | None: ...

    def scope(self, reader_id: int, at: datetime) -> ClaimScope | None:
        """What claim-next may give the reader now; None when they are not on duty."""
        ...

    def facts(self, exam: ExamRecord) -> ExamFacts: ...

    def decisions(self, exam: ExamRecord, at: datetime) -> list[Decision]: ...


class Tx(Protocol):
    exams: ExamRepository
    reports: ReportRepository
    results: ResultRepository
    roster: RosterView


class UnitOfWork(Protocol):
    def __call__(self) -> AbstractContextManager[Tx]:
        """One write transaction."""
        ...

    def read(self) -> AbstractContextManager[Tx]:
        """One read-only transaction."""
        ...


# ---- on the database -----------------------------------------------------------------------------
class SqlExamRepository:
    def __init__(self, conn: Connection, *, postgres: bool) -> None:
        self.conn = conn
        self._pg = postgres

    def get(self, exam_id: str, *, lock: bool = False) -> ExamRecord | None:
        query = select(exams).where(exams.c.id == exam_id)
        if lock and self._pg:
            query = locked_for_change(query)
        row = self.conn.execute(query).first()
        return None if row is None else ExamRecord.of(dict(row._mapping))

    def next_claimable(
        self, *, hospital: str, specialty: str, now: datetime, scope: ClaimScope | None = None
    ) -> ExamRecord | None:
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
        if scope is not None:
            pick = pick.where(*scope_clauses(scope, now))
        if self._pg:
            pick = locked_for_change(pick, skip_locked=True)
        row = self.conn.execute(pick).first()
        return None if row is None else ExamRecord.of(dict(row._mapping))

    def take(self, exam_id: str, state: ExamState, *, reader_id: int, until: datetime, now: datetime) -> ExamRecord:
        row = lifecycle.move_exam(
            self.conn,
            exam_id,
            state,
            event=claim_event(state),
            values={
                "claimed_by": reader_id,
                "lease_expires_at": until,
                "fence": exams.c.fence + 1,
                "updated_at": now,
                "offered_to": None,
                "offer_until": None,
            },  # a claim ends the offer  # fmt: skip
            actor_id=reader_id,
            detail=lambda after: {"fence": after["fence"]},
        )
        assert row is not None  # without expect a refused move raises
        return ExamRecord.of(row)

    def extend(self, exam_id: str, *, until: datetime, now: datetime) -> ExamRecord:
        row = self.conn.execute(
            update(exams)
            .where(exams.c.id == exam_id)
            .values(lease_expires_at=until, updated_at=now)
            .returning(*exams.c)
        ).one()
        return ExamRecord.of(dict(row._mapping))

    def drop(
        self, exam_id: str, state: ExamState, *, event: str, actor_id: int, now: datetime, detail: Detail = None,
        also: Also = (),
    ) -> ExamRecord:  # fmt: skip
        row = lifecycle.move_exam(
            self.conn,
            exam_id,
            state,
            event=event,
            values={"claimed_by": None, "lease_expires_at": None, "updated_at": now},
            actor_id=actor_id,
            detail=detail,
            also=also,
        )
        assert row is not None
        return ExamRecord.of(row)


class SqlReportRepository:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _one(self, report_id: int) -> ReportRecord:
        return ReportRecord.of(self.conn.execute(select(reports).where(reports.c.id == report_id)).one()._mapping)

    def latest(self, exam_id: str) -> ReportRecord | None:
        row = self.conn.execute(
            select(reports).where(reports.c.exam_id == exam_id).order_by(reports.c.version.desc()).limit(1)
        ).first()
        return None if row is None else ReportRecord.of(row._mapping)

    def versions(self, exam_id: str) -> list[ReportRecord]:
        query = select(reports).where(reports.c.exam_id == exam_id).order_by(reports.c.version)
        return [ReportRecord.of(r._mapping) for r in self.conn.execute(query)]

    def add(
        self, exam: ExamRecord, status: ReportStatus, *, event: str, values: Mapping[str, Any], actor_id: int,
        record: bool,
    ) -> ReportRecord:  # fmt: skip
        report_id = lifecycle.new_report_version(
            self.conn, exam.row, status, event=event, values=values, actor_id=actor_id, record=record
        )
        return self._one(report_id)

    def move(
        self, exam: ExamRecord, report_id: int, target: ReportStatus, *, event: str, source: ReportStatus,
        values: Mapping[str, Any], actor_id: int, record: bool,
    ) -> ReportRecord:  # fmt: skip
        lifecycle.move_report(
            self.conn, exam.row, report_id, target, event=event, source=source, values=values, actor_id=actor_id,
            record=record,
        )  # fmt: skip
        return self._one(report_id)

    def set_pdf(self, report_id: int, *, sha256: str | None, size: int | None) -> None:
        self.conn.execute(update(reports).where(reports.c.id == report_id).values(pdf_sha256=sha256, pdf_size=size))

    def without_pdf(self, *, limit: int) -> list[ReportRecord]:
        query = (
            select(reports)
            .where(reports.c.status.in_(SIGNED), reports.c.pdf_sha256.is_(None))
            .order_by(reports.c.id)
            .limit(limit)
        )
        return [ReportRecord.of(r._mapping) for r in self.conn.execute(query)]


class SqlResultRepository:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def publish(
        self, exam: ExamRecord, *, report_id: int, critical: bool, now: datetime,
        unacknowledged: tuple[tuple[int, str], ...] = (),
    ) -> int:  # fmt: skip
        seq = self.conn.execute(
            update(sites)
            .where(sites.c.id == exam.site_id)
            .values(result_seq=sites.c.result_seq + 1)
            .returning(sites.c.result_seq)
        ).scalar_one()
        values = {"site_id": exam.site_id, "seq": seq, "exam_id": exam.id, "report_id": report_id, "published_at": now}
        lifecycle.new_result(self.conn, values=values, critical=critical)
        if critical:
            result_id = self.conn.execute(
                select(results.c.id).where(results.c.site_id == exam.site_id, results.c.seq == seq)
            ).scalar_one()
            for step, (minutes, audience) in enumerate(unacknowledged):
                detail = {"notify": audience, "after_minutes": minutes}
                schedule(self.conn, kind=UNACKNOWLEDGED, subject=str(result_id), step=step,
                         due_at=now + timedelta(minutes=minutes), detail=detail)  # fmt: skip
        return int(seq)

    def acknowledge(self, site_id: int, *, seq: int, values: Mapping[str, Any], actor_id: int) -> ResultRecord:
        row = self.conn.execute(
            locked_for_change(select(results).where(results.c.site_id == site_id, results.c.seq == seq))
        ).first()
        if row is None:
            raise NotFound("no result with that cursor at this site", reason="RESULT_NOT_FOUND")
        if not row.critical:
            raise Conflict("that result is not critical", reason="NOT_CRITICAL")
        if row.critical_state == CriticalState.ACKNOWLEDGED:
            raise Conflict("that critical result was acknowledged already", reason="CRITICAL_ALREADY_ACKNOWLEDGED")
        exam = self.conn.execute(select(exams).where(exams.c.id == row.exam_id)).mappings().one()
        lifecycle.move_critical(
            self.conn, row.id, CriticalState.ACKNOWLEDGED, event="critical_acknowledged", exam=exam,
            values={**values, "acknowledged_by": actor_id}, actor_id=actor_id,
            detail={"cursor": seq, "method": values["ack_method"]},
        )  # fmt: skip
        found = self.conn.execute(result_query(site_id).where(results.c.seq == seq)).first()
        assert found is not None
        return result_of(found._mapping)

    def after(self, site_id: int, *, after: int, limit: int) -> list[ResultRecord]:
        query = result_query(site_id).where(results.c.seq > after).order_by(results.c.seq).limit(limit)
        return [result_of(r._mapping) for r in self.conn.execute(query)]

    def latest_for(self, site_id: int, exam_id: str) -> ResultRecord | None:
        query = result_query(site_id).where(results.c.exam_id == exam_id).order_by(results.c.seq.desc()).limit(1)
        row = self.conn.execute(query).first()
        return None if row is None else result_of(row._mapping)


class SqlRosterView:
    def __init__(self, conn: Connection, roster: Roster) -> None:
        self.conn = conn
        self._roster = roster

    def profile(self, reader_id: int) -> ReaderProfile | None:
        return self._roster.profile(self.conn, reader_id)

    def scope(self, reader_id: int, at: datetime) -> ClaimScope | None:
        return self._roster.scope(self.conn, reader_id, at)

    def facts(self, exam: ExamRecord) -> ExamFacts:
        return self._roster.facts(self.conn, exam.row)

    def decisions(self, exam: ExamRecord, at: datetime) -> list[Decision]:
        return self._roster.decisions(self.conn, exam.row, at)


@dataclass
class SqlTx:
    exams: SqlExamRepository
    reports: SqlReportRepository
    results: SqlResultRepository
    roster: SqlRosterView

    @classmethod
    def on(cls, conn: Connection, *, postgres: bool, roster: Roster) -> SqlTx:
        return cls(SqlExamRepository(conn, postgres=postgres), SqlReportRepository(conn), SqlResultRepository(conn),
                   SqlRosterView(conn, roster))  # fmt: skip


class SqlUnitOfWork:
    def __init__(self, engine: Engine, *, roster: Roster | None = None) -> None:
        self._engine = engine
        self._pg = is_postgres(engine)
        self.roster = roster or Roster.default()

    @contextmanager
    def __call__(self) -> Iterator[SqlTx]:
        with self._engine.begin() as conn:
            yield SqlTx.on(conn, postgres=self._pg, roster=self.roster)

    @contextmanager
    def read(self) -> Iterator[SqlTx]:
        with reading(self._engine) as conn:
            yield SqlTx.on(conn, postgres=False, roster=self.roster)  # no row locks in a read


# ---- in memory, for unit tests -------------------------------------------------------------------
@dataclass
class MemoryStore:
    """The rows and events a :class:`MemoryUnitOfWork` keeps."""

    exams: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    result_seq: dict[int, int] = field(default_factory=dict)  # site id -> last cursor
    names: dict[int, str] = field(default_factory=dict)  # principal id -> name
    profiles: dict[int, ReaderProfile] = field(default_factory=dict)  # principal id -> roster entry
    events: list[dict[str, Any]] = field(default_factory=list)
    timers: list[dict[str, Any]] = field(default_factory=list)  # what the database's timers would hold

    def add(self, **row: Any) -> None:
        base = {"claimed_by": None, "lease_expires_at": None, "fence": 0, "deadline": None, "received_at": None}
        self.exams[str(row["id"])] = {**base, **row}

    def event(self, type: str, exam_id: str, actor_id: int | None, detail: Any) -> None:
        self.events.append({"type": type, "exam_id": exam_id, "actor_id": actor_id, "detail": detail})


class MemoryExamRepository:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def get(self, exam_id: str, *, lock: bool = False) -> ExamRecord | None:
        row = self._s.exams.get(exam_id)
        return None if row is None else ExamRecord.of(dict(row))

    def next_claimable(
        self, *, hospital: str, specialty: str, now: datetime, scope: ClaimScope | None = None
    ) -> ExamRecord | None:
        rows = [
            r
            for r in self._s.exams.values()
            if r["hospital"] == hospital and r["specialty"] == specialty and claimable(ExamRecord.of(r), now)
            and (scope is None or in_scope(r, scope, now))
        ]  # fmt: skip
        rows.sort(key=_order_key)
        return ExamRecord.of(dict(rows[0])) if rows else None

    def _move(
        self, exam_id: str, state: ExamState, event: str, values: dict[str, Any], actor_id: int, detail: Detail,
        also: Also = (),
    ) -> ExamRecord:  # fmt: skip
        row = self._s.exams.get(exam_id)
        if row is None:
            raise NotFound("no such exam", reason="NO_EXAM")
        lifecycle.EXAM.edge(row["state"], state, event)
        row.update(values, state=state)
        self._s.event(event, exam_id, actor_id, detail(dict(row)) if callable(detail) else detail)
        for extra, extra_detail in also:
            self._s.event(extra, exam_id, actor_id, extra_detail)
        return ExamRecord.of(dict(row))

    def take(self, exam_id: str, state: ExamState, *, reader_id: int, until: datetime, now: datetime) -> ExamRecord:
        fence = int(self._s.exams[exam_id]["fence"]) + 1
        values = {"claimed_by": reader_id, "lease_expires_at": until, "fence": fence, "updated_at": now,
                  "offered_to": None, "offer_until": None}  # fmt: skip
        return self._move(exam_id, state, claim_event(state), values, reader_id, {"fence": fence})

    def extend(self, exam_id: str, *, until: datetime, now: datetime) -> ExamRecord:
        self._s.exams[exam_id].update(lease_expires_at=until, updated_at=now)
        return ExamRecord.of(dict(self._s.exams[exam_id]))

    def drop(
        self, exam_id: str, state: ExamState, *, event: str, actor_id: int, now: datetime, detail: Detail = None,
        also: Also = (),
    ) -> ExamRecord:  # fmt: skip
        values = {"claimed_by": None, "lease_expires_at": None, "updated_at": now}
        return self._move(exam_id, state, event, values, actor_id, detail, also)


class MemoryReportRepository:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def versions(self, exam_id: str) -> list[ReportRecord]:
        rows = sorted((r for r in self._s.reports.values() if r["exam_id"] == exam_id), key=lambda r: r["version"])
        return [ReportRecord.of(r) for r in rows]

    def latest(self, exam_id: str) -> ReportRecord | None:
        versions = self.versions(exam_id)
        return versions[-1] if versions else None

    def add(
        self, exam: ExamRecord, status: ReportStatus, *, event: str, values: Mapping[str, Any], actor_id: int,
        record: bool,
    ) -> ReportRecord:  # fmt: skip
        latest = self.latest(exam.id)
        lifecycle.check_new_version(None if latest is None else latest.status, status, event)
        if any(r["exam_id"] == exam.id and r["version"] == values["version"] for r in self._s.reports.values()):
            raise RuntimeError("uq_reports_exam_version")  # what the database's unique constraint would refuse
        report_id = max(self._s.reports, default=0) + 1
        base = {"impression": "", "critical": False, "signed_by": None, "signed_at": None, "amends_reason": ""}
        self._s.reports[report_id] = {
            **base, "sha256": "", "created_at": None, **values, "id": report_id, "exam_id": exam.id, "status": status,
        }  # fmt: skip
        if record:
            self._s.event(event, exam.id, actor_id, {"report": report_id})
        return ReportRecord.of(self._s.reports[report_id])

    def move(
        self, exam: ExamRecord, report_id: int, target: ReportStatus, *, event: str, source: ReportStatus,
        values: Mapping[str, Any], actor_id: int, record: bool,
    ) -> ReportRecord:  # fmt: skip
        lifecycle.REPORT.edge(source, target, event)
        row = self._s.reports.get(report_id)
        if row is None:
            raise NotFound("no such report", reason="NO_REPORT")
        if row["status"] != source:
            raise InvalidTransition(lifecycle.REPORT.name, str(row["status"]), target, event)
        row.update(values, status=target)
        if record:
            self._s.event(event, exam.id, actor_id, {"report": report_id})
        return ReportRecord.of(row)

    def set_pdf(self, report_id: int, *, sha256: str | None, size: int | None) -> None:
        self._s.reports[report_id].update(pdf_sha256=sha256, pdf_size=size)

    def without_pdf(self, *, limit: int) -> list[ReportRecord]:
        rows = [r for _, r in sorted(self._s.reports.items()) if r["status"] in SIGNED and not r.get("pdf_sha256")]
        return [ReportRecord.of(r) for r in rows[:limit]]


class MemoryResultRepository:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def publish(
        self, exam: ExamRecord, *, report_id: int, critical: bool, now: datetime,
        unacknowledged: tuple[tuple[int, str], ...] = (),
    ) -> int:  # fmt: skip
        if critical:
            lifecycle.CRITICAL.initial(CriticalState.NOTIFIED, "critical_result")
            for step, (minutes, audience) in enumerate(unacknowledged):
                self._s.timers.append({"kind": UNACKNOWLEDGED, "exam_id": exam.id, "step": step, "notify": audience,
                                       "due_at": now + timedelta(minutes=minutes)})  # fmt: skip
        seq = self._s.result_seq.get(exam.site_id, 0) + 1
        self._s.result_seq[exam.site_id] = seq
        self._s.results.append(
            {
                "site_id": exam.site_id, "seq": seq, "exam_id": exam.id, "report_id": report_id, "critical": critical,
                "critical_state": CriticalState.NOTIFIED if critical else "", "published_at": now,
            }
        )  # fmt: skip
        return seq

    def _record(self, row: Mapping[str, Any]) -> ResultRecord:
        report = ReportRecord.of(self._s.reports[row["report_id"]])
        ack = row.get("ack")
        return ResultRecord(
            seq=row["seq"], site_id=row["site_id"], critical=row["critical"], critical_state=row["critical_state"],
            published_at=row["published_at"], report=report, signer_name=self._s.names.get(report.signed_by or 0, ""),
            exam=dict(self._s.exams[row["exam_id"]]), acknowledgement=dict(ack) if ack else None,
        )  # fmt: skip

    def acknowledge(self, site_id: int, *, seq: int, values: Mapping[str, Any], actor_id: int) -> ResultRecord:
        row = next((r for r in self._s.results if r["site_id"] == site_id and r["seq"] == seq), None)
        if row is None:
            raise NotFound("no result with that cursor at this site", reason="RESULT_NOT_FOUND")
        if not row["critical"]:
            raise Conflict("that result is not critical", reason="NOT_CRITICAL")
        if row["critical_state"] == CriticalState.ACKNOWLEDGED:
            raise Conflict("that critical result was acknowledged already", reason="CRITICAL_ALREADY_ACKNOWLEDGED")
        lifecycle.CRITICAL.edge(row["critical_state"], CriticalState.ACKNOWLEDGED, "critical_acknowledged")
        row["critical_state"] = CriticalState.ACKNOWLEDGED
        row["ack"] = {"name": values["ack_name"], "role": values["ack_role"], "method": values["ack_method"],
                      "read_back": values["ack_read_back"], "at": values["acknowledged_at"]}  # fmt: skip
        self._s.event("critical_acknowledged", row["exam_id"], actor_id, {"cursor": seq})
        return self._record(row)

    def after(self, site_id: int, *, after: int, limit: int) -> list[ResultRecord]:
        rows = [r for r in self._s.results if r["site_id"] == site_id and r["seq"] > after]
        rows.sort(key=lambda r: r["seq"])
        return [self._record(r) for r in rows[:limit]]

    def latest_for(self, site_id: int, exam_id: str) -> ResultRecord | None:
        rows = [r for r in self._s.results if r["site_id"] == site_id and r["exam_id"] == exam_id]
        return self._record(max(rows, key=lambda r: r["seq"])) if rows else None


class MemoryRosterView:
    """Without a roster: every reader an attending credentialed for everything, always on duty;
    the profiles the store holds (``MemoryStore.profiles``) when a test sets them."""

    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def profile(self, reader_id: int) -> ReaderProfile | None:
        found = self._s.profiles.get(reader_id)
        return found or ReaderProfile(id=reader_id, name=self._s.names.get(reader_id, ""), hospital="", specialty="")

    def scope(self, reader_id: int, at: datetime) -> ClaimScope | None:
        return ClaimScope(reader_id, None, None)

    def facts(self, exam: ExamRecord) -> ExamFacts:
        return ExamFacts(id=exam.id, hospital=exam.hospital, specialty=exam.specialty,
                         subspecialty=str(exam.row.get("subspecialty") or ""), site_code=str(exam.site_id),
                         modality=str(exam.row.get("modality") or "").upper())  # fmt: skip

    def decisions(self, exam: ExamRecord, at: datetime) -> list[Decision]:
        return []


@dataclass
class MemoryTx:
    exams: MemoryExamRepository
    reports: MemoryReportRepository
    results: MemoryResultRepository
    roster: MemoryRosterView

    @classmethod
    def on(cls, store: MemoryStore) -> MemoryTx:
        return cls(MemoryExamRepository(store), MemoryReportRepository(store), MemoryResultRepository(store),
                   MemoryRosterView(store))  # fmt: skip


class MemoryUnitOfWork:
    """One transaction over a :class:`MemoryStore`: what it changed is undone when it raises."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()

    @contextmanager
    def __call__(self) -> Iterator[MemoryTx]:
        s = self.store
        saved = copy.deepcopy((s.exams, s.reports, s.results, s.result_seq, s.events))
        try:
            yield MemoryTx.on(s)
        except BaseException:
            s.exams, s.reports, s.results, s.result_seq, s.events = saved
            raise

    @contextmanager
    def read(self) -> Iterator[MemoryTx]:
        yield MemoryTx.on(self.store)


__all__ = [
    "ExamRepository",
    "MemoryStore",
    "MemoryTx",
    "MemoryUnitOfWork",
    "ReportRecord",
    "ReportRepository",
    "ResultRecord",
    "ResultRepository",
    "SqlTx",
    "SqlUnitOfWork",
    "Tx",
    "UnitOfWork",
    "queue_order",
    "result_of",
    "result_query",
]
