"""Local-directory object store (the embedded default) and the key and verification helpers both
object-store adapters share (hashing itself is :mod:`teleread.files`).

Owns: the on-disk layout under one root (``<root>/<key>`` plus ``<root>/.tmp`` for writes in
progress), atomic verified writes (copy while hashing, fsync, ``os.replace``, fsync the directory:
:func:`teleread.files.atomic_file`), verified reads (hash before the file is handed out), the
listing of stored keys, and the mapping of OS errors to :class:`~teleread.errors.StorageError` /
:class:`~teleread.errors.ResourceExhausted`.
Folders are created 0700 and object files 0600: only the hub's own user reads them.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator, NoReturn

from teleread.errors import (
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    ResourceExhausted,
    StorageError,
)
from teleread.files import (
    BLOCK_SIZE,
    SizeLimitExceeded,
    atomic_file,
    fsync_dir,
    hash_file,
    hash_stream,
    replace_durably,
)

logger = logging.getLogger("teleread.storage.local")

CHUNK_SIZE = BLOCK_SIZE
_TEMP_DIR_NAME = ".tmp"
_MAX_KEY_LENGTH = 1024
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
PRIVATE_DIR_MODE = 0o700


# --- helpers shared with the S3 adapter -------------------------------------------------------


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise InvalidInput.

    Allowed: segments of ``[A-Za-z0-9._-]`` separated by ``/``; no empty segment, no segment
    starting with ``.`` (so no ``.``/``..`` and no clash with the store's own ``.tmp`` area),
    no leading ``/``. The key itself is never put in the message.
    """
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
        raise InvalidInput("object key is empty or too long", reason="INVALID_OBJECT_KEY")
    if not all(_KEY_SEGMENT.match(segment) for segment in key.split("/")):
        raise InvalidInput(
            "object key must be '/'-separated segments of [A-Za-z0-9._-], none empty or starting with '.'",
            reason="INVALID_OBJECT_KEY",
        )
    return key


