"""The hub's staging area: one append-only file per upload while its bytes arrive.

The file's size on disk is the offset the hub confirms, so a cut stream resumes exactly where the
hub wrote. Which stream may write an upload is a lease in the database (``IngestService``), so a
resumed stream never races the handler of the cut one, on this hub or another one sharing the
staging volume. The SHA-256 is kept running while streams continue where they stopped (recomputed
from the file only when that chain broke: after a hub restart, or on another hub). The folder is
0700 and its files 0600: staged bytes are readable by the hub's own user only.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from teleread.errors import InvalidInput, ResourceExhausted
from teleread.files import Hasher, hash_file
from teleread.storage.local import PRIVATE_DIR_MODE, make_private_dirs

MAX_CHUNK = 1024 * 1024
PART_SUFFIX = ".part"
PART_FILE_MODE = 0o600


class Staging:
    def __init__(self, root: Path) -> None:
        self.root = root
        make_private_dirs(self.root)
        if stat.S_IMODE(self.root.stat().st_mode) & 0o077:  # made by an older hub, or by hand
            os.chmod(self.root, PRIVATE_DIR_MODE)
        self._guard = threading.Lock()
        self._hashes: dict[str, tuple[int, Any]] = {}

    def path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}{PART_SUFFIX}"

    def confirmed(self, upload_id: str) -> int:
        part = self.path(upload_id)
        return part.stat().st_size if part.exists() else 0

    def open_part(self, part: Path) -> BinaryIO:
        """The staging file, opened for appending without buffering. (A seam: tests replace it to
        simulate a full disk.)"""
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PART_FILE_MODE)
        return os.fdopen(fd, "ab", buffering=0)

    def append(
        self,
        upload_id: str,
        chunks: Iterable[bytes],
        *,
        start: int,
        size: int,
        keepalive: Callable[[], None] = lambda: None,
    ) -> int:
        """Write ``chunks`` from ``start``; returns the new confirmed offset. ``keepalive`` is
        called after each chunk (the writer's lease is renewed there)."""
        position = start
        hasher = self._running_hash(upload_id, start)
        try:
            try:
                fh = self.open_part(self.path(upload_id))
            except OSError as exc:
                raise self._disk_refused(upload_id) from exc
            with fh:
                for data in chunks:  # what the stream raises (a cut link) passes through as it is
                    if len(data) > MAX_CHUNK:
                        raise InvalidInput("chunk larger than 1 MiB", reason="CHUNK_TOO_LARGE")
                    if position + len(data) > size:
                        raise InvalidInput("more bytes than the announced size", reason="SIZE_EXCEEDED")
                    try:
                        fh.write(data)
                    except OSError as exc:
                        raise self._disk_refused(upload_id) from exc
                    position += len(data)
                    if hasher is not None:
                        hasher.update(data)
                    keepalive()
        finally:
            with self._guard:
                if hasher is not None and upload_id in self._hashes:
                    self._hashes[upload_id] = (position, hasher)
        return position

    def _disk_refused(self, upload_id: str) -> ResourceExhausted:
        with self._guard:
            self._hashes.pop(upload_id, None)  # what reached the disk is unknown: rehash at the end
        return ResourceExhausted("hub staging disk cannot take the upload", reason="STAGING_FULL")

    def _running_hash(self, upload_id: str, start: int) -> Any:
        with self._guard:
            held = self._hashes.get(upload_id)
            if start == 0:
                held = (0, Hasher())
            elif held is None or held[0] != start:
                self._hashes.pop(upload_id, None)
                return None
            self._hashes[upload_id] = held
            return held[1]

    def digest(self, upload_id: str, *, size: int) -> str:
        """SHA-256 of the complete staged file."""
        with self._guard:
            held = self._hashes.pop(upload_id, None)
        if held is not None and held[0] == size:
            return str(held[1].hexdigest())
        return hash_file(self.path(upload_id)).sha256

    def discard(self, upload_id: str) -> None:
        """Drop the staged bytes (refused content; the client starts again from zero)."""
        self.path(upload_id).unlink(missing_ok=True)
        with self._guard:
            self._hashes.pop(upload_id, None)

    def finished(self, upload_id: str) -> None:
        """The upload is stored: forget its file (later streams see its state)."""
        self.path(upload_id).unlink(missing_ok=True)
        with self._guard:
            self._hashes.pop(upload_id, None)
