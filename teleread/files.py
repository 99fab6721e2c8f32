"""File plumbing every part of teleread shares: streaming SHA-256 and durable, atomic replacement.

Hashing. :func:`hash_stream` and :func:`hash_file` read in 1 MiB blocks (never a file whole) and
return a :class:`Digest` (hex SHA-256 and byte count); with ``limit`` they stop with
:class:`SizeLimitExceeded` before taking a block past it, and with ``out`` they copy what they hash.
:class:`Hasher` is the incremental form (a running digest that counts its bytes, resumable: pass
it back in as ``hasher``); :class:`HashingWriter` and :class:`HashingReader` wrap a binary file so
that whatever is written to it, or read from it by someone else (an SDK reading an upload), is
hashed on the way. :func:`sha256_hex` is the one-shot digest of a small value (a key, a name).

Writing. :func:`atomic_file` yields a temporary file in the target's folder (or in ``temp_dir``,
which must be on the same filesystem); when the block ends without an error the file is flushed,
given its ``mode``, fsync'd, renamed over the target and the folder fsync'd, so a reader or a crash
sees the old file whole or the new one whole, never a part, and a rename that returned survives a
power cut. An error (or a crash) leaves the old file untouched and the temporary file removed (a
crash leaves it behind, named ``.<name>.<random>.tmp``). :func:`atomic_write_bytes` and
:func:`atomic_write_text` are the one-call forms; :func:`replace_durably` renames an already
durable file into place; :func:`fsync_dir` makes a rename, link or unlink in a folder durable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

from teleread.errors import InvalidInput

BLOCK_SIZE = 1024 * 1024
"""Bytes read per call when hashing or copying."""

Buffer = bytes | bytearray | memoryview


class SizeLimitExceeded(InvalidInput):
    """A stream held more bytes than the caller allows; reading stopped before the block past it."""

    default_reason = "SIZE_LIMIT_EXCEEDED"

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes", metadata={"limit": str(limit)})
        self.limit = limit

    def __reduce__(self) -> tuple[type[SizeLimitExceeded], tuple[int]]:
        return (type(self), (self.limit,))


class Digest(NamedTuple):
    """The SHA-256 (lowercase hex) and size in bytes of some content."""

    sha256: str
    size: int


def sha256_hex(data: bytes | str) -> str:
    """The SHA-256 of a small value in memory (a string is taken as UTF-8)."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


class Hasher:
    """A running SHA-256 that counts the bytes it has seen."""

    __slots__ = ("_sha", "size")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, data: Buffer) -> None:
        self._sha.update(data)
        self.size += memoryview(data).nbytes

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def digest(self) -> Digest:
        return Digest(self._sha.hexdigest(), self.size)


def _write_all(out: BinaryIO, data: Buffer) -> None:
    """Write every byte of ``data`` (an unbuffered file may take fewer than asked)."""
    view = memoryview(data)
    written = out.write(view)
    if written is None:  # a buffered or non-raw writer takes it all or raises
        return
    while written < view.nbytes:
        written += out.write(view[written:]) or 0


def hash_stream(
    stream: BinaryIO,
    *,
    limit: int | None = None,
    out: BinaryIO | None = None,
    hasher: Hasher | None = None,
    block_size: int = BLOCK_SIZE,
) -> Digest:
    """Read ``stream`` to its end in ``block_size`` blocks and return the digest of what was read
    (continuing ``hasher`` when given: its bytes count towards ``limit`` too). ``out`` receives a
    copy of every block. More than ``limit`` bytes raise :class:`SizeLimitExceeded` before the block
    that crosses it is hashed or copied."""
    running = hasher if hasher is not None else Hasher()
    while block := stream.read(block_size):
        if limit is not None and running.size + len(block) > limit:
            raise SizeLimitExceeded(limit)
        running.update(block)
        if out is not None:
            _write_all(out, block)
    return running.digest()


def hash_file(path: Path | str, *, limit: int | None = None) -> Digest:
    """The digest of the file at ``path``, read in 1 MiB blocks (see :func:`hash_stream`)."""
    with open(path, "rb") as stream:
        return hash_stream(stream, limit=limit)


class HashingWriter:
    """A binary file whose writes are hashed (and counted) as they go through; with ``limit`` a
    write that would take it past that many bytes raises :class:`SizeLimitExceeded`, unwritten."""

    def __init__(self, raw: BinaryIO, *, limit: int | None = None) -> None:
        self.raw = raw
        self.limit = limit
        self.hasher = Hasher()

    def write(self, data: Buffer) -> int:
        n = memoryview(data).nbytes
        if self.limit is not None and self.hasher.size + n > self.limit:
            raise SizeLimitExceeded(self.limit)
        _write_all(self.raw, data)
        self.hasher.update(data)
        return n

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def size(self) -> int:
        return self.hasher.size

    def digest(self) -> Digest:
        return self.hasher.digest()


class HashingReader:
    """A binary file whose reads are hashed (and counted) as a consumer takes them; with ``limit``
    a read that brings the count past it raises :class:`SizeLimitExceeded`."""

    def __init__(self, raw: BinaryIO, *, limit: int | None = None) -> None:
        self.raw = raw
        self.limit = limit
        self.hasher = Hasher()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if self.limit is not None and self.hasher.size + len(data) > self.limit:
            raise SizeLimitExceeded(self.limit)
        self.hasher.update(data)
        return data

    @property
    def size(self) -> int:
        return self.hasher.size

    def digest(self) -> Digest:
        return self.hasher.digest()


def fsync_dir(directory: Path | str) -> None:
    """Make a rename, link or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path | str, target: Path | str) -> None:
    """Rename ``source`` (already written and fsync'd) over ``target`` and fsync the folder."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


@contextmanager
def atomic_file(path: Path | str, *, mode: int = 0o644, temp_dir: Path | str | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` with ``mode`` when the block ends without an error
    (flushed, fsync'd, renamed, folder fsync'd); on an error ``path`` is untouched and the
    temporary file is removed. ``temp_dir`` (default: the target's folder, created if missing)
    must be on the target's filesystem."""
    target = Path(path)
    if temp_dir is None:
        target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=temp_dir or target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        replace_durably(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a reader or a crash never sees half a file."""
    with atomic_file(path, mode=mode) as stream:
        stream.write(data)


def atomic_write_text(path: Path | str, text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so a reader or a crash never sees half a file."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)
