"""The clinic gateway's durable outbox: every received object is on disk and recorded before the
sender hears success, and survives a crash, a reboot or a full disk without corruption.

This module is the outbox's one entry point (:class:`Outbox` and the names other modules import);
it composes three parts with narrow contracts:

- :mod:`~teleread.gateway.clinic.outbox_files` (``FileStore``): the folders under ``root``
  (``incoming/``, content-addressed ``objects/<sha256>`` reached only by hard link and directory
  fsync, ``set-aside/`` with reason files, the 512 KiB ``reserve``). No rows, no clock.
- :mod:`~teleread.gateway.clinic.outbox_ledger` (``Ledger``): ``outbox.db`` (SQLite, WAL,
  ``synchronous=FULL``), its schema and ``user_version`` migrations, the rows and the queries. No
  files, no clock.
- :mod:`~teleread.gateway.clinic.outbox_schedule` (``Scheduler``): readiness, priority order, attempts and
  next-try times with the shared :class:`~teleread.backoff.Backoff`, and the upload lease, on the
  clock given to the outbox.

The outbox itself owns the steps that need two of them: placing an object (file durable in
``incoming/``, linked into ``objects/`` and the folder synced outside the lock, then the check that
the file is still there and the row in one SQLite write transaction, so ``prune`` in this or
another receiver process cannot remove it in between), pruning (files deleted only inside a write
transaction), start-up recovery (rows a power cut took back rebuilt from the files; what cannot be
placed is set aside, never a reason to stop) and the full disk (``GATEWAY_DISK_FULL``, nothing
half-stored; the reserve released so the database opens, and put back once there is room).

Exams are assembled by a grouping key (the StudyInstanceUID for DICOM; the record for WFDB) and
become ``ready`` when the sender says the study is complete or after a quiet period with no new
object (study stability, as in PACS). Once an exam is being uploaded its set of objects is fixed: an
instance of the same study that arrives later opens a follow-up exam of that study
(``follow_up_of``), uploaded on its own, while an instance already received (a retry, or the whole
study sent again) is acknowledged and not sent twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import random
import sqlite3
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from teleread.backoff import WAITING, Backoff
from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.gateway.clinic.outbox_files import (
    MAX_OBJECT_BYTES,
    REASON_SUFFIX,
    RESERVE_BYTES,
    RESERVE_NAME,
    SET_ASIDE_DIR,
    FileStore,
    typed_disk_full,
)
from teleread.gateway.clinic.outbox_ledger import (
    DB_NAME,
    OPEN_STATES,
    PRIORITY_RANK,
    SCHEMA_VERSION,
    STATES,
    Identity,
    Ledger,
    OutboxExam,
    OutboxObject,
    OutboxStatus,
    Refused,
    iso,
    typed_db_full,
)
from teleread.gateway.clinic.outbox_schedule import Clock, Scheduler, SystemClock
from teleread.gateway.validate import LOSSLESS_RESEND, LOSSY_RESEND

__all__ = [
    "OPEN_STATES",
    "PRIORITY_RANK",
    "REASON_SUFFIX",
    "REFUSALS_SHOWN_HOURS",
    "RESERVE_BYTES",
    "RESERVE_NAME",
    "SCHEMA_VERSION",
    "SET_ASIDE_DIR",
    "STATES",
    "Backoff",
    "Identity",
    "Outbox",
    "OutboxExam",
    "OutboxObject",
    "OutboxStatus",
    "Refused",
    "disk_full_is_typed",
]

log = logging.getLogger("teleread.gateway.clinic.outbox")

REFUSALS_SHOWN_HOURS = 24  # status shows the receiver's refusals of this many hours


@contextlib.contextmanager
def disk_full_is_typed() -> Iterator[None]:
    """A full disk, seen by the file system (ENOSPC) or by SQLite (SQLITE_FULL), as
    :class:`ResourceExhausted` ``GATEWAY_DISK_FULL``."""
    with typed_disk_full(), typed_db_full():
        yield


class Outbox:
    def __init__(
        self,
        root: Path,
        *,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        maintenance: bool = True,
        resend_kind: Callable[[Path, Path], str] | None = None,
    ) -> None:
        """``backoff``: the schedule of an exam's retries (default: 2 s doubling to 300 s, full
        jitter). ``clock`` (``now()``: the current UTC time, as :mod:`teleread.clock`'s clocks):
        every time the outbox records or compares (a ``now`` argument of a method overrides it
        once). ``maintenance=False`` opens an outbox that another process of the same gateway owns
        (a receiver process): no clean-up of ``incoming/`` and no recovery of interrupted uploads.
        ``resend_kind(first, second)`` tells an instance sent again in another encoding from a
        different one under the same key (``validate.resend_kind``); without it other bytes are a
        conflict."""
        self.resend_kind = resend_kind
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.backoff = backoff if backoff is not None else Backoff(WAITING)
        self.files = FileStore(root, maintenance=maintenance)
        self.root, self.objects_dir, self.incoming_dir = (
            self.files.root,
            self.files.objects_dir,
            self.files.incoming_dir,
        )
        self.set_aside_dir, self.reserve = self.files.set_aside_dir, self.files.reserve
        try:
            self.ledger = Ledger(self.root / DB_NAME, path_of=self.files.path_of)
        except sqlite3.OperationalError:
            # a full disk: the database needs a little room to open (its WAL and shared-memory files);
            # the reserve gives it back, and is put back once there is room again
            if not self.files.release_reserve():
                raise
            log.warning("outbox opened on a full disk: reserve released", extra={"reason": "GATEWAY_DISK_FULL"})
            self.ledger = Ledger(self.root / DB_NAME, path_of=self.files.path_of)
        self.schedule = Scheduler(self.ledger, self.backoff, self.clock)
        if maintenance:
            self.keep_reserve()
        # an upload interrupted by a crash is simply ready again (the hub resumes by offset); on a
        # full disk that waits for room (recover_pending), and the gateway starts anyway
        self._recovery_pending = maintenance
        if maintenance:
            self.recover_pending()

    @property
    def _db(self) -> sqlite3.Connection:
        """The ledger's connection (for tests that look at rows directly)."""
        return self.ledger.db

    @property
    def _lock(self) -> threading.Lock:
        return self.ledger.lock

    def _at(self, now: dt.datetime | None = None) -> str:
        return iso(now if now is not None else self.clock.now())

    def keep_reserve(self) -> bool:
        """Make sure the reserve file (room for the database to open on a full disk) exists; True
        when it does. Cheap when it does: one stat."""
        return self.files.keep_reserve()

    def close(self) -> None:
        self.ledger.close()

    # ------------------------------------------------------------------ receiving

    def receive(
        self,
        source: BinaryIO,
        *,
        group_key: str,
        instance_key: str,
        role: str = "dicom",
        kind: str = "image",
        priority: str = "routine",
        indication: str = "",
        max_bytes: int = MAX_OBJECT_BYTES,
    ) -> OutboxObject:
        """Stream ``source`` to disk, fsync it, then record it; return only when it is durable."""
        _check_fields(group_key, instance_key, priority)
        tmp, digest = self.files.write_incoming(source, max_bytes=max_bytes)
        return self._place(
            tmp, digest.sha256, digest.size, group_key=group_key, instance_key=instance_key, role=role, kind=kind,
            priority=priority, indication=indication,
        )  # fmt: skip

    def adopt(
        self,
        spooled: Path,
        *,
        group_key: str,
        instance_key: str,
        role: str = "dicom",
        kind: str = "image",
        priority: str = "routine",
        indication: str = "",
        max_bytes: int = MAX_OBJECT_BYTES,
        digest: tuple[str, int] | None = None,
        rebuildable: bool = False,
    ) -> OutboxObject:
        """Like :meth:`receive` for a file already written under ``incoming/`` (the DICOM receiver
        spools there): fsync it and link it into place instead of copying it. ``digest`` is its
        SHA-256 and size when the writer hashed it on the way (else it is read to hash it).
        ``rebuildable``: the file itself names its exam (a DICOM instance), so its row is committed
        without waiting for the disk; after a power cut :meth:`adopt_orphans` records it again from
        the file. The spooled file is the outbox's from then on: it is removed whatever the outcome."""
        spooled = Path(spooled)
        try:
            self.files.check_incoming(spooled)
            _check_fields(group_key, instance_key, priority)
        except BaseException:
            spooled.unlink(missing_ok=True)
            raise
        sha, size = self.files.finish_spooled(spooled, digest=digest, max_bytes=max_bytes)
        return self._place(
            spooled, sha, size, rebuildable=rebuildable, group_key=group_key, instance_key=instance_key,
            role=role, kind=kind, priority=priority, indication=indication,
        )  # fmt: skip

    def _place(self, tmp: Path, sha: str, size: int, *, rebuildable: bool = False, **fields: str) -> OutboxObject:
        """Link a durable file from ``incoming/`` to ``objects/<sha256>``, make the link durable,
        and record it. Linking and its directory fsync happen outside the lock, so concurrent
        associations overlap their disk waits; under the lock the file is linked again if
        :meth:`prune` removed it in between (the same bytes of an exam already sent)."""
        try:
            kept = self._kept_first(tmp, sha, fields["group_key"], fields["instance_key"])
            if kept is not None:
                return kept
            with disk_full_is_typed():
                final = self.files.link(tmp, sha)
                # the check and the row in one SQLite write transaction: prune() (in this or another
                # process, such as a second receiver) deletes files only inside one too
                with self.ledger.write(durable=not rebuildable) as db:
                    self.files.relink(tmp, final)
                    try:
                        return self.ledger.record(db, sha=sha, size=size, at=self._at(), **fields)
                    except (Conflict, InvalidInput):  # refused: the sender was not told stored
                        if not self.ledger.references(db, sha):
                            self.files.remove(sha)
                        raise
        finally:
            tmp.unlink(missing_ok=True)

    def _kept_first(self, tmp: Path, sha: str, group_key: str, instance_key: str) -> OutboxObject | None:
        """The recorded object, when ``tmp`` is the same instance sent again in another encoding
        (losslessly, or lossily: the first copy is kept either way, and a lossy resend is recorded);
        None when there is no such earlier copy to compare with."""
        if self.resend_kind is None:
            return None
        first = self.ledger.recorded_instance(group_key, instance_key)
        if first is None or first.sha256 == sha or not first.path.is_file():
            return None  # new, the same bytes, or sent and pruned: placed as usual (a conflict is refused there)
        kind = self.resend_kind(first.path, tmp)
        if kind not in (LOSSLESS_RESEND, LOSSY_RESEND):
            return None
        if kind == LOSSY_RESEND:
            self.refused("kept_first", "LOSSY_RESEND", exam_id=first.exam_id)
        log.info("instance sent again in another encoding; first copy kept", extra={"reason": kind})
        return first

    # ------------------------------------------------------------------ recovery and refusals

    def adopt_orphans(self, identify: Callable[[Path], Identity | None]) -> int:
        """Record object files that no row references and that name their own exam (``identify``
        reads that from the file; ``None`` for a file it cannot place): rows committed without
        waiting for the disk (``rebuildable``) that a power cut took back. Files whose content does
        not match their name are removed, and so are unreferenced files that are not DICOM (a copy
        of a watch-folder file whose row never committed: the source is still in the folder). A
        DICOM file that cannot be placed (unreadable, or the same instance UID as a recorded
        instance with other bytes) is set aside with its reason, never a reason to stop: recovery
        goes on with the next file. On a full disk the rest waits for the next call. Return how
        many were recorded."""
        recorded = 0
        for path in self.files.unreferenced(self.ledger.known_shas()):
            try:
                recorded += self._adopt_orphan(path, identify)
            except ResourceExhausted:
                log.warning("outbox recovery waits for disk space", extra={"reason": "GATEWAY_DISK_FULL"})
                break
        return recorded

    def _adopt_orphan(self, path: Path, identify: Callable[[Path], Identity | None]) -> int:
        digest, head = self.files.read_object(path)
        if digest.sha256 != path.name:  # never acknowledged with these bytes
            path.unlink(missing_ok=True)
            return 0
        ident = identify(path)
        if ident is None:
            if head[128:132] == b"DICM":
                self.set_aside(path, "DICOM_UNREADABLE", "a stored DICOM file whose identifying UIDs cannot be read")
            else:
                path.unlink(missing_ok=True)
            return 0
        try:
            with disk_full_is_typed(), self.ledger.write() as db:
                self.ledger.record(
                    db, sha=path.name, size=digest.size, group_key=ident.group_key, instance_key=ident.instance_key,
                    role="dicom", kind=ident.kind, priority="routine", indication="", at=self._at(),
                )  # fmt: skip
        except (Conflict, InvalidInput) as exc:
            self.set_aside(path, exc.reason, exc.message)
            return 0
        return 1

    def set_aside(self, path: Path, reason: str, message: str) -> Path:
        """Move a file the outbox cannot place into ``set-aside/`` beside ``<name>.reason.txt``, for a
        person to look at (``status`` counts it until it is removed)."""
        return self.files.set_aside(path, reason, message, at=self._at())

    def set_aside_count(self) -> int:
        return self.files.set_aside_count()

    def refused(self, source: str, reason: str, *, exam_id: str = "") -> None:
        """Record that an instance was refused (by the receiver, the watch folder or the hub): the
        reason only, never the data. A full disk loses the record, not the refusal."""
        self.ledger.refused(source, reason, exam_id=exam_id, at=self._at())

    # ------------------------------------------------------------------ assembling and draining

    def complete(self, group_key: str) -> None:
        """The sender says the study is complete: it may be uploaded now."""
        self.schedule.complete(group_key)

    def settle(self, *, quiet_s: float, now: dt.datetime | None = None) -> int:
        """Mark studies with no new object for ``quiet_s`` seconds ready; return how many."""
        return self.schedule.settle(quiet_s=quiet_s, now=now)

    def claim_next(self, now: dt.datetime | None = None, *, routine: bool = True) -> OutboxExam | None:
        """The most urgent, oldest ready exam whose retry time has come, marked uploading
        (stat and urgent exams only when ``routine`` is False: outside the routine window)."""
        return self.schedule.claim_next(now, routine=routine)

    def objects_of(self, exam_id: str) -> list[OutboxObject]:
        return self.ledger.objects_of(exam_id)

    def failed(
        self, exam_id: str, error: str, *, now: dt.datetime | None = None, rng: random.Random | None = None
    ) -> float:
        """An attempt failed (link down, hub busy): back to ready after a backoff; return the delay in s."""
        return self.schedule.failed(exam_id, error, now=now, rng=rng)

    def recover(self) -> int:
        """Exams left 'uploading' by an attempt that could not record its outcome are ready again
        (call only when no upload is under way); return how many."""
        return self.schedule.recover()

    def recover_pending(self) -> bool:
        """Run the start-up :meth:`recover` if it has not run yet (it waits while the disk is full);
        True once it has."""
        if not self._recovery_pending:
            return True
        try:
            with disk_full_is_typed():
                self.recover()
        except ResourceExhausted:
            log.warning("outbox recovery waits for disk space", extra={"reason": "GATEWAY_DISK_FULL"})
            return False
        self._recovery_pending = False
        return True

    def release(self, exam_id: str, error: str) -> None:
        """The link was down: the exam is ready again at once, with no backoff of its own (the
        forwarder waits for the link, then takes exams in priority order again)."""
        self.schedule.release(exam_id, error)

    def rejected(self, exam_id: str, error: str) -> None:
        """The hub refused the exam for good (bad input): keep it for a person to look at."""
        self.schedule.rejected(exam_id, error)

    def committed(self, exam_id: str, hub_exam_id: str, *, refused: Sequence[Refused] = ()) -> None:
        """The hub committed the exam; ``refused`` are the objects it refused (the exam is then
        incomplete): each is set aside (a link, so pruning keeps it) with its reason for a person."""
        at = self.schedule.committed(exam_id, hub_exam_id, refused=refused)
        for r in refused:  # the refusal stands in the database and the status either way
            message = f"refused by the hub: {r.message}\nexam {hub_exam_id} was committed without it"
            self.files.set_aside_link(r.sha256, r.suffix, r.reason, message, at=at)

    def exam(self, exam_id: str) -> OutboxExam:
        return self.ledger.exam(exam_id)

    def exams(self, *, state: str) -> list[OutboxExam]:
        """The exams in one state, oldest first."""
        return [self.exam(i) for i in self.ledger.exam_ids(state=state)]

    def follow_up_of(self, exam_id: str) -> str:
        """The earlier exam of the same study this one follows ('' for a first exam)."""
        return self.ledger.follow_up_of(exam_id)

    def status(self) -> OutboxStatus:
        since = self._at(self.clock.now() - dt.timedelta(hours=REFUSALS_SHOWN_HOURS))
        status = self.ledger.status(refusals_since=since)
        return dataclasses.replace(status, set_aside=self.files.set_aside_count())

    def link(self, up: bool, *, now: dt.datetime | None = None) -> None:
        """Record whether the hub answered the last attempt; ``since`` changes only when the state does."""
        self.ledger.link(up, at=self._at(now))

    def prune(self, *, keep_seconds: float, now: dt.datetime | None = None) -> int:
        """Delete the files of exams the hub committed more than ``keep_seconds`` ago (their rows stay,
        so a resent instance is still recognised); return how many files were removed. A file that an
        exam still waiting to be sent also uses is kept."""
        cutoff = self._at((now if now is not None else self.clock.now()) - dt.timedelta(seconds=keep_seconds))
        with self.ledger.write() as db:
            return sum(self.files.remove(sha) for sha in self.ledger.sent_files(db, committed_before=cutoff))

    def sweep(self) -> int:
        """Delete object files no row references (a crash between the rename and the insert)."""
        return self.files.sweep(self.ledger.known_shas())


def _check_fields(group_key: str, instance_key: str, priority: str) -> None:
    _check_key(group_key, "group key")
    _check_key(instance_key, "instance key")
    if priority not in PRIORITY_RANK:
        raise InvalidInput(f"unknown priority {priority!r}", reason="BAD_PRIORITY")


def _check_key(value: str, what: str) -> None:
    if not value or len(value) > 256 or any(c in value for c in "\x00\n\r") or ".." in value.split("/"):
        raise InvalidInput(f"unusable {what}", reason="BAD_KEY")