def validate_expected(*, sha256: str, size: int) -> None:
    """Reject a malformed expected digest or size before any I/O."""
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise InvalidInput("expected sha256 must be 64 lowercase hex digits", reason="INVALID_SHA256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput("expected size must be a non-negative integer", reason="INVALID_SIZE")


def read_verified(stream: BinaryIO, *, sha256: str, size: int, what: str, out: BinaryIO | None = None) -> None:
    """Hash ``stream`` to its end (copying it to ``out``) and raise IntegrityError naming which of
    size or SHA-256 of ``what`` does not match; an oversized stream is not read past ``size``."""
    try:
        actual = hash_stream(stream, limit=size, out=out)
    except SizeLimitExceeded:
        _raise_size_mismatch(what)
    check_content(actual_sha256=actual.sha256, actual_size=actual.size, sha256=sha256, size=size, what=what)


def validate_range(*, offset: int, length: int, sha256: str) -> None:
    """Reject a malformed range or digest before any I/O."""
    validate_expected(sha256=sha256, size=length)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInput("a range's offset must be a non-negative integer", reason="INVALID_RANGE")


def check_range(data: bytes, *, key: str, length: int, sha256: str) -> None:
    """IntegrityError (logged with the key) unless ``data`` is ``length`` bytes hashing to ``sha256``."""
    try:
        check_content(actual_sha256=hashlib.sha256(data).hexdigest(), actual_size=len(data), sha256=sha256,
                      size=length, what="stored object's range")  # fmt: skip
    except IntegrityError as exc:
        logger.error("stored object failed verification", extra={"object_id": key, "reason": exc.reason})
        raise


def check_content(*, actual_sha256: str, actual_size: int, sha256: str, size: int, what: str) -> None:
    """Raise IntegrityError naming which of size or SHA-256 of ``what`` does not match."""
    if actual_size != size:
        raise IntegrityError(f"{what} size does not match the expected size", reason="SIZE_MISMATCH")
    if actual_sha256 != sha256:
        raise IntegrityError(f"{what} SHA-256 does not match the expected digest")


def storage_error_from_os(exc: OSError, *, action: str) -> StorageError | ResourceExhausted:
    """Our error for an OSError during ``action``: ResourceExhausted when the disk is full."""
    name = errno.errorcode.get(exc.errno or 0, "unknown error")
    if exc.errno in _FULL_ERRNOS:
        return ResourceExhausted(
            f"object store is out of space while trying to {action} ({name})", reason="STORAGE_FULL"
        )
    return StorageError(f"object store failed to {action} ({name})", reason="STORAGE_IO_ERROR")


# --- the local store --------------------------------------------------------------------------


class LocalObjectStore:
    """Objects as files under ``root``; implements :class:`teleread.storage.ObjectStore`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._temp_dir = self.root / _TEMP_DIR_NAME
        try:
            make_private_dirs(self._temp_dir)
            for directory in (self.root, self._temp_dir):
                _owner_only(directory)
        except OSError as exc:
            raise storage_error_from_os(exc, action="create its root directory") from None

    def __repr__(self) -> str:
        return f"LocalObjectStore(root={str(self.root)!r})"

    # -- writes ---------------------------------------------------------------------------------

    def put_file(self, key: str, path: Path, *, sha256: str, size: int, consume: bool = False) -> None:
        """Copy ``path`` in under ``key`` atomically, verified against ``sha256`` and ``size``.

        With ``consume`` the caller gives the file up: on the same filesystem it is verified in
        place, fsynced and renamed into the store instead of copied."""
        validate_expected(sha256=sha256, size=size)
        target = self._path_for(key)
        if self._holds_verified(target, key=key, sha256=sha256, size=size):
            _verify_source(path, sha256=sha256, size=size)  # a bad re-put still fails loudly
            logger.debug("object already stored", extra={"object_id": key})
            return
        if consume and self._move_verified(path, target, sha256=sha256, size=size):
            logger.info("object stored", extra={"object_id": key, "bytes": size})
            return
        try:
            self._make_dirs(target.parent)
            with atomic_file(target, mode=0o600, temp_dir=self._temp_dir) as out:
                self._copy_verified(path, out, sha256=sha256, size=size)
        except OSError as exc:
            raise storage_error_from_os(exc, action="store an object") from None
        logger.info("object stored", extra={"object_id": key, "bytes": size})

    def _move_verified(self, source: Path, target: Path, *, sha256: str, size: int) -> bool:
        """Verify ``source`` in place and rename it to ``target``; False when a rename cannot work
        (another filesystem), in which case the caller copies."""
        try:
            if os.stat(source).st_dev != os.stat(self._temp_dir).st_dev:
                return False
            with open(source, "rb") as fh:
                read_verified(fh, sha256=sha256, size=size, what="file to store")
                os.fchmod(fh.fileno(), 0o600)  # as a copy through mkstemp would be
                os.fsync(fh.fileno())
            self._make_dirs(target.parent)
            replace_durably(source, target)
        except OSError as exc:
            raise storage_error_from_os(exc, action="store an object") from None
        return True

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; an absent object is fine."""
        target = self._path_for(key)
        try:
            target.unlink()
            fsync_dir(target.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise storage_error_from_os(exc, action="delete an object") from None
        logger.info("object deleted", extra={"object_id": key})

    def sweep_temp_files(self, *, older_than_seconds: float = 3600.0) -> int:
        """Remove writes left behind by a crashed process; returns how many were removed."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        try:
            for entry in os.scandir(self._temp_dir):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        except OSError as exc:
            raise storage_error_from_os(exc, action="sweep temporary files") from None
        if removed:
            logger.info("stale temporary files removed", extra={"count": removed})
        return removed

    # -- reads ----------------------------------------------------------------------------------

    def iter_keys(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """Every stored key starting with ``prefix`` and its file's modification time (UTC); the
        ``.tmp`` area and anything that is not a plain file (symlinks) are not listed."""
        if prefix:
            validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
        base = self.root.joinpath(*prefix.split("/")[:-1])
        if not Path(os.path.realpath(base)).is_relative_to(self.root):
            raise InvalidInput("object key prefix resolves outside the object store root", reason="INVALID_OBJECT_KEY")
        try:
            yield from self._walk(base, prefix)
        except OSError as exc:
            raise storage_error_from_os(exc, action="list objects") from None

    def _walk(self, directory: Path, prefix: str) -> Iterator[tuple[str, datetime]]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:  # nothing stored there (yet), or deleted meanwhile
            return
        for entry in entries:
            if entry.name.startswith("."):  # the store's own .tmp; never a key segment
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(path, prefix)
            elif entry.is_file(follow_symlinks=False):
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # deleted while listing
                    continue
                yield key, datetime.fromtimestamp(mtime, tz=timezone.utc)

    def exists(self, key: str) -> bool:
        try:
            return self._path_for(key).is_file()
        except OSError as exc:
            raise storage_error_from_os(exc, action="look up an object") from None

    def size(self, key: str) -> int:
        """Stored size in bytes; ObjectNotFound if absent."""
        try:
            return self._path_for(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound("object not found in the object store") from None
        except OSError as exc:
            raise storage_error_from_os(exc, action="look up an object") from None

    @contextmanager
    def open_verified(self, key: str, *, sha256: str, size: int) -> Iterator[BinaryIO]:
        """Yield the stored file, opened and positioned at 0, only after its bytes were hashed
        through the same handle and matched ``sha256`` and ``size`` (IntegrityError otherwise)."""
        validate_expected(sha256=sha256, size=size)
        handle = self._open_and_verify(key, sha256=sha256, size=size)
        with handle:
            yield handle

    def read_range(self, key: str, *, offset: int, length: int, sha256: str) -> bytes:
        validate_key(key)
        validate_range(offset=offset, length=length, sha256=sha256)
        try:
            with open(self._path_for(key), "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except FileNotFoundError:
            raise ObjectNotFound("object not found in the object store") from None
        except OSError as exc:
            raise storage_error_from_os(exc, action="read an object") from None
        check_range(data, key=key, length=length, sha256=sha256)
        return data

    def check(self) -> None:
        """Raise StorageError (or ResourceExhausted) unless a file can be created under root."""
        try:
            with tempfile.TemporaryFile(dir=self._temp_dir, prefix="check-"):
                pass
        except OSError as exc:
            raise storage_error_from_os(exc, action="write its root directory") from None

    # -- internals ------------------------------------------------------------------------------

    def _path_for(self, key: str) -> Path:
        """The file for ``key``; refuses anything that would resolve outside root (symlinks)."""
        candidate = self.root / validate_key(key)
        resolved = Path(os.path.realpath(candidate))
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise InvalidInput("object key resolves outside the object store root", reason="INVALID_OBJECT_KEY")
        return candidate

    def _open_and_verify(self, key: str, *, sha256: str, size: int) -> BinaryIO:
        target = self._path_for(key)
        try:
            handle = open(target, "rb")
        except FileNotFoundError:
            raise ObjectNotFound("object not found in the object store") from None
        except OSError as exc:
            raise storage_error_from_os(exc, action="open an object") from None
        try:
            read_verified(handle, sha256=sha256, size=size, what="stored object")
            handle.seek(0)
        except IntegrityError as exc:
            handle.close()
            logger.error(
                "stored object failed verification",
                extra={"object_id": key, "reason": exc.reason},
            )
            raise
        except OSError as exc:
            handle.close()
            raise storage_error_from_os(exc, action="read an object") from None
        return handle

    def _holds_verified(self, target: Path, *, key: str, sha256: str, size: int) -> bool:
        """True when ``target`` already holds exactly the expected bytes. A stored file that fails
        verification is reported and then replaced by the caller (re-put heals corruption)."""
        try:
            with open(target, "rb") as stored:
                actual = hash_stream(stored, limit=size)
        except FileNotFoundError:
            return False
        except SizeLimitExceeded:
            actual = None  # longer than expected: replaced
        except OSError as exc:
            raise storage_error_from_os(exc, action="read an object") from None
        if actual == (sha256, size):
            return True
        logger.warning(
            "stored object failed verification; replacing it",
            extra={"object_id": key, "reason": "CHECKSUM_MISMATCH"},
        )
        return False

    @staticmethod
    def _copy_verified(source: Path, out: BinaryIO, *, sha256: str, size: int) -> None:
        """Copy ``source`` into ``out`` while hashing and check it (the caller syncs ``out``)."""
        with open(source, "rb") as src:
            if os.fstat(src.fileno()).st_size != size:
                _raise_size_mismatch("file to store")
            read_verified(src, sha256=sha256, size=size, what="file to store", out=out)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` (inside root) and fsync each parent that gained an entry."""
        missing: list[Path] = []
        current = directory
        while current != self.root and not current.is_dir():
            missing.append(current)
            current = current.parent
        for new_dir in reversed(missing):
            with suppress(FileExistsError):
                new_dir.mkdir(mode=PRIVATE_DIR_MODE)
            fsync_dir(new_dir.parent)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parent with mode 0700 (``Path.mkdir(parents=True)``
    gives the parents the default mode)."""
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new_dir in reversed(missing):
        with suppress(FileExistsError):
            new_dir.mkdir(mode=PRIVATE_DIR_MODE)


def _owner_only(directory: Path) -> None:
    """Take group and other access away from one of the store's own folders (made by an older
    version, or by hand); a folder of another owner is left as it is, with a warning."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        try:
            os.chmod(directory, mode & PRIVATE_DIR_MODE)
        except PermissionError:
            logger.warning("object store folder is readable by others and not ours to change")


def _verify_source(path: Path, *, sha256: str, size: int) -> None:
    try:
        actual_sha256, actual_size = hash_file(path)
    except OSError as exc:
        raise storage_error_from_os(exc, action="read the file to store") from None
    check_content(
        actual_sha256=actual_sha256,
        actual_size=actual_size,
        sha256=sha256,
        size=size,
        what="file to store",
    )


def _raise_size_mismatch(what: str) -> NoReturn:
    raise IntegrityError(f"{what} size does not match the expected size", reason="SIZE_MISMATCH")
