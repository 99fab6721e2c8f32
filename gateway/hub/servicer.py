"""gRPC servicer of ``teleread.v1.Ingest``: converts messages and calls the ingest service.

``Upload`` is a coroutine on the server's event loop: it reads the client stream there and hands
what has arrived to ``IngestService.receive`` in the loop's executor, one call per run of messages
(a call returns once the client has been quiet for a moment), so a stalled or idle upload holds no
thread. A stream with no message for ``idle_seconds`` ends with UNAVAILABLE / ``UPLOAD_IDLE``; the
bytes written so far stay confirmed and the client resumes from ``GetUploadStatus``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Iterator

import grpc

from teleread.errors import InvalidInput, TelereadError, Unavailable
from teleread.gateway.hub.ingest import IngestService, UploadState
from teleread.gateway.hub.patient_context import REQUEST_FIELDS
from teleread.messages import KIND_NAMES, PRIORITY_NAMES, exam_message, object_message
from teleread.rpc import ClientStream, current_principal
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("teleread.ingest")

_STATES = {
    "partial": ingest_pb2.UPLOAD_STATE_PARTIAL,
    "stored": ingest_pb2.UPLOAD_STATE_STORED,
    "duplicate": ingest_pb2.UPLOAD_STATE_DUPLICATE,
}


def _status(state: UploadState) -> ingest_pb2.UploadStatus:
    msg = ingest_pb2.UploadStatus(
        upload_id=state.upload_id, committed_offset=state.committed_offset, size=state.size, state=_STATES[state.state]
    )
    if state.object_row is not None:
        msg.object.CopyFrom(object_message(state.object_row))
    return msg


def _patient_fields(msg: common_pb2.Patient) -> dict[str, str]:
    return {name: getattr(msg, name) for name in REQUEST_FIELDS}


def _log_release_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:  # the lease then lapses by itself
        log.warning("could not free an upload's writer lease", extra={"reason": type(done.exception()).__name__})


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, service: IngestService, *, idle_seconds: float = 60.0) -> None:
        self._svc = service
        self._idle = idle_seconds

    def _exam(self, row: dict[str, Any]) -> common_pb2.Exam:
        return exam_message(row, site_code=current_principal().site_code or "")

    def OpenExam(self, request: ingest_pb2.OpenExamRequest, context: grpc.ServicerContext) -> common_pb2.Exam:
        if request.kind not in KIND_NAMES:
            raise InvalidInput("kind must be ECG or IMAGING", reason="BAD_KIND")
        row = self._svc.open_exam(
            current_principal(),
            client_exam_key=request.client_exam_key,
            kind=KIND_NAMES[request.kind],
            priority=PRIORITY_NAMES.get(request.priority, "routine"),
            indication=request.indication,
            study_instance_uid=request.study_instance_uid,
            follow_up_of=request.follow_up_of,
            patient=_patient_fields(request.patient) if request.HasField("patient") else None,
        )
        return self._exam(row)  # the site's view: never the patient context

    def BeginUpload(
        self, request: ingest_pb2.BeginUploadRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.UploadStatus:
        return _status(
            self._svc.begin_upload(
                current_principal(),
                exam_id=request.exam_id,
                size=request.size,
                sha256=request.sha256.lower(),
                role=request.role,
            )
        )

    async def Upload(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadChunk], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.UploadStatus:
        p = current_principal()
        confirmed: list[int] = []  # the offset the hub has confirmed on this stream, once known

        def idle() -> TelereadError:
            where = {"committed_offset": str(confirmed[-1])} if confirmed else {}
            return Unavailable(
                f"no data on this upload stream for {self._idle:g} s; resume from the confirmed offset",
                reason="UPLOAD_IDLE",
                metadata={**where, "idle_seconds": f"{self._idle:g}"},
            )

        stream = ClientStream(request_iterator, idle_seconds=self._idle, idle_error=idle)
        try:
            first = await stream.first()
            if first is None or not first.upload_id:
                raise InvalidInput("the first chunk must name the upload", reason="NO_UPLOAD_ID")
            opening = [first.data] if first.data else []

            def chunks() -> Iterator[bytes]:
                while opening and not stream.closed:  # nothing more once the client has gone
                    yield opening.pop()
                for msg in stream.drain():
                    if msg.data:
                        yield msg.data

            offset = first.offset
            writer = self._svc.new_writer()  # this stream's hold on the upload, kept between runs
            finished = False
            try:
                while True:
                    state = await asyncio.to_thread(
                        self._svc.receive, p, upload_id=first.upload_id, offset=offset, chunks=chunks(), writer=writer
                    )
                    offset = state.committed_offset
                    confirmed.append(offset)
                    if state.state != "partial":
                        finished = True  # the row's last move freed the lease
                        return _status(state)
                    if not await stream.wait():
                        return _status(state)
            finally:  # not awaited: a stream ended by cancellation must not wait in its clean-up
                if not finished:
                    done = asyncio.get_running_loop().run_in_executor(
                        None, self._svc.release_writer, first.upload_id, writer
                    )
                    done.add_done_callback(_log_release_failure)
        finally:
            stream.close()

    def GetUploadStatus(
        self, request: ingest_pb2.GetUploadStatusRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.UploadStatus:
        return _status(self._svc.upload_status(current_principal(), upload_id=request.upload_id))

    def CommitExam(self, request: ingest_pb2.CommitExamRequest, context: grpc.ServicerContext) -> common_pb2.Exam:
        return self._exam(
            self._svc.commit_exam(
                current_principal(), exam_id=request.exam_id, expected_objects=request.expected_objects
            )
        )

    def GetExam(self, request: ingest_pb2.GetExamRequest, context: grpc.ServicerContext) -> common_pb2.Exam:
        return self._exam(self._svc.get_exam(current_principal(), request.exam_id))
