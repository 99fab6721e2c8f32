"""gRPC servicers of ``teleread.v1.Worklist`` and ``teleread.v1.Results``: convert messages, call the
queue, report and results services, and run the watch streams off the event feed."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Iterator, Sequence

import grpc
from sqlalchemy import Engine, or_, select

from teleread.auth import require_reader
from teleread.db.engine import as_utc, reading, utcnow
from teleread.db.schema import events, exams, principals, sites
from teleread.errors import NotFound
from teleread.events import EventBus
from teleread.messages import exam_message, object_message, report_message, ts
from teleread.reader.queue import QueueService
from teleread.reader.reports import ReportService
from teleread.reader.results import ResultsService
from teleread.rpc import current_principal
from teleread.v1 import common_pb2, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

CHUNK = 1024 * 1024
WAKE_SECONDS = 1.0
EVENT_TYPES = {
    "queued": worklist_pb2.WorklistEvent.TYPE_QUEUED,
    "critical": worklist_pb2.WorklistEvent.TYPE_CRITICAL,
    "claimed": worklist_pb2.WorklistEvent.TYPE_CLAIMED,
    "released": worklist_pb2.WorklistEvent.TYPE_RELEASED,
    "reported": worklist_pb2.WorklistEvent.TYPE_REPORTED,
    "critical_result": worklist_pb2.WorklistEvent.TYPE_REPORTED,
}


def _names(engine: Engine, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    with reading(engine) as conn:
        return {
            r.id: r.name
            for r in conn.execute(select(principals.c.id, principals.c.name).where(principals.c.id.in_(ids)))
        }


class _Feed:
    """Which events a watcher has sent. Event ids are assigned at insert but transactions commit in
    any order (PostgreSQL), so an id below the highest one seen can still appear: the watcher
    re-reads a trailing window of recent events and skips those it already sent."""

    WINDOW = timedelta(seconds=60)

    def __init__(self, start: int) -> None:
        self._floor = start  # events up to the snapshot are not sent
        self._last = start
        self._sent: dict[int, datetime] = {}

    def condition(self) -> Any:
        return or_(events.c.id > self._last, events.c.at > utcnow() - self.WINDOW)

    def new(self, rows: Sequence[Any]) -> list[Any]:
        fresh = [r for r in rows if r.event_id > self._floor and r.event_id not in self._sent]
        for r in fresh:
            self._sent[r.event_id] = as_utc(r.event_at) or utcnow()
            self._last = max(self._last, r.event_id)
        horizon = utcnow() - 2 * self.WINDOW
        self._sent = {k: v for k, v in self._sent.items() if v > horizon}
        return fresh


class WorklistServicer(worklist_pb2_grpc.WorklistServicer):
    def __init__(self, *, engine: Engine, queue: QueueService, reports: ReportService, bus: EventBus) -> None:
        self._engine = engine
        self._queue = queue
        self._reports = reports
        self._bus = bus
        self._site_codes: dict[int, str] = {}

    def _site(self, site_id: int) -> str:
        if site_id not in self._site_codes:
            with reading(self._engine) as conn:
                self._site_codes[site_id] = conn.execute(select(sites.c.code).where(sites.c.id == site_id)).scalar_one()
        return self._site_codes[site_id]

    def _exam(self, row: dict[str, Any]) -> common_pb2.Exam:
        return exam_message(row, site_code=self._site(row["site_id"]))

    def _claim(self, row: dict[str, Any]) -> worklist_pb2.Claim:
        msg = worklist_pb2.Claim(exam=self._exam(row), fence=int(row["fence"]))
        stamp = ts(row["lease_expires_at"])
        if stamp is not None:
            msg.lease_expires_at.CopyFrom(stamp)
        return msg

    def ListWorklist(
        self, request: worklist_pb2.ListWorklistRequest, context: grpc.ServicerContext
    ) -> worklist_pb2.ListWorklistResponse:
        rows = self._queue.worklist(current_principal(), limit=request.limit, include_claimed=True)
        return worklist_pb2.ListWorklistResponse(exams=[self._exam(r) for r in rows])

    def Watch(
        self, request: worklist_pb2.WatchWorklistRequest, context: grpc.ServicerContext
    ) -> Iterator[worklist_pb2.WorklistEvent]:
        p = current_principal()
        hospital, specialty = require_reader(p)
        seen = self._bus.generation()
        with reading(self._engine) as conn:
            last = conn.execute(select(events.c.id).order_by(events.c.id.desc()).limit(1)).scalar() or 0
        for row in self._queue.worklist(p, include_claimed=True):
            yield worklist_pb2.WorklistEvent(type=worklist_pb2.WorklistEvent.TYPE_SNAPSHOT, exam=self._exam(row))
        yield worklist_pb2.WorklistEvent(type=worklist_pb2.WorklistEvent.TYPE_SNAPSHOT_END, event_id=last)
        feed = _Feed(last)
        while context.is_active() and not self._bus.closed:
            seen = self._bus.wait(seen, WAKE_SECONDS)
            with reading(self._engine) as conn:
                rows = conn.execute(
                    select(
                        events.c.id.label("event_id"),
                        events.c.type.label("event_type"),
                        events.c.at.label("event_at"),
                        exams,
                    )
                    .select_from(events.join(exams, events.c.exam_id == exams.c.id))
                    .where(
                        feed.condition(),
                        events.c.hospital == hospital,
                        events.c.specialty == specialty,
                        events.c.type.in_(EVENT_TYPES),
                    )
                    .order_by(events.c.id)
                    .limit(2000)
                ).all()
            rows = feed.new(rows)
            names = _names(self._engine, {r.claimed_by for r in rows if r.claimed_by})
            for r in rows:
                exam = dict(r._mapping)
                exam["claimed_by_name"] = names.get(r.claimed_by, "")
                yield worklist_pb2.WorklistEvent(
                    type=EVENT_TYPES[r.event_type], exam=self._exam(exam), event_id=r.event_id, at=ts(r.event_at)
                )

    def ClaimNext(self, request: worklist_pb2.ClaimNextRequest, context: grpc.ServicerContext) -> worklist_pb2.Claim:
        row = self._queue.claim_next(current_principal(), lease_seconds=request.lease_seconds)
        if row is None:
            raise NotFound("the queue is empty", reason="QUEUE_EMPTY")
        return self._claim(row)

    def ClaimExam(self, request: worklist_pb2.ClaimExamRequest, context: grpc.ServicerContext) -> worklist_pb2.Claim:
        return self._claim(
            self._queue.claim(
                current_principal(),
                exam_id=request.exam_id,
                lease_seconds=request.lease_seconds,
                for_amendment=request.for_amendment,
            )
        )

    def RenewClaim(self, request: worklist_pb2.RenewClaimRequest, context: grpc.ServicerContext) -> worklist_pb2.Claim:
        return self._claim(
            self._queue.renew(
                current_principal(), exam_id=request.exam_id, fence=request.fence, lease_seconds=request.lease_seconds
            )
        )

    def ReleaseClaim(
        self, request: worklist_pb2.ReleaseClaimRequest, context: grpc.ServicerContext
    ) -> worklist_pb2.ReleaseClaimResponse:
        self._queue.release(current_principal(), exam_id=request.exam_id, fence=request.fence)
        return worklist_pb2.ReleaseClaimResponse()

    def GetExamDetails(
        self, request: worklist_pb2.GetExamDetailsRequest, context: grpc.ServicerContext
    ) -> worklist_pb2.ExamDetails:
        exam, objs, reps, related = self._queue.details(current_principal(), exam_id=request.exam_id)
        names = _names(self._engine, {r["author_id"] for r in reps} | {r["signed_by"] for r in reps if r["signed_by"]})
        return worklist_pb2.ExamDetails(
            exam=self._exam(exam),
            objects=[object_message(o) for o in objs],
            reports=[
                report_message(r, author=names.get(r["author_id"], ""), signer=names.get(r["signed_by"], ""))
                for r in reps
            ],
            related=[self._exam(r) for r in related],
        )

    def StreamObject(
        self, request: worklist_pb2.StreamObjectRequest, context: grpc.ServicerContext
    ) -> Iterator[worklist_pb2.ObjectChunk]:
        with self._queue.open_object(current_principal(), exam_id=request.exam_id, object_id=request.object_id) as (
            row,
            fh,
        ):
            offset = 0
            first = True
            while block := fh.read(CHUNK):
                chunk = worklist_pb2.ObjectChunk(data=block, offset=offset)
                if first:
                    chunk.sha256, chunk.size, first = row["sha256"], int(row["size"]), False
                yield chunk
                offset += len(block)

    def _report(self, row: dict[str, Any]) -> common_pb2.Report:
        names = _names(self._engine, {row["author_id"]} | ({row["signed_by"]} if row["signed_by"] else set()))
        return report_message(row, author=names.get(row["author_id"], ""), signer=names.get(row["signed_by"], ""))

    def SaveReport(self, request: worklist_pb2.SaveReportRequest, context: grpc.ServicerContext) -> common_pb2.Report:
        return self._report(
            self._reports.save(
                current_principal(),
                exam_id=request.exam_id,
                fence=request.fence,
                text=request.text,
                impression=request.impression,
                critical=request.critical,
            )
        )

    def SignReport(self, request: worklist_pb2.SignReportRequest, context: grpc.ServicerContext) -> common_pb2.Report:
        return self._report(self._reports.sign(current_principal(), exam_id=request.exam_id, fence=request.fence))

    def AmendReport(self, request: worklist_pb2.AmendReportRequest, context: grpc.ServicerContext) -> common_pb2.Report:
        return self._report(
            self._reports.amend(
                current_principal(),
                exam_id=request.exam_id,
                reason=request.reason,
                text=request.text,
                impression=request.impression,
                critical=request.critical,
                fence=request.fence,
            )
        )


def result_message(row: dict[str, Any], *, site_code: str) -> results_pb2.Result:
    exam = dict(row)
    report = {
        "exam_id": row["id"],
        "version": row["version"],
        "status": row["report_status"],
        "text": row["text"],
        "impression": row["impression"],
        "critical": row["report_critical"],
        "signed_at": row["signed_at"],
        "amends_reason": row["amends_reason"],
        "sha256": row["report_sha256"],
    }
    msg = results_pb2.Result(
        cursor=int(row["seq"]),
        exam=exam_message(exam, site_code=site_code),
        report=report_message(report, signer=row.get("signed_by_name") or ""),
        critical=bool(row["result_critical"]),
    )
    stamp = ts(as_utc(row["published_at"]))
    if stamp is not None:
        msg.published_at.CopyFrom(stamp)
    return msg


class ResultsServicer(results_pb2_grpc.ResultsServicer):
    def __init__(self, service: ResultsService) -> None:
        self._svc = service

    def ListResults(
        self, request: results_pb2.ListResultsRequest, context: grpc.ServicerContext
    ) -> results_pb2.ListResultsResponse:
        p = current_principal()
        rows = self._svc.list_after(p, after=request.after_cursor, limit=request.limit)
        next_cursor = int(rows[-1]["seq"]) if rows else request.after_cursor
        return results_pb2.ListResultsResponse(
            results=[result_message(r, site_code=p.site_code or "") for r in rows], next_cursor=next_cursor
        )

    def WatchResults(
        self, request: results_pb2.WatchResultsRequest, context: grpc.ServicerContext
    ) -> Iterator[results_pb2.Result]:
        p = current_principal()
        cursor = request.after_cursor
        bus = self._svc.bus
        seen = bus.generation()
        while context.is_active() and not bus.closed:
            rows = self._svc.list_after(p, after=cursor, limit=200)
            for r in rows:
                cursor = int(r["seq"])
                yield result_message(r, site_code=p.site_code or "")
            if not rows:
                seen = bus.wait(seen, WAKE_SECONDS)

    def GetResult(self, request: results_pb2.GetResultRequest, context: grpc.ServicerContext) -> results_pb2.Result:
        p = current_principal()
        return result_message(self._svc.get(p, exam_id=request.exam_id), site_code=p.site_code or "")
