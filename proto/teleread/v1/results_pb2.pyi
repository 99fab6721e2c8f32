import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from teleread.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CriticalAcknowledgement(_message.Message):
    __slots__ = ("name", "role", "method", "read_back", "acknowledged_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    READ_BACK_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    method: str
    read_back: str
    acknowledged_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., method: _Optional[str] = ..., read_back: _Optional[str] = ..., acknowledged_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AcknowledgeCriticalRequest(_message.Message):
    __slots__ = ("cursor", "name", "role", "method", "read_back")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    READ_BACK_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    name: str
    role: str
    method: str
    read_back: str
    def __init__(self, cursor: _Optional[int] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., method: _Optional[str] = ..., read_back: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("cursor", "exam", "report", "critical", "published_at", "pdf", "critical_state", "acknowledgement")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    EXAM_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PDF_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_STATE_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGEMENT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    exam: _common_pb2.Exam
    report: _common_pb2.Report
    critical: bool
    published_at: _timestamp_pb2.Timestamp
    pdf: _common_pb2.ReportPdf
    critical_state: str
    acknowledgement: CriticalAcknowledgement
    def __init__(self, cursor: _Optional[int] = ..., exam: _Optional[_Union[_common_pb2.Exam, _Mapping]] = ..., report: _Optional[_Union[_common_pb2.Report, _Mapping]] = ..., critical: _Optional[bool] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pdf: _Optional[_Union[_common_pb2.ReportPdf, _Mapping]] = ..., critical_state: _Optional[str] = ..., acknowledgement: _Optional[_Union[CriticalAcknowledgement, _Mapping]] = ...) -> None: ...

class ListResultsRequest(_message.Message):
    __slots__ = ("after_cursor", "limit")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    limit: int
    def __init__(self, after_cursor: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListResultsResponse(_message.Message):
    __slots__ = ("results", "next_cursor")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    next_cursor: int
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., next_cursor: _Optional[int] = ...) -> None: ...

class WatchResultsRequest(_message.Message):
    __slots__ = ("after_cursor",)
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    def __init__(self, after_cursor: _Optional[int] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("exam_id",)
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    def __init__(self, exam_id: _Optional[str] = ...) -> None: ...
