"""Object storage port: one interface, two adapters (local directory, S3 via the minio SDK).

Keys are built only by :func:`object_key` (tenant id and content hash) and :func:`report_pdf_key`
(tenant id, exam id and report version) from server-side identifiers, never from user strings.
Every write and every read checks the object's SHA-256.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_EXAM_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def object_key(*, tenant_id: int, sha256: str) -> str:
    """The storage key of an object: tenant prefix + content hash (content addressed)."""
    if not isinstance(tenant_id, int) or tenant_id <= 0:
        raise ValueError("tenant id must be a positive integer")
    if not _HEX64.match(sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return f"t{tenant_id}/objects/{sha256[:2]}/{sha256}"


def rendition_key(*, tenant_id: int, sha256: str) -> str:
    """The storage key of a viewer's copy of an instance's pixels (an HTJ2K codestream the hub made):
    tenant prefix + its content hash, outside ``objects/``, which holds uploaded objects only."""
    return object_key(tenant_id=tenant_id, sha256=sha256).replace("/objects/", "/renditions/", 1)


def report_pdf_key(*, tenant_id: int, exam_id: str, version: int) -> str:
    """The storage key of a report version's printed PDF: tenant prefix, the exam's server-made id
    and the version (outside ``objects/``, which holds uploaded objects only)."""
    if not isinstance(tenant_id, int) or tenant_id <= 0:
        raise ValueError("tenant id must be a positive integer")
    if not _EXAM_ID.match(exam_id):
        raise ValueError("exam id must be a server-made id")
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError("version must be a positive integer")
    return f"t{tenant_id}/reports/{exam_id}/v{version}.pdf"


class ObjectStore(Protocol):
    """What the hub needs from object storage."""

    def put_file(self, key: str, path: Path, *, sha256: str, size: int, consume: bool = False) -> None:
        """Store the file at ``path`` under ``key``, atomically: either the whole verified object
        is visible afterwards, or nothing. Raises IntegrityError if the file's SHA-256 or size do
        not match, StorageError if the store fails. Idempotent for the same key and content.
        ``consume=True``: the caller gives the file up (a store may move it instead of copying)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """Stored size in bytes; ObjectNotFound if absent."""
        ...

    def open_verified(self, key: str, *, sha256: str, size: int) -> AbstractContextManager[BinaryIO]:
        """A readable binary file with the object's bytes, whose SHA-256 and size were checked
        against the expected values before it is handed out (IntegrityError otherwise)."""
        ...

    def read_range(self, key: str, *, offset: int, length: int, sha256: str) -> bytes:
        """``length`` bytes of the object from ``offset``, returned only if they hash to ``sha256``
        (a part whose digest was recorded at ingest, such as a DICOM instance's pixel data);
        IntegrityError if they do not or the object is shorter."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object (used only by reconciliation of orphans); absent is fine."""
        ...

    def iter_keys(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """Every stored key that starts with ``prefix``, with its last modification (UTC), in no
        promised order; writes still in progress are not listed. For the clean-up of objects no
        metadata row refers to."""
        ...

    def check(self) -> None:
        """Raise StorageError if the store is unreachable (readiness check)."""
        ...
