"""gRPC servicers of ``teleread.v1.Worklist`` and ``teleread.v1.Results``: convert messages and call
the queue, report and results services; the watch streams iterate the hub's one event feed
(``reader/hub/feed.py``). Unary handlers are synchronous (the server's thread pool); the streams are
coroutines on the server's event loop, so an open watch holds no thread."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from contextlib import AbstractContextManager
from typing import Any, AsyncIterator, BinaryIO

import grpc
import numpy as np

from teleread.errors import NotFound
from teleread.messages import exam_message, measurement_values, object_message, report_message, triage_message, ts
from teleread.reader.hub.directory import Directory
from teleread.reader.hub.feed import (
    ResultsLive,
    SnapshotEnd,
    SnapshotExam,
    WatchFeed,
    WorklistChange,
    WorklistChanges,
    WorklistItem,
)
from teleread.reader.hub.queue import QueueService
from teleread.reader.hub.report_pdfs import ReportPdfService, StoredPdf
from teleread.reader.hub.reports import EcgContent, ReportService
from teleread.reader.hub.repository import ReportRecord, ResultRecord
from teleread.reader.hub.results import ResultsService
from teleread.reader.hub.waveform import EcgWaveforms
from teleread.rpc import current_principal, in_thread
from teleread.v1 import common_pb2, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

CHUNK = 1024 * 1024
PDF_CHUNK = 256 * 1024
EVENT_TYPES = {
    "queued": worklist_pb2.WorklistEvent.TYPE_QUEUED,
    "critical": worklist_pb2.WorklistEvent.TYPE_CRITICAL,
    "claimed": worklist_pb2.WorklistEvent.TYPE_CLAIMED,
    "released": worklist_pb2.WorklistEvent.TYPE_RELEASED,
    "reported": worklist_pb2.WorklistEvent.TYPE_REPORTED,
    "critical_result": worklist_pb2.WorklistEvent.TYPE_REPORTED,
}
LIST_DEFAULT, LIST_MAX = 200, 1000  # ListWorklist's page (the Watch snapshot carries the whole queue)
SNAPSHOT_BATCH = 500  # exams per TYPE_SNAPSHOT_BATCH event (about 1 MB at most, under the 4 MB message limit)
MEMO = 4096  # event messages kept: every watcher of one worklist gets the same message


class _Memo(OrderedDict[Any, Any]):
    """The last messages built, by key (one event goes to every watcher of its worklist)."""

    def get_or(self, key: Any, build: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = build()
        if len(self) > MEMO:
            self.popitem(last=False)
        return value


async def pdf_chunks(
    opened: AbstractContextManager[tuple[StoredPdf, BinaryIO]],
) -> AsyncIterator[common_pb2.ReportPdfChunk]:
    """A printed report's bytes in chunks; the first names the whole PDF's SHA-256, size and version.
    Opening it (rendering it first when needed) runs in the stream pool."""
    async with in_thread(opened) as (stored, fh):
        offset = 0
        while block := await asyncio.to_thread(fh.read, PDF_CHUNK):
            chunk = common_pb2.ReportPdfChunk(data=block, offset=offset)
            if offset == 0:
                chunk.sha256, chunk.size, chunk.version = stored.sha256, stored.size, stored.version
            yield chunk
            offset += len(block)


class WorklistServicer(worklist_pb2_grpc.WorklistServicer):
    def __init__(
        self,
        *,
        queue: QueueService,
        reports: ReportService,
        directory: Directory,
        feed: WatchFeed,
        pdfs: ReportPdfService,
    ) -> None:
        self._queue = queue
        self._reports = reports
        self._pdfs = pdfs
        self._directory = directory
        self._feed = feed
        self._waveforms = EcgWaveforms(queue)
        self._events = _Memo()  # used on the event loop only

    def _exam(self, row: dict[str, Any]) -> common_pb2.Exam:
        """An exam as its reader sees it: with the patient context (never in a site's view)."""
        return exam_message(row, site_code=self._directory.site_code(row["site_id"]), patient=True)

    def _claim(self, row: dict[str, Any]) -> worklist_pb2.Claim:
        msg = worklist_pb2.Claim(exam=self._exam(row), fence=int(row["fence"]))
        stamp = ts(row["lease_expires_at"])
        if stamp is not None:
            msg.lease_expires_at.CopyFrom(stamp)
        return msg

    def ListWorklist(
        self, request: worklist_pb2.ListWorklistRequest, context: grpc.ServicerContext
    ) -> worklist_pb2.ListWorklistResponse:
        limit = max(1, min(request.limit or LIST_DEFAULT, LIST_MAX))
        rows = self._queue.worklist(current_principal(), limit=limit, include_claimed=True)
        return worklist_pb2.ListWorklistResponse(exams=[self._exam(r) for r in rows])

    async def Watch(
        self, request: worklist_pb2.WatchWorklistRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worklist_pb2.WorklistEvent]:
        batch: list[common_pb2.Exam] = []
        async for item in self._feed.worklist(current_principal(), batched=request.change_batches):
            if request.snapshot_batches and isinstance(item, SnapshotExam):
                batch.append(exam_message(item.exam, site_code=item.site_code, patient=True))
                if len(batch) < SNAPSHOT_BATCH:
                    continue
            if batch:
                yield worklist_pb2.WorklistEvent(type=worklist_pb2.WorklistEvent.TYPE_SNAPSHOT_BATCH, exams=batch)
                batch = []
                if isinstance(item, SnapshotExam):
                    continue
            yield self._watch_message(item)

    def _watch_message(self, item: WorklistItem) -> worklist_pb2.WorklistEvent:
        if isinstance(item, SnapshotExam):
            exam = exam_message(item.exam, site_code=item.site_code, patient=True)
            return worklist_pb2.WorklistEvent(type=worklist_pb2.WorklistEvent.TYPE_SNAPSHOT, exam=exam)
        if isinstance(item, SnapshotEnd):
            return worklist_pb2.WorklistEvent(type=worklist_pb2.WorklistEvent.TYPE_SNAPSHOT_END, event_id=item.event_id)
        if isinstance(item, WorklistChanges):  # every watcher of the worklist gets the same read
            ids = tuple(c.event_id for c in item.changes)
            return self._events.get_or(ids, lambda: self._changes_message(item))
        return self._events.get_or(item.event_id, lambda: self._change_message(item))

    def _changes_message(self, item: WorklistChanges) -> worklist_pb2.WorklistEvent:
        changes = [self._events.get_or(c.event_id, lambda c=c: self._change_message(c)) for c in item.changes]
        last = item.changes[-1]
        return worklist_pb2.WorklistEvent(
            type=worklist_pb2.WorklistEvent.TYPE_CHANGES, changes=changes, event_id=last.event_id, at=ts(last.at)
        )

    @staticmethod
    def _change_message(item: WorklistChange) -> worklist_pb2.WorklistEvent:
        return worklist_pb2.WorklistEvent(
            type=EVENT_TYPES[item.type],
            exam=exam_message(item.exam, site_code=item.site_code, patient=True),  # to the worklist's readers only
            event_id=item.event_id,
            at=ts(item.at),
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
        found = self._queue.details(current_principal(), exam_id=request.exam_id)
        reps = found.reports
        names = self._directory.principal_names([r.author_id for r in reps] + [r.signed_by for r in reps])
        return worklist_pb2.ExamDetails(
            exam=self._exam(found.exam),
            objects=[object_message(o) for o in found.objects],
            reports=[
                report_message(r.fields(), author=names.get(r.author_id, ""), signer=names.get(r.signed_by or 0, ""))
                for r in reps
            ],
            related=[self._exam(r) for r in found.related],
            priors=[self._exam(r) for r in found.priors],
            suggested_statements=[
                common_pb2.ReportStatement(**s.to_dict()) for s in self._reports.library.suggest(_findings(found.exam))
            ],
        )

    async def StreamObject(
        self, request: worklist_pb2.StreamObjectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worklist_pb2.ObjectChunk]:
        opened = self._queue.open_object(current_principal(), exam_id=request.exam_id, object_id=request.object_id)
        async with in_thread(opened) as (row, fh):
            offset = 0
            first = True
            while block := await asyncio.to_thread(fh.read, CHUNK):
                chunk = worklist_pb2.ObjectChunk(data=block, offset=offset)
                if first:
                    chunk.sha256, chunk.size, first = row["sha256"], int(row["size"]), False
                yield chunk
                offset += len(block)

    def GetEcgWaveform(
        self, request: worklist_pb2.GetEcgWaveformRequest, context: grpc.ServicerContext
    ) -> worklist_pb2.EcgWaveform:
        found = self._waveforms.waveform(current_principal(), exam_id=request.exam_id)
        signal = found.signal
        microvolts = np.rint(signal.signal_mv.astype(np.float64) * 1000.0).astype(np.int32)
        leads = [
            worklist_pb2.EcgLead(name=name, microvolts=microvolts[:, i].tolist())
            for i, name in enumerate(signal.lead_names)
        ]
        return worklist_pb2.EcgWaveform(fs=signal.fs, leads=leads, duration_s=signal.duration_s, source=found.source)

    def _report(self, report: ReportRecord) -> common_pb2.Report:
        names = self._directory.principal_names((report.author_id, report.signed_by))
        return report_message(
            report.fields(), author=names.get(report.author_id, ""), signer=names.get(report.signed_by or 0, "")
        )

    def SaveReport(self, request: worklist_pb2.SaveReportRequest, context: grpc.ServicerContext) -> common_pb2.Report:
        return self._report(
            self._reports.save(
                current_principal(),
                exam_id=request.exam_id,
                fence=request.fence,
                text=request.text,
                impression=request.impression,
                critical=request.critical,
                ecg=_ecg_content(request),
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
                ecg=_ecg_content(request),
            )
        )

    def ListStatements(
        self, request: worklist_pb2.ListStatementsRequest, context: grpc.ServicerContext
    ) -> worklist_pb2.StatementLibrary:
        current_principal()  # signed-in callers only (the interceptor already checked)
        lib = self._reports.library
        return worklist_pb2.StatementLibrary(
            version=lib.version,
            groups=[worklist_pb2.StatementGroup(code=g.code, title=g.title, title_zh=g.title_zh) for g in lib.groups],
            statements=[
                worklist_pb2.LibraryStatement(
                    code=s.code, group=s.group, text=s.text, text_zh=s.text_zh, suggested_by=s.suggested_by
                )
                for s in lib.statements
            ],
        )

    async def GetReportPdf(
        self, request: common_pb2.GetReportPdfRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.ReportPdfChunk]:
        opened = self._pdfs.open_for_reader(current_principal(), exam_id=request.exam_id, version=request.version)
        async for chunk in pdf_chunks(opened):
            yield chunk


def _findings(exam: Any) -> list[dict[str, Any]]:
    """An exam's triage findings as plain values (code and evidence leads), for the suggestions."""
    triage = triage_message(exam.get("triage_json") or "")
    if triage is None:
        return []
    return [{"code": f.code, "evidence": [{"lead": e.lead} for e in f.evidence]} for f in triage.findings]


def _ecg_content(request: worklist_pb2.SaveReportRequest | worklist_pb2.AmendReportRequest) -> EcgContent:
    return EcgContent(
        statements=[
            {"code": s.code, "source": s.source or "reader", "confirmed": s.confirmed} for s in request.statements
        ],
        measurements=measurement_values(request.measurements if request.HasField("measurements") else None),
        measurements_edited=list(request.measurements_edited),
    )


def result_message(result: ResultRecord, *, site_code: str) -> results_pb2.Result:
    msg = results_pb2.Result(
        cursor=result.seq,
        exam=exam_message(result.exam, site_code=site_code),  # the site's view: no patient context
        report=report_message(result.report.fields(), signer=result.signer_name),
        critical=result.critical,
    )
    stamp = ts(result.published_at)
    if stamp is not None:
        msg.published_at.CopyFrom(stamp)
    if result.report.pdf_sha256:
        msg.pdf.CopyFrom(common_pb2.ReportPdf(sha256=result.report.pdf_sha256, size=result.report.pdf_size))
    msg.critical_state = result.critical_state
    ack = result.acknowledgement
    if ack is not None:
        msg.acknowledgement.CopyFrom(results_pb2.CriticalAcknowledgement(
            name=ack["name"], role=ack["role"], method=ack["method"], read_back=ack["read_back"]))  # fmt: skip
        at = ts(ack["at"])
        if at is not None:
            msg.acknowledgement.acknowledged_at.CopyFrom(at)
    return msg


class ResultsServicer(results_pb2_grpc.ResultsServicer):
    def __init__(self, service: ResultsService, *, feed: WatchFeed, pdfs: ReportPdfService) -> None:
        self._svc = service
        self._feed = feed
        self._pdfs = pdfs

    def ListResults(
        self, request: results_pb2.ListResultsRequest, context: grpc.ServicerContext
    ) -> results_pb2.ListResultsResponse:
        p = current_principal()
        rows = self._svc.list_after(p, after=request.after_cursor, limit=request.limit)
        next_cursor = rows[-1].seq if rows else request.after_cursor
        return results_pb2.ListResultsResponse(
            results=[result_message(r, site_code=p.site_code or "") for r in rows], next_cursor=next_cursor
        )

    async def WatchResults(
        self, request: results_pb2.WatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[results_pb2.Result]:
        p = current_principal()
        answered = False
        async for row in self._feed.results(p, after=request.after_cursor):
            if not isinstance(row, ResultsLive):
                answered = True
                yield result_message(row, site_code=p.site_code or "")
            elif not answered:  # nothing to send yet: headers, so the client knows it is subscribed
                await context.send_initial_metadata(())

    def GetResult(self, request: results_pb2.GetResultRequest, context: grpc.ServicerContext) -> results_pb2.Result:
        p = current_principal()
        return result_message(self._svc.get(p, exam_id=request.exam_id), site_code=p.site_code or "")

    def AcknowledgeCritical(
        self, request: results_pb2.AcknowledgeCriticalRequest, context: grpc.ServicerContext
    ) -> results_pb2.Result:
        p = current_principal()
        found = self._svc.acknowledge(p, cursor=request.cursor, name=request.name, role=request.role,
                                      method=request.method, read_back=request.read_back)  # fmt: skip
        return result_message(found, site_code=p.site_code or "")

    async def GetReportPdf(
        self, request: common_pb2.GetReportPdfRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.ReportPdfChunk]:
        opened = self._pdfs.open_for_site(current_principal(), exam_id=request.exam_id, version=request.version)
        async for chunk in pdf_chunks(opened):
            yield chunk
