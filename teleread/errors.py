"""The one error family of teleread.

Every error the service layer raises is a :class:`TelereadError` carrying a gRPC status code name,
a stable machine-readable ``reason`` and a ``retryable`` flag. Messages are written by us and never
include patient data or a parser's exception text; the gRPC layer maps them to rich status details.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping


class TelereadError(Exception):
    """Base of all domain errors."""

    code: ClassVar[str] = "INTERNAL"
    default_reason: ClassVar[str] = "INTERNAL"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep reason and metadata when the error crosses a process boundary (CPU workers).
        return (_rebuild, (type(self), self.message, self.reason, self.metadata))


def _rebuild(cls: type[TelereadError], message: str, reason: str, metadata: dict[str, str]) -> TelereadError:
    return cls(message, reason=reason, metadata=metadata)


class InvalidInput(TelereadError):
    """The client sent something malformed (a bad DICOM file, a bad UID, a bad WFDB record)."""

    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_INPUT"


class NotFound(TelereadError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(TelereadError):
    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class Conflict(TelereadError):
    """A state conflict: the thing exists but is in the wrong state, or the bytes differ."""

    code = "FAILED_PRECONDITION"
    default_reason = "CONFLICT"


class LeaseLost(TelereadError):
    """A claim's lease lapsed or its fencing token is stale."""

    code = "FAILED_PRECONDITION"
    default_reason = "LEASE_LOST"


class Unauthenticated(TelereadError):
    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(TelereadError):
    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(TelereadError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"
    retryable = True


class Unavailable(TelereadError):
    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"
    retryable = True


class IntegrityError(TelereadError):
    """Stored bytes do not match their recorded SHA-256: never served."""

    code = "DATA_LOSS"
    default_reason = "CHECKSUM_MISMATCH"


class StorageError(TelereadError):
    """The object store failed (unreachable, refused, full)."""

    code = "UNAVAILABLE"
    default_reason = "STORAGE_UNAVAILABLE"
    retryable = True


class ObjectNotFound(NotFound):
    default_reason = "OBJECT_NOT_FOUND"
