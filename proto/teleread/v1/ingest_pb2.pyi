from teleread.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_STATE_UNSPECIFIED: _ClassVar[UploadState]
    UPLOAD_STATE_PARTIAL: _ClassVar[UploadState]
    UPLOAD_STATE_STORED: _ClassVar[UploadState]
    UPLOAD_STATE_DUPLICATE: _ClassVar[UploadState]
UPLOAD_STATE_UNSPECIFIED: UploadState
UPLOAD_STATE_PARTIAL: UploadState
UPLOAD_STATE_STORED: UploadState
UPLOAD_STATE_DUPLICATE: UploadState

class OpenExamRequest(_message.Message):
    __slots__ = ("client_exam_key", "kind", "priority", "indication", "study_instance_uid", "follow_up_of", "patient")
    CLIENT_EXAM_KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    INDICATION_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_OF_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    client_exam_key: str
    kind: _common_pb2.ExamKind
    priority: _common_pb2.Priority
    indication: str
    study_instance_uid: str
    follow_up_of: str
    patient: _common_pb2.Patient
    def __init__(self, client_exam_key: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.ExamKind, str]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., indication: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., follow_up_of: _Optional[str] = ..., patient: _Optional[_Union[_common_pb2.Patient, _Mapping]] = ...) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("exam_id", "size", "sha256", "role", "name")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    size: int
    sha256: str
    role: str
    name: str
    def __init__(self, exam_id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., role: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("upload_id", "committed_offset", "size", "state", "object")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_offset: int
    size: int
    state: UploadState
    object: _common_pb2.StoredObject
    def __init__(self, upload_id: _Optional[str] = ..., committed_offset: _Optional[int] = ..., size: _Optional[int] = ..., state: _Optional[_Union[UploadState, str]] = ..., object: _Optional[_Union[_common_pb2.StoredObject, _Mapping]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetUploadStatusRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CommitExamRequest(_message.Message):
    __slots__ = ("exam_id", "expected_objects")
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    expected_objects: int
    def __init__(self, exam_id: _Optional[str] = ..., expected_objects: _Optional[int] = ...) -> None: ...

class GetExamRequest(_message.Message):
    __slots__ = ("exam_id",)
    EXAM_ID_FIELD_NUMBER: _ClassVar[int]
    exam_id: str
    def __init__(self, exam_id: _Optional[str] = ...) -> None: ...
