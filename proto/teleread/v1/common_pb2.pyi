import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Level(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEVEL_UNSPECIFIED: _ClassVar[Level]
    LEVEL_CRITICAL: _ClassVar[Level]
    LEVEL_URGENT: _ClassVar[Level]
    LEVEL_ROUTINE: _ClassVar[Level]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_STAT: _ClassVar[Priority]
    PRIORITY_URGENT: _ClassVar[Priority]
    PRIORITY_ROUTINE: _ClassVar[Priority]

class ExamKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXAM_KIND_UNSPECIFIED: _ClassVar[ExamKind]
    EXAM_KIND_ECG: _ClassVar[ExamKind]
    EXAM_KIND_IMAGING: _ClassVar[ExamKind]
LEVEL_UNSPECIFIED: Level
LEVEL_CRITICAL: Level
LEVEL_URGENT: Level
LEVEL_ROUTINE: Level
PRIORITY_UNSPECIFIED: Priority
PRIORITY_STAT: Priority
PRIORITY_URGENT: Priority
PRIORITY_ROUTINE: Priority
EXAM_KIND_UNSPECIFIED: ExamKind
EXAM_KIND_ECG: ExamKind
EXAM_KIND_IMAGING: ExamKind

class Evidence(_message.Message):
    __slots__ = ("name", "value", "unit", "lead", "threshold", "at_s", "duration_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LEAD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    unit: str
    lead: str
    threshold: float
    at_s: float
    duration_s: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., lead: _Optional[str] = ..., threshold: _Optional[float] = ..., at_s: _Optional[float] = ..., duration_s: _Optional[float] = ...) -> None: ...

class EcgMeasurements(_message.Message):
    __slots__ = ("heart_rate_bpm", "rr_ms", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms", "qtc_fridericia_ms", "p_axis_deg", "qrs_axis_deg", "t_axis_deg", "rhythm_lead", "method")
    HEART_RATE_BPM_FIELD_NUMBER: _ClassVar[int]
    RR_MS_FIELD_NUMBER: _ClassVar[int]
    PR_MS_FIELD_NUMBER: _ClassVar[int]
    QRS_MS_FIELD_NUMBER: _ClassVar[int]
    QT_MS_FIELD_NUMBER: _ClassVar[int]
    QTC_BAZETT_MS_FIELD_NUMBER: _ClassVar[int]
    QTC_FRIDERICIA_MS_FIELD_NUMBER: _ClassVar[int]
    P_AXIS_DEG_FIELD_NUMBER: _ClassVar[int]
    QRS_AXIS_DEG_FIELD_NUMBER: _ClassVar[int]
    T_AXIS_DEG_FIELD_NUMBER: _ClassVar[int]
    RHYTHM_LEAD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    heart_rate_bpm: float
    rr_ms: float
    pr_ms: float
    qrs_ms: float
    qt_ms: float
    qtc_bazett_ms: float
    qtc_fridericia_ms: float
    p_axis_deg: float
    qrs_axis_deg: float
    t_axis_deg: float
    rhythm_lead: str
    method: str
    def __init__(self, heart_rate_bpm: _Optional[float] = ..., rr_ms: _Optional[float] = ..., pr_ms: _Optional[float] = ..., qrs_ms: _Optional[float] = ..., qt_ms: _Optional[float] = ..., qtc_bazett_ms: _Optional[float] = ..., qtc_fridericia_ms: _Optional[float] = ..., p_axis_deg: _Optional[float] = ..., qrs_axis_deg: _Optional[float] = ..., t_axis_deg: _Optional[float] = ..., rhythm_lead: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("code", "title", "level", "evidence")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    code: str
    title: str
    level: Level
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    def __init__(self, code: _Optional[str] = ..., title: _Optional[str] = ..., level: _Optional[_Union[Level, str]] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ...) -> None: ...

class Triage(_message.Message):
    __slots__ = ("level", "score", "findings", "rules_version", "triaged_at", "summary", "models", "ecg")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRIAGED_AT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ECG_FIELD_NUMBER: _ClassVar[int]
    level: Level
    score: float
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    rules_version: str
    triaged_at: _timestamp_pb2.Timestamp
    summary: str
    models: _containers.RepeatedScalarFieldContainer[str]
    ecg: EcgMeasurements
    def __init__(self, level: _Optional[_Union[Level, str]] = ..., score: _Optional[float] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., rules_version: _Optional[str] = ..., triaged_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., summary: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., ecg: _Optional[_Union[EcgMeasurements, _Mapping]] = ...) -> None: ...

class StoredObject(_message.Message):
    __slots__ = ("object_id", "role", "sha256", "size", "sop_instance_uid", "series_instance_uid", "modality", "media_type")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    role: str
    sha256: str
    size: int
    sop_instance_uid: str
    series_instance_uid: str
    modality: str
    media_type: str
    def __init__(self, object_id: _Optional[str] = ..., role: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., sop_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., modality: _Optional[str] = ..., media_type: _Optional[str] = ...) -> None: ...

class Exam(_message.Message):
    __slots__ = ("exam_id", "site", "kind", "modality", "state", "priority", "indication", "specialty", "study_instance_uid", "triage", "received_at", "deadline", "object_count", "total_bytes", "claimed_by", "lease_expires_at", "reject_reason", "incomplete", "refused_count", "refused", "follow_up_of", "stored_sha256", "patient")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    INDICATION_FIELD_NUMBER: _ClassVar[int]
    SPECIALTY_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    TRIAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_BY_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_OF_FIELD_NUMBER: _ClassVar[int]
    STORED_SHA256_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    site: str
    kind: ExamKind
    modality: str
    state: str
    priority: Priority
    indication: str
    specialty: str
    study_instance_uid: str
    triage: Triage
    received_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    object_count: int
    total_bytes: int
    claimed_by: str
    lease_expires_at: _timestamp_pb2.Timestamp
    reject_reason: str
    incomplete: bool
    refused_count: int
    refused: _containers.RepeatedCompositeFieldContainer[RefusedObject]
    follow_up_of: str
    stored_sha256: _containers.RepeatedScalarFieldContainer[str]
    patient: Patient
    def __init__(self, exam_id: _Optional[str] = ..., site: _Optional[str] = ..., kind: _Optional[_Union[ExamKind, str]] = ..., modality: _Optional[str] = ..., state: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., indication: _Optional[str] = ..., specialty: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., triage: _Optional[_Union[Triage, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., object_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., claimed_by: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reject_reason: _Optional[str] = ..., incomplete: _Optional[bool] = ..., refused_count: _Optional[int] = ..., refused: _Optional[_Iterable[_Union[RefusedObject, _Mapping]]] = ..., follow_up_of: _Optional[str] = ..., stored_sha256: _Optional[_Iterable[str]] = ..., patient: _Optional[_Union[Patient, _Mapping]] = ...) -> None: ...

class Patient(_message.Message):
    __slots__ = ("id", "name", "sex", "birth_date", "age", "referring_physician", "patient_class")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    BIRTH_DATE_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    REFERRING_PHYSICIAN_FIELD_NUMBER: _ClassVar[int]
    PATIENT_CLASS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    sex: str
    birth_date: str
    age: str
    referring_physician: str
    patient_class: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., sex: _Optional[str] = ..., birth_date: _Optional[str] = ..., age: _Optional[str] = ..., referring_physician: _Optional[str] = ..., patient_class: _Optional[str] = ...) -> None: ...

class RefusedObject(_message.Message):
    __slots__ = ("role", "sha256", "sop_instance_uid", "reason", "message", "code")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    role: str
    sha256: str
    sop_instance_uid: str
    reason: str
    message: str
    code: str
    def __init__(self, role: _Optional[str] = ..., sha256: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("exam_id", "version", "status", "text", "impression", "critical", "author", "signed_by", "signed_at", "amends_reason", "sha256", "statements", "measurements", "measurements_edited")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    SIGNED_BY_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    AMENDS_REASON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_EDITED_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    version: int
    status: str
    text: str
    impression: str
    critical: bool
    author: str
    signed_by: str
    signed_at: _timestamp_pb2.Timestamp
    amends_reason: str
    sha256: str
    statements: _containers.RepeatedCompositeFieldContainer[ReportStatement]
    measurements: EcgMeasurements
    measurements_edited: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, exam_id: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[str] = ..., text: _Optional[str] = ..., impression: _Optional[str] = ..., critical: _Optional[bool] = ..., author: _Optional[str] = ..., signed_by: _Optional[str] = ..., signed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., amends_reason: _Optional[str] = ..., sha256: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[ReportStatement, _Mapping]]] = ..., measurements: _Optional[_Union[EcgMeasurements, _Mapping]] = ..., measurements_edited: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportStatement(_message.Message):
    __slots__ = ("code", "text", "text_zh", "source", "confirmed")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_ZH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    code: str
    text: str
    text_zh: str
    source: str
    confirmed: bool
    def __init__(self, code: _Optional[str] = ..., text: _Optional[str] = ..., text_zh: _Optional[str] = ..., source: _Optional[str] = ..., confirmed: _Optional[bool] = ...) -> None: ...

class ReportPdf(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class GetReportPdfRequest(_message.Message):
    __slots__ = ("exam_id", "version")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    version: int
    def __init__(self, exam_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ReportPdfChunk(_message.Message):
    __slots__ = ("data", "offset", "sha256", "size", "version")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    sha256: str
    size: int
    version: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...
