"""The outbox's files on disk, and nothing else: no rows, no exams, no clock (times are arguments).

Layout under the outbox's root (folders 0700, files 0600: patient data, the gateway's user only):

- ``incoming/``: files being written (``<uuid>.part``, by :meth:`FileStore.write_incoming`) or
  spooled by the DICOM receiver. Nothing there was acknowledged: an outbox that owns its folder
  (``maintenance``) empties it at open.
- ``objects/<sha256>``: every object, content-addressed. A name appears only as a hard link from a
  durable file in ``incoming/`` followed by an fsync of ``objects/`` (:meth:`FileStore.link`), so
  its bytes are on disk before its name is. The file store never decides on its own to delete one:
  the outbox removes an object file only inside a ledger write transaction (a refused placement,
  ``prune``) or in recovery and ``sweep``, which look at what no row names.
- ``set-aside/``: files a person must look at, each beside ``<name>.reason.txt`` (the reason code on
  the first line, then our message, then who set it aside and when); :meth:`FileStore.set_aside`
  moves an unplaceable file there, :meth:`FileStore.set_aside_link` links a refused object there so
  pruning its exam keeps it.
- ``reserve``: 512 KiB of zeros kept back so the database can open on a full disk (SQLite needs room
  for its WAL and shared-memory files). :meth:`FileStore.release_reserve` frees it for that open,
  :meth:`FileStore.keep_reserve` puts it back (atomically) once there is room.

A full disk (``ENOSPC``, ``EDQUOT``) while writing is :class:`~teleread.errors.ResourceExhausted`
``GATEWAY_DISK_FULL`` and leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from teleread.errors import InvalidInput, ResourceExhausted
from teleread.files import (
    Digest,
    Hasher,
    SizeLimitExceeded,
    atomic_write_bytes,
    fsync_dir,
    hash_stream,
)

log = logging.getLogger("teleread.gateway.clinic.outbox")

SET_ASIDE_DIR = "set-aside"  # files recovery could not place, each beside <name>.reason.txt, for a person
REASON_SUFFIX = ".reason.txt"
RESERVE_NAME = "reserve"  # space kept back so the database opens on a full disk
RESERVE_BYTES = 512 * 1024
MAX_OBJECT_BYTES = 4 * 1024**3
DICOM_HEAD = 132  # preamble and "DICM"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full() -> ResourceExhausted:
    return ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL")


@contextlib.contextmanager
def typed_disk_full() -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) as :class:`ResourceExhausted`; other OS errors as they are."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise disk_full() from None
        raise


def too_large() -> InvalidInput:
    return InvalidInput("object larger than the gateway accepts", reason="OBJECT_TOO_LARGE")


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """Writing or finishing the arriving file ``path``: on any error it is removed, a full disk
    raised as by :func:`typed_disk_full` and more bytes than the limit as :func:`too_large`."""
    try:
        with typed_disk_full():
            yield
    except SizeLimitExceeded:
        path.unlink(missing_ok=True)
        raise too_large() from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class FileStore:
    """The outbox's folders under ``root`` (see the module's text)."""

    def __init__(self, root: Path, *, maintenance: bool = True) -> None:
        """``maintenance=False``: another process of the gateway owns the folders (a receiver
        process), so ``incoming/`` is not emptied."""
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.incoming_dir = self.root / "incoming"
        self.set_aside_dir = self.root / SET_ASIDE_DIR
        self.reserve = self.root / RESERVE_NAME
        for d in (self.root, self.objects_dir, self.incoming_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            d.chmod(0o700)  # patient data: the gateway's own user only
        if maintenance:
            for leftover in self.incoming_dir.iterdir():  # half-received files of a crash
                leftover.unlink(missing_ok=True)
            for leftover in self.root.glob(f".{RESERVE_NAME}.*.tmp"):  # a reserve write a crash cut
                leftover.unlink(missing_ok=True)

    def path_of(self, sha256: str) -> Path:
        return self.objects_dir / sha256

    # ------------------------------------------------------------------ arriving files

    def write_incoming(self, source: BinaryIO, *, max_bytes: int = MAX_OBJECT_BYTES) -> tuple[Path, Digest]:
        """Stream ``source`` to a new file in ``incoming/``, hashing it on the way, and fsync it;
        return the file and its digest. On any error the partial file is removed."""
        tmp = self.incoming_dir / f"{uuid.uuid4().hex}.part"
        with _removed_on_failure(tmp):
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                digest = hash_stream(source, limit=max_bytes, out=out)
                out.flush()
                os.fsync(out.fileno())
        return tmp, digest

    def check_incoming(self, path: Path) -> None:
        if path.parent.resolve() != self.incoming_dir.resolve():
            raise ValueError(f"adopt() takes files under {self.incoming_dir}, not {path.parent}")

    def finish_spooled(
        self, path: Path, *, digest: tuple[str, int] | None, max_bytes: int = MAX_OBJECT_BYTES
    ) -> Digest:
        """Make a file written into ``incoming/`` by someone else durable: hash it unless its writer
        did (``digest``), check its size and fsync it. On any error the file is removed."""
        with _removed_on_failure(path), open(path, "rb") as f:
            if digest is None:
                digest = hash_stream(f, limit=max_bytes)
            if digest[1] > max_bytes:
                raise too_large()
            os.fsync(f.fileno())
        return Digest(*digest)

    # ------------------------------------------------------------------ objects

    def link(self, tmp: Path, sha256: str) -> Path:
        """Hard-link a durable file of ``incoming/`` to ``objects/<sha256>`` (already there: the
        same bytes) and fsync the folder, also when the name existed: its writer may not have
        synced yet. Return the object's path."""
        final = self.path_of(sha256)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, final)
        fsync_dir(self.objects_dir)
        return final

    def relink(self, tmp: Path, final: Path) -> None:
        """Link ``tmp`` to ``final`` again if it went meanwhile (pruned: the same bytes of an exam
        sent long ago); the caller holds the ledger's write transaction, as ``prune`` does."""
        if not final.exists():
            os.link(tmp, final)
            fsync_dir(self.objects_dir)

    def remove(self, sha256: str) -> bool:
        """Delete ``objects/<sha256>``; True when there was one."""
        path = self.path_of(sha256)
        if not path.exists():
            return False
        path.unlink()
        return True

    def unreferenced(self, known: set[str]) -> Iterator[Path]:
        """The object files whose name is not in ``known``, in name order."""
        for path in sorted(self.objects_dir.iterdir()):
            if path.name not in known and path.is_file():
                yield path

    def sweep(self, known: set[str]) -> int:
        """Delete every entry of ``objects/`` whose name is not in ``known``; return how many."""
        removed = 0
        for f in self.objects_dir.iterdir():
            if f.name not in known:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    @staticmethod
    def read_object(path: Path) -> tuple[Digest, bytes]:
        """The digest of a stored file and its first bytes (a DICOM file's preamble and magic)."""
        hasher = Hasher()
        with open(path, "rb") as f:
            head = f.read(DICOM_HEAD)
            hasher.update(head)
            return hash_stream(f, hasher=hasher), head

    # ------------------------------------------------------------------ set aside for a person

    def set_aside(self, path: Path, reason: str, message: str, *, at: str) -> Path:
        """Move a file the outbox cannot place into ``set-aside/`` beside its reason file; return
        where it is (``path`` itself when it could not be moved: the next start looks again)."""
        self.set_aside_dir.mkdir(mode=0o700, exist_ok=True)
        target = self.set_aside_dir / path.name
        text = f"{reason}\n{message}\nset aside by the gateway's outbox at {at}\n"
        try:
            os.replace(path, target)
            target.with_name(target.name + REASON_SUFFIX).write_text(text, encoding="utf-8")
        except OSError as exc:  # the file stays unreferenced; the next start looks at it again
            log.error("file not set aside", extra={"reason": type(exc).__name__})
            return path
        log.warning("outbox file set aside", extra={"reason": reason, "event": "set_aside"})
        return target

    def set_aside_link(self, sha256: str, suffix: str, reason: str, message: str, *, at: str) -> None:
        """Keep a copy of ``objects/<sha256>`` (a hard link) in ``set-aside/`` as
        ``<sha256><suffix>`` with its reason file; a failure is logged, never raised."""
        target = self.set_aside_dir / f"{sha256}{suffix}"
        try:
            self.set_aside_dir.mkdir(mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.link(self.path_of(sha256), target)
            target.with_name(target.name + REASON_SUFFIX).write_text(
                f"{reason}\n{message}\nset aside by the gateway at {at}\n", encoding="utf-8"
            )
        except OSError as exc:
            log.error("refused file not set aside", extra={"reason": type(exc).__name__})

    def set_aside_count(self) -> int:
        """Files waiting in ``set-aside/`` (their reason files not counted)."""
        if not self.set_aside_dir.is_dir():
            return 0
        return sum(1 for p in self.set_aside_dir.iterdir() if p.is_file() and not p.name.endswith(REASON_SUFFIX))

    # ------------------------------------------------------------------ the reserve

    def keep_reserve(self) -> bool:
        """Make sure the reserve file exists (written atomically); True when it does. Cheap when it
        does: one stat. On a full disk it is False, and tried again on the next call."""
        if self.reserve.exists():
            return True
        try:
            atomic_write_bytes(self.reserve, bytes(RESERVE_BYTES), mode=0o600)
        except OSError:  # still full: tried again later
            return False
        return True

    def release_reserve(self) -> bool:
        """Free the reserve's space (for the database to open on a full disk); False when there
        was no reserve to free."""
        if not self.reserve.exists():
            return False
        self.reserve.unlink()
        return True
