import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from teleread.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListWorklistRequest(_message.Message):
    __slots__ = ("limit", "include_claimed")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CLAIMED_FIELD_NUMBER: _ClassVar[int]
    limit: int
    include_claimed: bool
    def __init__(self, limit: _Optional[int] = ..., include_claimed: _Optional[bool] = ...) -> None: ...

class ListWorklistResponse(_message.Message):
    __slots__ = ("exams",)
    EXAMS_FIELD_NUMBER: _ClassVar[int]
    exams: _containers.RepeatedCompositeFieldContainer[_common_pb2.Exam]
    def __init__(self, exams: _Optional[_Iterable[_Union[_common_pb2.Exam, _Mapping]]] = ...) -> None: ...

class WatchWorklistRequest(_message.Message):
    __slots__ = ("snapshot_batches", "change_batches")
    SNAPSHOT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CHANGE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    snapshot_batches: bool
    change_batches: bool
    def __init__(self, snapshot_batches: _Optional[bool] = ..., change_batches: _Optional[bool] = ...) -> None: ...

class WorklistEvent(_message.Message):
    __slots__ = ("type", "exam", "event_id", "at", "exams", "changes")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WorklistEvent.Type]
        TYPE_SNAPSHOT: _ClassVar[WorklistEvent.Type]
        TYPE_QUEUED: _ClassVar[WorklistEvent.Type]
        TYPE_CLAIMED: _ClassVar[WorklistEvent.Type]
        TYPE_RELEASED: _ClassVar[WorklistEvent.Type]
        TYPE_REPORTED: _ClassVar[WorklistEvent.Type]
        TYPE_CRITICAL: _ClassVar[WorklistEvent.Type]
        TYPE_SNAPSHOT_END: _ClassVar[WorklistEvent.Type]
        TYPE_SNAPSHOT_BATCH: _ClassVar[WorklistEvent.Type]
        TYPE_CHANGES: _ClassVar[WorklistEvent.Type]
    TYPE_UNSPECIFIED: WorklistEvent.Type
    TYPE_SNAPSHOT: WorklistEvent.Type
    TYPE_QUEUED: WorklistEvent.Type
    TYPE_CLAIMED: WorklistEvent.Type
    TYPE_RELEASED: WorklistEvent.Type
    TYPE_REPORTED: WorklistEvent.Type
    TYPE_CRITICAL: WorklistEvent.Type
    TYPE_SNAPSHOT_END: WorklistEvent.Type
    TYPE_SNAPSHOT_BATCH: WorklistEvent.Type
    TYPE_CHANGES: WorklistEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EXAM_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EXAMS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    type: WorklistEvent.Type
    exam: _common_pb2.Exam
    event_id: int
    at: _timestamp_pb2.Timestamp
    exams: _containers.RepeatedCompositeFieldContainer[_common_pb2.Exam]
    changes: _containers.RepeatedCompositeFieldContainer[WorklistEvent]
    def __init__(self, type: _Optional[_Union[WorklistEvent.Type, str]] = ..., exam: _Optional[_Union[_common_pb2.Exam, _Mapping]] = ..., event_id: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exams: _Optional[_Iterable[_Union[_common_pb2.Exam, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[WorklistEvent, _Mapping]]] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("exam", "fence", "lease_expires_at")
    EXAM_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    exam: _common_pb2.Exam
    fence: int
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, exam: _Optional[_Union[_common_pb2.Exam, _Mapping]] = ..., fence: _Optional[int] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ClaimNextRequest(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: int
    def __init__(self, lease_seconds: _Optional[int] = ...) -> None: ...

class ClaimExamRequest(_message.Message):
    __slots__ = ("exam_id", "lease_seconds", "for_amendment")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FOR_AMENDMENT_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    lease_seconds: int
    for_amendment: bool
    def __init__(self, exam_id: _Optional[str] = ..., lease_seconds: _Optional[int] = ..., for_amendment: _Optional[bool] = ...) -> None: ...

class RenewClaimRequest(_message.Message):
    __slots__ = ("exam_id", "fence", "lease_seconds")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    fence: int
    lease_seconds: int
    def __init__(self, exam_id: _Optional[str] = ..., fence: _Optional[int] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class ReleaseClaimRequest(_message.Message):
    __slots__ = ("exam_id", "fence")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    fence: int
    def __init__(self, exam_id: _Optional[str] = ..., fence: _Optional[int] = ...) -> None: ...

class ReleaseClaimResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetExamDetailsRequest(_message.Message):
    __slots__ = ("exam_id",)
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    def __init__(self, exam_id: _Optional[str] = ...) -> None: ...

class ExamDetails(_message.Message):
    __slots__ = ("exam", "objects", "reports", "related", "priors", "suggested_statements")
    EXAM_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    RELATED_FIELD_NUMBER: _ClassVar[int]
    PRIORS_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    exam: _common_pb2.Exam
    objects: _containers.RepeatedCompositeFieldContainer[_common_pb2.StoredObject]
    reports: _containers.RepeatedCompositeFieldContainer[_common_pb2.Report]
    related: _containers.RepeatedCompositeFieldContainer[_common_pb2.Exam]
    priors: _containers.RepeatedCompositeFieldContainer[_common_pb2.Exam]
    suggested_statements: _containers.RepeatedCompositeFieldContainer[_common_pb2.ReportStatement]
    def __init__(self, exam: _Optional[_Union[_common_pb2.Exam, _Mapping]] = ..., objects: _Optional[_Iterable[_Union[_common_pb2.StoredObject, _Mapping]]] = ..., reports: _Optional[_Iterable[_Union[_common_pb2.Report, _Mapping]]] = ..., related: _Optional[_Iterable[_Union[_common_pb2.Exam, _Mapping]]] = ..., priors: _Optional[_Iterable[_Union[_common_pb2.Exam, _Mapping]]] = ..., suggested_statements: _Optional[_Iterable[_Union[_common_pb2.ReportStatement, _Mapping]]] = ...) -> None: ...

class StreamObjectRequest(_message.Message):
    __slots__ = ("exam_id", "object_id")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    object_id: str
    def __init__(self, exam_id: _Optional[str] = ..., object_id: _Optional[str] = ...) -> None: ...

class ObjectChunk(_message.Message):
    __slots__ = ("data", "offset", "sha256", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    sha256: str
    size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class GetEcgWaveformRequest(_message.Message):
    __slots__ = ("exam_id",)
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    def __init__(self, exam_id: _Optional[str] = ...) -> None: ...

class EcgLead(_message.Message):
    __slots__ = ("name", "microvolts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MICROVOLTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    microvolts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., microvolts: _Optional[_Iterable[int]] = ...) -> None: ...

class EcgWaveform(_message.Message):
    __slots__ = ("fs", "leads", "duration_s", "source")
    FS_FIELD_NUMBER: _ClassVar[int]
    LEADS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    fs: float
    leads: _containers.RepeatedCompositeFieldContainer[EcgLead]
    duration_s: float
    source: str
    def __init__(self, fs: _Optional[float] = ..., leads: _Optional[_Iterable[_Union[EcgLead, _Mapping]]] = ..., duration_s: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class SaveReportRequest(_message.Message):
    __slots__ = ("exam_id", "fence", "text", "impression", "critical", "statements", "measurements", "measurements_edited")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_EDITED_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    fence: int
    text: str
    impression: str
    critical: bool
    statements: _containers.RepeatedCompositeFieldContainer[_common_pb2.ReportStatement]
    measurements: _common_pb2.EcgMeasurements
    measurements_edited: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, exam_id: _Optional[str] = ..., fence: _Optional[int] = ..., text: _Optional[str] = ..., impression: _Optional[str] = ..., critical: _Optional[bool] = ..., statements: _Optional[_Iterable[_Union[_common_pb2.ReportStatement, _Mapping]]] = ..., measurements: _Optional[_Union[_common_pb2.EcgMeasurements, _Mapping]] = ..., measurements_edited: _Optional[_Iterable[str]] = ...) -> None: ...

class SignReportRequest(_message.Message):
    __slots__ = ("exam_id", "fence")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    fence: int
    def __init__(self, exam_id: _Optional[str] = ..., fence: _Optional[int] = ...) -> None: ...

class AmendReportRequest(_message.Message):
    __slots__ = ("exam_id", "reason", "text", "impression", "critical", "fence", "statements", "measurements", "measurements_edited")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_EDITED_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    reason: str
    text: str
    impression: str
    critical: bool
    fence: int
    statements: _containers.RepeatedCompositeFieldContainer[_common_pb2.ReportStatement]
    measurements: _common_pb2.EcgMeasurements
    measurements_edited: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, exam_id: _Optional[str] = ..., reason: _Optional[str] = ..., text: _Optional[str] = ..., impression: _Optional[str] = ..., critical: _Optional[bool] = ..., fence: _Optional[int] = ..., statements: _Optional[_Iterable[_Union[_common_pb2.ReportStatement, _Mapping]]] = ..., measurements: _Optional[_Union[_common_pb2.EcgMeasurements, _Mapping]] = ..., measurements_edited: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStatementsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatementGroup(_message.Message):
    __slots__ = ("code", "title", "title_zh")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TITLE_ZH_FIELD_NUMBER: _ClassVar[int]
    code: str
    title: str
    title_zh: str
    def __init__(self, code: _Optional[str] = ..., title: _Optional[str] = ..., title_zh: _Optional[str] = ...) -> None: ...

class LibraryStatement(_message.Message):
    __slots__ = ("code", "group", "text", "text_zh", "suggested_by")
    CODE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_ZH_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_BY_FIELD_NUMBER: _ClassVar[int]
    code: str
    group: str
    text: str
    text_zh: str
    suggested_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[str] = ..., group: _Optional[str] = ..., text: _Optional[str] = ..., text_zh: _Optional[str] = ..., suggested_by: _Optional[_Iterable[str]] = ...) -> None: ...

class StatementLibrary(_message.Message):
    __slots__ = ("version", "groups", "statements")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    groups: _containers.RepeatedCompositeFieldContainer[StatementGroup]
    statements: _containers.RepeatedCompositeFieldContainer[LibraryStatement]
    def __init__(self, version: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[StatementGroup, _Mapping]]] = ..., statements: _Optional[_Iterable[_Union[LibraryStatement, _Mapping]]] = ...) -> None: ...
