"""gRPC servicer of ``teleread.v1.Ingest``: converts messages and calls the ingest service."""

from __future__ import annotations

from typing import Any, Iterator

import grpc

from teleread.errors import InvalidInput
from teleread.gateway.ingest import IngestService, UploadState
from teleread.messages import KIND_NAMES, PRIORITY_NAMES, exam_message, object_message
from teleread.rpc import current_principal
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

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


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, service: IngestService) -> None:
        self._svc = service

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
        )
        return self._exam(row)

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

    def Upload(
        self, request_iterator: Iterator[ingest_pb2.UploadChunk], context: grpc.ServicerContext
    ) -> ingest_pb2.UploadStatus:
        first = next(request_iterator, None)
        if first is None or not first.upload_id:
            raise InvalidInput("the first chunk must name the upload", reason="NO_UPLOAD_ID")

        def chunks() -> Iterator[bytes]:
            if first.data:
                yield first.data
            for msg in request_iterator:
                if msg.data:
                    yield msg.data

        return _status(
            self._svc.receive(current_principal(), upload_id=first.upload_id, offset=first.offset, chunks=chunks())
        )

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
