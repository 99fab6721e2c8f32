"""The reading queue: worklists, claims as leases with a fencing token, exam details, object bytes.

An exam is claimable when it is queued, or in reading with a lapsed lease. A reported exam can be
claimed for amendment (explicitly, by id): it stays ``reported``, so it never re-enters the queue or
claim-next, and a lapsed amendment claim simply expires. Each claim increments the exam's fence;
every later act on the claim (renew, release, save, sign, amend) presents the fence and is refused
when it is stale or the lease has lapsed. On PostgreSQL claim-next locks the chosen row with
``FOR NO KEY UPDATE SKIP LOCKED`` so concurrent readers never wait on each other; on SQLite the write
transaction is serialised by ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any, BinaryIO, Iterator, NamedTuple

from sqlalchemy import Connection, Engine, and_, or_, select, update

from teleread.auth import Principal, require_reader
from teleread.errors import PermissionDenied
from teleread.db.engine import as_utc, locked_for_change, reading
from teleread.db.schema import exams, objects, principals
from teleread.errors import Conflict, InvalidInput, LeaseLost, NotFound
from teleread import lifecycle
from teleread.events import EventBus, record_event
from teleread.clock import Clock, SystemClock
from teleread.reader.hub.claims import CLAIMED, ExamRecord, check_claim, claimable, live_claim, readable
from teleread.reader.hub.repository import (
    ExamRepository,
    ReportRecord,
    SqlReportRepository,
    SqlUnitOfWork,
    UnitOfWork,
    queue_order,
)
from teleread.reader.hub.roster import Decision, ReaderProfile, Roster, credential_gaps
from teleread.reader.hub.routing import Routing
from teleread.reader.hub import sla
from teleread.triage_result import EcgSummary, TriageResult
from teleread.vocab import ExamKind, ExamState, Grade, Level

log = logging.getLogger("teleread.queue")

READABLE_STATES = lifecycle.READABLE
PRIORS_LIMIT = 20  # a patient's earlier exams shown with an exam


class ExamDetails(NamedTuple):
    """What a reader opening an exam sees (rows to show)."""

    exam: dict[str, Any]
    objects: list[dict[str, Any]]
    reports: list[ReportRecord]
    related: list[dict[str, Any]]  # the other exams of the same study (follow-ups)
    priors: list[dict[str, Any]]  # the same patient's earlier exams (see QueueService.details)


class Explanation(NamedTuple):
    """Why an exam went where it went (``teleread read why``)."""

    exam: dict[str, Any]
    rules: list[str]  # the routing rules that matched, in the order they were applied
    decisions: list[Decision]  # each reader of the exam's hospital and specialty
    open_claims: dict[int, int]  # reader id -> exams they hold now
    offered_to: str  # the reader the exam was first offered to ('' none)


class QueueService:
    def __init__(
        self,
        *,
        engine: Engine | None,
        store: Any,
        bus: EventBus,
        lease_seconds: int,
        max_lease_seconds: int,
        clock: Clock | None = None,
        uow: UnitOfWork | None = None,
        routing: Routing | None = None,
        roster: Roster | None = None,
        offer_seconds: int = 120,
    ) -> None:
        self._engine = engine  # None only with an in-memory unit of work (claims alone)
        self._routing = routing
        self._store = store
        self._bus = bus
        self._lease = lease_seconds
        self._max_lease = max_lease_seconds
        self._clock = clock or SystemClock()
        self._roster = roster or Roster.default()
        self._offer = timedelta(seconds=max(0, offer_seconds))
        if uow is None:
            assert engine is not None
            uow = SqlUnitOfWork(engine, roster=self._roster)
        self._uow = uow

    @property
    def _db(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this queue service has no database (an in-memory unit of work serves claims only)")
        return self._engine

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def escalation(self) -> tuple[tuple[int, str], ...]:
        """A critical result's escalation steps while the site has not acknowledged it."""
        return self._routing.critical_unacknowledged if self._routing is not None else ()

    @property
    def roster(self) -> Roster:
        return self._roster

    @property
    def uow(self) -> UnitOfWork:
        return self._uow

    def _lease_for(self, requested: int) -> timedelta:
        if requested < 0:
            raise InvalidInput("lease seconds cannot be negative", reason="BAD_LEASE")
        return timedelta(seconds=min(requested or self._lease, self._max_lease))

    @staticmethod
    def _mine(hospital: str, specialty: str) -> Any:
        return and_(exams.c.hospital == hospital, exams.c.specialty == specialty)

    # ---- triaged exams join the queue ----------------------------------------------------------
    def enqueue_triaged(self, exam: Any, result: TriageResult) -> dict[str, Any]:
        """Record the triage of a received exam and queue it with its deadline (the SLA clock from
        its arrival): ``received`` -> ``triaged`` -> ``queued`` in one transaction, with a
        ``critical`` event for a critical exam and the deadline's timers (``reader/hub/sla.py``).
        An exam already triaged (another worker, a retry) is left as it is."""
        assert self._routing is not None, "a queue that takes triaged exams needs the routing"
        level = result.level
        arrived = as_utc(exam.received_at) or self._clock.now()
        deadline, rule = self._routing.deadline_for(
            level=level, arrived=arrived, calendar=self._roster.calendar, modality=exam.modality or "",
            subspecialty=getattr(exam, "subspecialty", "") or "", patient_class=exam.patient_class or "",
        )  # fmt: skip
        with self._db.begin() as conn:
            triaged = lifecycle.move_exam(
                conn,
                exam.id,
                ExamState.TRIAGED,
                event="triaged",
                expect=ExamState.RECEIVED,
                values={
                    "level": level,
                    "level_rank": level.queue_rank,
                    "score": float(result.score),
                    "triage_json": result.to_json(),
                },
                detail={"rules": result.rules_version},
            )
            if triaged is not None:
                now = self._clock.now()
                queued = lifecycle.move_exam(
                    conn,
                    exam.id,
                    ExamState.QUEUED,
                    event="queued",
                    values={"deadline": deadline},
                    detail={"level": level, "sla": rule.describe()},
                    also=[("critical", {"level": level})] if level == Level.CRITICAL else [],
                )
                assert queued is not None
                sla.schedule_reading(conn, exam_id=exam.id, arrived=arrived, deadline=deadline)
                if level == Level.CRITICAL:
                    readers = self._roster.audience(conn, queued, "readers", now)
                    sla.critical_arrived(conn, exam=queued, arrived=arrived, at=now,
                                         steps=self._routing.critical_unclaimed, readers=readers)  # fmt: skip
                else:
                    self._offer_first(conn, queued, now)
        self._bus.publish()
        log.info("exam queued", extra={"exam_id": exam.id, "level": level})
        return {"level": level, "deadline": deadline}

    def _offer_first(self, conn: Connection, exam: dict[str, Any], now: Any) -> None:
        """Offer a new exam first to the reader on duty who may read it with the fewest open claims:
        for ``offer_seconds`` claim-next gives it to nobody else (an ``offered`` event says to whom).
        A critical exam is not offered to one reader: every reader it is offered to is alerted."""
        reader, _ = self._roster.first_offer(conn, exam, now)
        if reader is None or not self._offer:
            return
        until = now + self._offer
        conn.execute(update(exams).where(exams.c.id == exam["id"]).values(offered_to=reader.id, offer_until=until))
        record_event(conn, type="offered", exam_id=str(exam["id"]), site_id=int(exam["site_id"]),
                     hospital=exam["hospital"], specialty=exam["specialty"],
                     detail={"to": reader.name, "reader_id": reader.id, "until": until.isoformat()})  # fmt: skip

    def record_ecg_measurements(self, exam_id: str, summary: dict[str, Any]) -> bool:
        """Keep an ECG's full measurements (triage's second pass: PR, QT, QTc, axes) in its triage
        result. Not a change of state; an exam not yet triaged, or rejected, is left as it is."""
        with self._db.begin() as conn:
            row = conn.execute(
                locked_for_change(select(exams.c.triage_json, exams.c.state).where(exams.c.id == exam_id))
            ).first()
            if row is None or not row.triage_json or row.state in (ExamState.RECEIVED, ExamState.REJECTED):
                return False
            result = dataclasses.replace(TriageResult.from_json(row.triage_json), ecg=EcgSummary.from_dict(summary))
            conn.execute(update(exams).where(exams.c.id == exam_id).values(triage_json=result.to_json()))
        return True

    # ---- worklist ----------------------------------------------------------------------------
    def worklist(self, p: Principal, *, limit: int = 200, include_claimed: bool = True) -> list[dict[str, Any]]:
        """The reader's queue in queue order, at most ``limit`` exams."""
        hospital, specialty = require_reader(p)
        states = (ExamState.QUEUED, ExamState.IN_READING) if include_claimed else (ExamState.QUEUED,)
        query = (
            select(exams, principals.c.name.label("claimed_by_name"))
            .select_from(exams.outerjoin(principals, exams.c.claimed_by == principals.c.id))
            .where(self._mine(hospital, specialty), exams.c.state.in_(states))
            .order_by(*queue_order())
            .limit(max(1, limit))
        )
        with reading(self._db) as conn:
            me = self._roster.profile(conn, p.id)
            if me is not None and me.grade != Grade.DEPARTMENT_HEAD:  # a head sees the department's queue
                query = query.where(*self._credentialed(conn, me))
            return [dict(r._mapping) for r in conn.execute(query)]

    @staticmethod
    def _credentialed(conn: Connection, me: ReaderProfile) -> list[Any]:
        """The exams a reader is credentialed for (their sites and modalities)."""
        from teleread.db.schema import sites

        clauses: list[Any] = []
        if me.sites:
            clauses.append(exams.c.site_id.in_(select(sites.c.id).where(sites.c.code.in_(sorted(me.sites)))))
        if me.modalities:
            clauses.append(exams.c.modality.in_(sorted(me.modalities)))
        return clauses

    def explain(self, p: Principal, *, exam_id: str) -> Explanation:
        """Which routing rules matched the exam, who may read it and is on duty, who not and why."""
        hospital, specialty = require_reader(p)
        assert self._routing is not None, "explaining routing needs the routing"
        with reading(self._db) as conn:
            exam = self._reader_exam(conn, hospital=hospital, specialty=specialty, exam_id=exam_id)
            now = self._clock.now()
            decisions = self._roster.decisions(conn, exam, now)
            load = self._roster.open_claims(conn, hospital=hospital, specialty=specialty, at=now)
            offered = conn.execute(select(principals.c.name).where(principals.c.id == exam["offered_to"])).scalar()
        routing, modality = self._routing, exam["modality"] or ""
        rules = [
            f"routing {routing.version}; calendar {self._roster.calendar.version}",
            f"modality {modality or '(none)'} -> specialty {exam['specialty']}",
            f"site -> lead hospital {exam['hospital']}",
            f"subspecialty: {exam['subspecialty'] or '(none)'}",
        ]
        if exam["level"]:
            rule = routing.sla_rule(level=exam["level"], modality=modality, subspecialty=exam["subspecialty"] or "",
                                    patient_class=exam["patient_class"] or "")  # fmt: skip
            rules.append(f"deadline rule {rule.describe()} -> {as_utc(exam['deadline']):%Y-%m-%d %H:%M} UTC")
        return Explanation(exam, rules, decisions, load, str(offered or ""))

    # ---- claims ------------------------------------------------------------------------------
    @staticmethod
    def _claimed(record: ExamRecord, p: Principal) -> dict[str, Any]:
        exam = dict(record.row)
        exam["claimed_by_name"] = p.name
        return exam

    def claim_next(self, p: Principal, *, lease_seconds: int = 0) -> dict[str, Any] | None:
        hospital, specialty = require_reader(p)
        lease = self._lease_for(lease_seconds)
        with self._uow() as tx:
            now = self._clock.now()
            scope = tx.roster.scope(p.id, now)
            if scope is None:
                log.info("claim-next: reader not on duty")
                return None
            pick = tx.exams.next_claimable(hospital=hospital, specialty=specialty, now=now, scope=scope)
            if pick is None:
                return None
            taken = tx.exams.take(pick.id, ExamState.IN_READING, reader_id=p.id, until=now + lease, now=now)
        log.info("claimed", extra={"exam_id": taken.id})
        self._bus.publish()
        return self._claimed(taken, p)

    def claim(
        self, p: Principal, *, exam_id: str, lease_seconds: int = 0, for_amendment: bool = False
    ) -> dict[str, Any]:
        """Claim one exam; with ``for_amendment`` a reported exam, which stays reported. A reader who
        already holds a live claim of that kind on the exam gets that same claim back (same fence,
        lease extended): the command line and the station of one reader share one claim."""
        hospital, specialty = require_reader(p)
        lease = self._lease_for(lease_seconds)
        with self._uow() as tx:
            now = self._clock.now()
            exam = readable(tx.exams.get(exam_id, lock=True), hospital=hospital, specialty=specialty)
            self.check_credentials(tx, p, exam)
            own = ExamState.REPORTED if for_amendment else ExamState.IN_READING
            if exam.claimed_by == p.id and exam.state == own and live_claim(exam, now):
                return self._claimed(tx.exams.extend(exam_id, until=now + lease, now=now), p)
            if for_amendment:
                if exam.state != ExamState.REPORTED:
                    raise Conflict("only a reported exam can be claimed for amendment", reason="NOT_REPORTED")
                if live_claim(exam, now):
                    raise Conflict("the exam is already claimed for amendment", reason="AMENDMENT_CLAIMED")
                target = ExamState.REPORTED
            else:
                if not claimable(exam, now):
                    raise LeaseLost("exam is claimed by another reader or not in the queue", reason="NOT_CLAIMABLE")
                target = ExamState.IN_READING
            taken = tx.exams.take(exam_id, target, reader_id=p.id, until=now + lease, now=now)
        log.info("claimed", extra={"exam_id": exam_id})
        self._bus.publish()
        return self._claimed(taken, p)

    @staticmethod
    def check_credentials(tx: Any, p: Principal, exam: ExamRecord) -> ReaderProfile:
        """The reader's roster entry; PermissionDenied ``NOT_CREDENTIALED`` when they may not read the
        exam (its site or modality is not among theirs)."""
        me = tx.roster.profile(p.id)
        gaps = credential_gaps(me, tx.roster.facts(exam)) if me is not None and me.hospital else []
        if me is None or gaps:
            raise PermissionDenied("not credentialed for this exam: " + "; ".join(gaps), reason="NOT_CREDENTIALED")
        return me

    def held(
        self, exams: ExamRepository, p: Principal, *, exam_id: str, fence: int, states: tuple[str, ...] = CLAIMED
    ) -> ExamRecord:
        """The exam, locked, if ``p`` holds a live claim with ``fence`` on it in one of ``states`` (a
        claim for reading: ``READING``; for amendment: ``AMENDING``); LeaseLost otherwise."""
        exam = self.reader_exam(exams, p, exam_id=exam_id)
        check_claim(exam, reader_id=p.id, fence=fence, states=states, now=self._clock.now())
        return exam

    @staticmethod
    def reader_exam(exams: ExamRepository, p: Principal, *, exam_id: str) -> ExamRecord:
        """The exam of ``p``'s hospital and specialty, locked for the transaction."""
        hospital, specialty = require_reader(p)
        return readable(exams.get(exam_id, lock=True), hospital=hospital, specialty=specialty)

    def renew(self, p: Principal, *, exam_id: str, fence: int, lease_seconds: int = 0) -> dict[str, Any]:
        lease = self._lease_for(lease_seconds)
        with self._uow() as tx:
            self.held(tx.exams, p, exam_id=exam_id, fence=fence)
            now = self._clock.now()
            renewed = tx.exams.extend(exam_id, until=now + lease, now=now)
        return self._claimed(renewed, p)

    def release(self, p: Principal, *, exam_id: str, fence: int) -> None:
        """Give a claimed exam back to the queue; a claim for amendment is dropped, the exam stays reported."""
        with self._uow() as tx:
            exam = self.held(tx.exams, p, exam_id=exam_id, fence=fence)
            reading_claim = exam.state == ExamState.IN_READING
            tx.exams.drop(
                exam_id,
                ExamState.QUEUED if reading_claim else ExamState.REPORTED,
                event="released" if reading_claim else "amendment_released",
                actor_id=p.id,
                now=self._clock.now(),
            )
        self._bus.publish()

    # ---- details and bytes -------------------------------------------------------------------
    @staticmethod
    def _reader_exam(conn: Connection, *, hospital: str, specialty: str, exam_id: str) -> dict[str, Any]:
        row = conn.execute(select(exams).where(exams.c.id == exam_id)).first()
        record = None if row is None else ExamRecord.of(dict(row._mapping))
        return dict(readable(record, hospital=hospital, specialty=specialty).row)

    def details(self, p: Principal, *, exam_id: str) -> ExamDetails:
        """The exam, its objects, its report versions, the other exams of the same study from the same
        site that this reader may read (the exam it follows, and its follow-ups), and the patient's
        priors: the same site's earlier exams of the same patient ID that this reader may read."""
        hospital, specialty = require_reader(p)
        with reading(self._db) as conn:
            exam = self._reader_exam(conn, hospital=hospital, specialty=specialty, exam_id=exam_id)
            related = self._related(conn, exam, hospital=hospital, specialty=specialty)
            priors = self._priors(
                conn, exam, hospital=hospital, specialty=specialty, besides={str(r["id"]) for r in related}
            )
            objs = [
                dict(r._mapping)
                for r in conn.execute(
                    select(objects)
                    .where(objects.c.exam_id == exam_id)
                    .order_by(objects.c.series_instance_uid, objects.c.created_at)
                )
            ]
            reps = SqlReportRepository(conn).versions(exam_id)
            if exam["claimed_by"]:
                exam["claimed_by_name"] = conn.execute(
                    select(principals.c.name).where(principals.c.id == exam["claimed_by"])
                ).scalar()
        with self._db.begin() as conn:  # the access is part of the audit trail
            record_event(conn, type="viewed", exam_id=exam_id, site_id=exam["site_id"], actor_id=p.id)
        return ExamDetails(exam, objs, reps, related, priors)

    @staticmethod
    def _priors(
        conn: Connection, exam: dict[str, Any], *, hospital: str, specialty: str, besides: set[str]
    ) -> list[dict[str, Any]]:
        """The patient's earlier exams: the same site and (non-empty) patient ID, received before this
        one, most recent first, at most ``PRIORS_LIMIT``, only those this reader may open (the same
        hospital and specialty, in a readable state), and not those of ``besides`` (shown as related).
        A patient ID is the site's own, so another site's exams are never matched by it."""
        if not exam["patient_id"] or exam["received_at"] is None:
            return []
        query = (
            select(exams)
            .where(
                exams.c.site_id == exam["site_id"],
                exams.c.patient_id == exam["patient_id"],
                exams.c.id != exam["id"],
                exams.c.received_at < exam["received_at"],
                exams.c.hospital == hospital,
                exams.c.specialty == specialty,
                exams.c.state.in_(READABLE_STATES),
            )
            .order_by(exams.c.received_at.desc(), exams.c.id.desc())
            .limit(PRIORS_LIMIT)
        )
        if besides:
            query = query.where(exams.c.id.not_in(sorted(besides)))
        return [dict(r._mapping) for r in conn.execute(query)]

    @staticmethod
    def _related(conn: Connection, exam: dict[str, Any], *, hospital: str, specialty: str) -> list[dict[str, Any]]:
        links = [exams.c.follow_up_of == exam["id"]]
        if exam["follow_up_of"]:
            links.append(exams.c.id == exam["follow_up_of"])
        if exam["study_instance_uid"]:
            links.append(exams.c.study_instance_uid == exam["study_instance_uid"])
        query = (
            select(exams)
            .where(
                or_(*links),
                exams.c.id != exam["id"],
                exams.c.site_id == exam["site_id"],
                exams.c.hospital == hospital,
                exams.c.specialty == specialty,
                exams.c.state.in_(READABLE_STATES),
            )
            .order_by(exams.c.received_at, exams.c.id)
        )
        return [dict(r._mapping) for r in conn.execute(query)]

    def ecg_objects(self, p: Principal, *, exam_id: str) -> list[dict[str, Any]]:
        """The stored objects of an ECG exam this reader may read (the same check as :meth:`details`),
        oldest first; Conflict ``NOT_AN_ECG`` for an exam of another kind."""
        hospital, specialty = require_reader(p)
        with reading(self._db) as conn:
            exam = self._reader_exam(conn, hospital=hospital, specialty=specialty, exam_id=exam_id)
            if exam["kind"] != ExamKind.ECG:
                raise Conflict("this exam is not an ECG", reason="NOT_AN_ECG")
            query = select(objects).where(objects.c.exam_id == exam_id).order_by(objects.c.created_at, objects.c.id)
            return [dict(r._mapping) for r in conn.execute(query)]

    def stored_objects(self, exam_id: str) -> list[dict[str, Any]]:
        """An exam's stored object rows, oldest first, for the hub's own work (the printed report's
        tracing): no reader's check, the caller is the hub."""
        with reading(self._db) as conn:
            query = select(objects).where(objects.c.exam_id == exam_id).order_by(objects.c.created_at, objects.c.id)
            return [dict(r._mapping) for r in conn.execute(query)]

    def open_stored(self, row: dict[str, Any]) -> AbstractContextManager[BinaryIO]:
        """An object row's bytes, hash-verified (for rows :meth:`ecg_objects` handed out)."""
        return self._store.open_verified(row["storage_key"], sha256=row["sha256"], size=int(row["size"]))

    @contextmanager
    def open_object(self, p: Principal, *, exam_id: str, object_id: str) -> Iterator[tuple[dict[str, Any], BinaryIO]]:
        hospital, specialty = require_reader(p)
        with reading(self._db) as conn:
            self._reader_exam(conn, hospital=hospital, specialty=specialty, exam_id=exam_id)
            row = conn.execute(select(objects).where(objects.c.id == object_id, objects.c.exam_id == exam_id)).first()
        if row is None:
            raise NotFound("no such object in this exam", reason="OBJECT_NOT_FOUND")
        with self._store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as fh:
            yield dict(row._mapping), fh
