"""The clinic gateway's durable outbox: every received object is on disk and recorded before the
sender hears success, and survives a crash, a reboot or a full disk without corruption.

Layout under ``root``: ``outbox.db`` (SQLite, WAL, ``synchronous=FULL``), ``objects/<sha256>``
(content-addressed, written to ``incoming/`` first, fsync'd, renamed, directory fsync'd). An object
row is inserted only after its file is durable, in the same transaction that creates or touches its
exam, so a crash leaves at most an unreferenced file in ``incoming/`` (removed at open) or an
unreferenced object file (adopted again if the same bytes arrive, else removed by ``sweep``).

Exams are assembled by a grouping key (the StudyInstanceUID for DICOM; the record for WFDB) and
become ``ready`` when the sender says the study is complete or after a quiet period with no new
object (study stability, as in PACS). The uploader takes ready exams most urgent first, oldest
first; a failed attempt schedules the next one with capped exponential backoff and full jitter.
Once an exam is being uploaded its set of objects is fixed: an instance of the same study that
arrives later opens a follow-up exam of that study (``follow_up_of``), uploaded on its own, while an
instance already received (a retry, or the whole study sent again) is acknowledged and not sent twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import logging
import os
import random
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.gateway.validate import LOSSLESS_RESEND, LOSSY_RESEND
from teleread.vocab import Priority

log = logging.getLogger("teleread.gateway.outbox")

SET_ASIDE_DIR = "set-aside"  # files recovery could not place, each beside <name>.reason.txt, for a person
REASON_SUFFIX = ".reason.txt"
RESERVE_NAME = "reserve"  # space kept back so the database opens on a full disk
RESERVE_BYTES = 512 * 1024
REFUSALS_SHOWN_HOURS = 24  # status shows the receiver's refusals of this many hours
PRIORITY_RANK = {str(p): p.rank for p in Priority}
STATES = ("collecting", "ready", "uploading", "committed", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exams (
    id TEXT PRIMARY KEY,
    group_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    priority TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    indication TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_object_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    last_error TEXT NOT NULL DEFAULT '',
    hub_exam_id TEXT NOT NULL DEFAULT '',
    committed_at TEXT,
    follow_up_of TEXT NOT NULL DEFAULT '',
    refused_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY,
    exam_id TEXT NOT NULL REFERENCES exams(id),
    instance_key TEXT NOT NULL,
    role TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (exam_id, instance_key)
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    exam_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ix_refusals_at ON refusals (at);
CREATE INDEX IF NOT EXISTS ix_exams_queue ON exams (state, priority_rank, created_at);
CREATE INDEX IF NOT EXISTS ix_exams_group ON exams (group_key);
CREATE TABLE IF NOT EXISTS link (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL,
    since TEXT NOT NULL,
    last_contact_at TEXT
);
"""
SCHEMA_VERSION = 3  # 2: several exams per study (follow-ups of a study already sent); 3: refusals, incomplete
OPEN_STATES = ("collecting", "ready")  # an exam that still takes new objects


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Identity:
    """Where an object belongs, as read from the object itself (a DICOM instance's UIDs)."""

    group_key: str
    instance_key: str
    kind: str


@dataclass(frozen=True)
class OutboxExam:
    id: str
    group_key: str
    kind: str
    priority: str
    indication: str
    state: str
    attempts: int
    last_error: str
    hub_exam_id: str
    created_at: str


@dataclass(frozen=True)
class OutboxObject:
    id: str
    exam_id: str
    instance_key: str
    role: str
    sha256: str
    size: int
    path: Path


@dataclass(frozen=True)
class Refused:
    """An object of an exam the hub refused, and why."""

    sha256: str
    reason: str
    message: str
    suffix: str = ".dcm"


@dataclass(frozen=True)
class OutboxStatus:
    by_state: dict[str, int]
    bytes_waiting: int
    oldest_waiting_at: str | None
    last_error: str
    link_state: str = "unknown"  # "up" | "down" | "unknown" (nothing sent yet)
    link_since: str | None = None
    last_contact_at: str | None = None  # the last time the hub answered
    set_aside: int = 0  # files in set-aside/ waiting for a person
    incomplete: int = 0  # exams the hub committed without some of their objects
    refused_recent: int = 0  # instances the receiver refused in the last REFUSALS_SHOWN_HOURS
    last_refusal: str = ""  # the reason of the latest of those


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: delay = uniform(0, min(cap, base * 2**attempt))."""

    base_s: float = 2.0
    cap_s: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** max(0, attempt - 1)))
        return (rng or random).uniform(0.0, ceiling)


class Outbox:
    def __init__(
        self,
        root: Path,
        *,
        backoff: Backoff = Backoff(),
        maintenance: bool = True,
        resend_kind: Callable[[Path, Path], str] | None = None,
    ) -> None:
        """``maintenance=False`` opens an outbox that another process of the same gateway owns (a
        receiver process): no clean-up of ``incoming/`` and no recovery of interrupted uploads.
        ``resend_kind(first, second)`` tells an instance sent again in another encoding from a
        different one under the same key (``validate.resend_kind``); without it other bytes are a
        conflict."""
        self.resend_kind = resend_kind
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.incoming_dir = self.root / "incoming"
        for d in (self.root, self.objects_dir, self.incoming_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            d.chmod(0o700)  # patient data: the gateway's own user only
        for leftover in self.incoming_dir.iterdir() if maintenance else ():  # half-received files of a crash
            leftover.unlink(missing_ok=True)
        self.set_aside_dir = self.root / SET_ASIDE_DIR
        self.backoff = backoff
        self._lock = threading.Lock()
        self.reserve = self.root / RESERVE_NAME
        try:
            self._db = self._open_db()
        except sqlite3.OperationalError:
            # a full disk: the database needs a little room to open (its WAL and shared-memory files);
            # the reserve gives it back, and is put back once there is room again
            if not self.reserve.exists():
                raise
            self.reserve.unlink()
            log.warning("outbox opened on a full disk: reserve released", extra={"reason": "GATEWAY_DISK_FULL"})
            self._db = self._open_db()
        if maintenance:
            self.keep_reserve()
        # an upload interrupted by a crash is simply ready again (the hub resumes by offset); on a
        # full disk that waits for room (recover_pending), and the gateway starts anyway
        self._recovery_pending = maintenance
        if maintenance:
            self.recover_pending()

    def _open_db(self) -> sqlite3.Connection:
        path = self.root / "outbox.db"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its -wal and -shm the same mode
        path.chmod(0o600)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            _migrate(db)
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)  # writes nothing when the tables exist (a full disk must not stop a start)
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def keep_reserve(self) -> bool:
        """Make sure the reserve file (room for the database to open on a full disk) exists; True
        when it does. Cheap when it does: one stat."""
        if self.reserve.exists():
            return True
        tmp = self.reserve.with_name(RESERVE_NAME + ".part")
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(bytes(RESERVE_BYTES))
                os.fsync(f.fileno())
            os.replace(tmp, self.reserve)
        except OSError:  # still full: tried again later
            tmp.unlink(missing_ok=True)
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
        max_bytes: int = 4 * 1024**3,
    ) -> OutboxObject:
        """Stream ``source`` to disk, fsync it, then record it; return only when it is durable."""
        _check_fields(group_key, instance_key, priority)
        tmp = self.incoming_dir / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                while block := source.read(1024 * 1024):
                    size += len(block)
                    if size > max_bytes:
                        raise InvalidInput("object larger than the gateway accepts", reason="OBJECT_TOO_LARGE")
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._place(
            tmp, digest.hexdigest(), size, group_key=group_key, instance_key=instance_key, role=role, kind=kind,
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
        max_bytes: int = 4 * 1024**3,
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
            if spooled.parent.resolve() != self.incoming_dir.resolve():
                raise ValueError(f"adopt() takes files under {self.incoming_dir}, not {spooled.parent}")
            _check_fields(group_key, instance_key, priority)
            with open(spooled, "rb") as f:
                if digest is None:
                    hasher = hashlib.sha256()
                    while block := f.read(1024 * 1024):
                        hasher.update(block)
                    digest = hasher.hexdigest(), f.tell()
                if digest[1] > max_bytes:
                    raise InvalidInput("object larger than the gateway accepts", reason="OBJECT_TOO_LARGE")
                os.fsync(f.fileno())
        except OSError as exc:
            spooled.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
            raise
        except BaseException:
            spooled.unlink(missing_ok=True)
            raise
        return self._place(
            spooled, digest[0], digest[1], rebuildable=rebuildable, group_key=group_key, instance_key=instance_key,
            role=role, kind=kind, priority=priority, indication=indication,
        )  # fmt: skip

    def _place(self, tmp: Path, sha: str, size: int, *, rebuildable: bool = False, **fields: str) -> OutboxObject:
        """Link a durable file from ``incoming/`` to ``objects/<sha256>``, make the link durable,
        and record it. Linking and its directory fsync happen outside the lock, so concurrent
        associations overlap their disk waits; under the lock the file is linked again if
        :meth:`prune` removed it in between (the same bytes of an exam already sent)."""
        final = self.objects_dir / sha
        try:
            kept = self._kept_first(tmp, sha, fields["group_key"], fields["instance_key"])
            if kept is not None:
                return kept
            try:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, final)
                _fsync_dir(self.objects_dir)  # also when the file existed: its writer may not have synced yet
                # the check and the row in one SQLite write transaction: prune() (in this or another
                # process, such as a second receiver) deletes files only inside one too
                with self._lock, self._tx(durable=not rebuildable) as db:
                    if not final.exists():
                        os.link(tmp, final)
                        _fsync_dir(self.objects_dir)
                    try:
                        return self._record(db, final, sha=sha, size=size, **fields)
                    except (Conflict, InvalidInput):  # refused: the sender was not told stored
                        self._unlink_unreferenced(db, final)
                        raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
                raise
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):  # SQLITE_FULL: the disk filled between the object and its row
                    raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
                raise
        finally:
            tmp.unlink(missing_ok=True)

    def _kept_first(self, tmp: Path, sha: str, group_key: str, instance_key: str) -> OutboxObject | None:
        """The recorded object, when ``tmp`` is the same instance sent again in another encoding
        (losslessly, or lossily: the first copy is kept either way, and a lossy resend is recorded);
        None when there is no such earlier copy to compare with."""
        if self.resend_kind is None:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT o.id, o.exam_id, o.role, o.sha256, o.size FROM objects o JOIN exams e ON e.id = o.exam_id"
                " WHERE e.group_key=? AND o.instance_key=?",
                (group_key, instance_key),
            ).fetchone()
        if row is None or row[3] == sha or not (self.objects_dir / row[3]).is_file():
            return None  # new, the same bytes, or sent and pruned: placed as usual (a conflict is refused there)
        kind = self.resend_kind(self.objects_dir / row[3], tmp)
        if kind not in (LOSSLESS_RESEND, LOSSY_RESEND):
            return None
        if kind == LOSSY_RESEND:
            self.refused("kept_first", "LOSSY_RESEND", exam_id=row[1])
        log.info("instance sent again in another encoding; first copy kept", extra={"reason": kind})
        return OutboxObject(row[0], row[1], instance_key, row[2], row[3], int(row[4]), self.objects_dir / row[3])

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
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM objects")}
        recorded = 0
        for path in sorted(self.objects_dir.iterdir()):
            if path.name in known or not path.is_file():
                continue
            try:
                recorded += self._adopt_orphan(path, identify)
            except ResourceExhausted:
                log.warning("outbox recovery waits for disk space", extra={"reason": "GATEWAY_DISK_FULL"})
                break
        return recorded

    def _adopt_orphan(self, path: Path, identify: Callable[[Path], Identity | None]) -> int:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            head = f.read(132)
            hasher.update(head)
            while block := f.read(1024 * 1024):
                hasher.update(block)
        if hasher.hexdigest() != path.name:  # never acknowledged with these bytes
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
            with self._lock, _disk_full_is_typed(), self._tx() as db:
                self._record(
                    db, path, sha=path.name, size=path.stat().st_size, group_key=ident.group_key,
                    instance_key=ident.instance_key, role="dicom", kind=ident.kind, priority="routine", indication="",
                )  # fmt: skip
        except (Conflict, InvalidInput) as exc:
            self.set_aside(path, exc.reason, exc.message)
            return 0
        return 1

    def set_aside(self, path: Path, reason: str, message: str) -> Path:
        """Move a file the outbox cannot place into ``set-aside/`` beside ``<name>.reason.txt``, for a
        person to look at (``status`` counts it until it is removed)."""
        self.set_aside_dir.mkdir(mode=0o700, exist_ok=True)
        target = self.set_aside_dir / path.name
        stamp = _iso(_now())
        text = f"{reason}\n{message}\nset aside by the gateway's outbox at {stamp}\n"
        try:
            os.replace(path, target)
            target.with_name(target.name + REASON_SUFFIX).write_text(text, encoding="utf-8")
        except OSError as exc:  # the file stays unreferenced; the next start looks at it again
            log.error("file not set aside", extra={"reason": type(exc).__name__})
            return path
        log.warning("outbox file set aside", extra={"reason": reason, "event": "set_aside"})
        return target

    def set_aside_count(self) -> int:
        if not self.set_aside_dir.is_dir():
            return 0
        return sum(1 for p in self.set_aside_dir.iterdir() if p.is_file() and not p.name.endswith(REASON_SUFFIX))

    def refused(self, source: str, reason: str, *, exam_id: str = "") -> None:
        """Record that an instance was refused (by the receiver, the watch folder or the hub): the
        reason only, never the data. A full disk loses the record, not the refusal."""
        try:
            with self._lock, self._tx() as db:
                db.execute(
                    "INSERT INTO refusals (at, source, reason, exam_id) VALUES (?, ?, ?, ?)",
                    (_iso(_now()), source, reason[:64], exam_id),
                )
        except sqlite3.OperationalError:
            log.warning("refusal not recorded", extra={"reason": reason})

    def _unlink_unreferenced(self, db: sqlite3.Connection, final: Path) -> None:
        """Remove ``objects/<sha>`` unless a recorded object uses the same bytes (caller holds the
        lock and the write transaction, so no placement of the same bytes is recorded meanwhile)."""
        if db.execute("SELECT 1 FROM objects WHERE sha256=? LIMIT 1", (final.name,)).fetchone() is None:
            final.unlink(missing_ok=True)

    def _record(
        self,
        db: sqlite3.Connection,
        final: Path,
        *,
        sha: str,
        size: int,
        group_key: str,
        instance_key: str,
        role: str,
        kind: str,
        priority: str,
        indication: str,
    ) -> OutboxObject:
        """Record a durable object (the caller holds the lock and the write transaction ``db``): a
        new or follow-up exam, or the existing row when the same instance was received before."""
        now = _iso(_now())
        sent = db.execute(
            "SELECT o.id, o.sha256, o.exam_id FROM objects o JOIN exams e ON e.id = o.exam_id"
            " WHERE e.group_key=? AND o.instance_key=?",
            (group_key, instance_key),
        ).fetchone()
        if sent is not None:  # the sender retried, or resent the study: already durable (and maybe sent)
            if sent[1] != sha:
                raise Conflict("same instance UID with different content", reason="INSTANCE_CONFLICT")
            return OutboxObject(sent[0], sent[2], instance_key, role, sha, size, final)
        row = db.execute(
            f"SELECT id FROM exams WHERE group_key=? AND state IN {OPEN_STATES} ORDER BY rowid DESC LIMIT 1",
            (group_key,),
        ).fetchone()
        if row is None:
            # a new study, or a late instance of a study already sent: a follow-up exam of the same study
            last = db.execute(
                "SELECT id FROM exams WHERE group_key=? ORDER BY rowid DESC LIMIT 1", (group_key,)
            ).fetchone()
            exam_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO exams (id, group_key, kind, priority, priority_rank, indication, state, created_at,"
                " last_object_at, follow_up_of) VALUES (?, ?, ?, ?, ?, ?, 'collecting', ?, ?, ?)",
                (
                    exam_id,
                    group_key,
                    kind,
                    priority,
                    PRIORITY_RANK[priority],
                    indication,
                    now,
                    now,
                    last[0] if last else "",
                ),
            )
        else:
            (exam_id,) = row
            db.execute(
                "UPDATE exams SET last_object_at=?, state='collecting', priority=CASE WHEN ? < priority_rank"
                " THEN ? ELSE priority END, priority_rank=MIN(priority_rank, ?) WHERE id=?",
                (now, PRIORITY_RANK[priority], priority, PRIORITY_RANK[priority], exam_id),
            )
        object_id = uuid.uuid4().hex
        db.execute(
            "INSERT INTO objects (id, exam_id, instance_key, role, sha256, size, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (object_id, exam_id, instance_key, role, sha, size, now),
        )
        return OutboxObject(object_id, exam_id, instance_key, role, sha, size, final)

    # ------------------------------------------------------------------ assembling and draining

    def complete(self, group_key: str) -> None:
        """The sender says the study is complete: it may be uploaded now."""
        with self._lock, self._tx() as db:
            db.execute("UPDATE exams SET state='ready' WHERE group_key=? AND state='collecting'", (group_key,))

    def settle(self, *, quiet_s: float, now: dt.datetime | None = None) -> int:
        """Mark studies with no new object for ``quiet_s`` seconds ready; return how many."""
        cutoff = _iso((now or _now()) - dt.timedelta(seconds=quiet_s))
        with self._lock, self._tx() as db:
            return db.execute(
                # a WFDB record is completed by whoever took both its files, never by the clock
                "UPDATE exams SET state='ready' WHERE state='collecting' AND last_object_at <= ?"
                " AND group_key NOT LIKE 'wfdb:%'",
                (cutoff,),
            ).rowcount

    def claim_next(self, now: dt.datetime | None = None, *, routine: bool = True) -> OutboxExam | None:
        """The most urgent, oldest ready exam whose retry time has come, marked uploading
        (stat and urgent exams only when ``routine`` is False: outside the routine window)."""
        at = _iso(now or _now())
        max_rank = PRIORITY_RANK["routine"] if routine else PRIORITY_RANK["urgent"]
        with self._lock, self._tx() as db:
            row = db.execute(
                "SELECT id FROM exams WHERE state='ready' AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
                " AND priority_rank <= ? ORDER BY priority_rank, created_at LIMIT 1",
                (at, max_rank),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE exams SET state='uploading' WHERE id=?", (row[0],))
        return self.exam(row[0])

    def objects_of(self, exam_id: str) -> list[OutboxObject]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, exam_id, instance_key, role, sha256, size FROM objects"
                " WHERE exam_id=? ORDER BY received_at, id",
                (exam_id,),
            ).fetchall()
        return [OutboxObject(r[0], r[1], r[2], r[3], r[4], int(r[5]), self.objects_dir / r[4]) for r in rows]

    def failed(
        self, exam_id: str, error: str, *, now: dt.datetime | None = None, rng: random.Random | None = None
    ) -> float:
        """An attempt failed (link down, hub busy): back to ready after a backoff; return the delay in s."""
        with self._lock, self._tx() as db:
            (attempts,) = db.execute("SELECT attempts FROM exams WHERE id=?", (exam_id,)).fetchone()
            delay = self.backoff.delay(attempts + 1, rng)
            when = _iso((now or _now()) + dt.timedelta(seconds=delay))
            db.execute(
                "UPDATE exams SET state='ready', attempts=attempts+1, next_attempt_at=?, last_error=? WHERE id=?",
                (when, error[:300], exam_id),
            )
        return delay

    def recover(self) -> int:
        """Exams left 'uploading' by an attempt that could not record its outcome are ready again
        (call only when no upload is under way); return how many."""
        with self._lock, self._tx() as db:
            return db.execute("UPDATE exams SET state='ready' WHERE state='uploading'").rowcount

    def recover_pending(self) -> bool:
        """Run the start-up :meth:`recover` if it has not run yet (it waits while the disk is full);
        True once it has."""
        if not self._recovery_pending:
            return True
        try:
            with _disk_full_is_typed():
                self.recover()
        except ResourceExhausted:
            log.warning("outbox recovery waits for disk space", extra={"reason": "GATEWAY_DISK_FULL"})
            return False
        self._recovery_pending = False
        return True

    def release(self, exam_id: str, error: str) -> None:
        """The link was down: the exam is ready again at once, with no backoff of its own (the
        forwarder waits for the link, then takes exams in priority order again)."""
        with self._lock, self._tx() as db:
            db.execute("UPDATE exams SET state='ready', last_error=? WHERE id=?", (error[:300], exam_id))

    def rejected(self, exam_id: str, error: str) -> None:
        """The hub refused the exam for good (bad input): keep it for a person to look at."""
        with self._lock, self._tx() as db:
            db.execute("UPDATE exams SET state='rejected', last_error=? WHERE id=?", (error[:300], exam_id))

    def committed(self, exam_id: str, hub_exam_id: str, *, refused: Sequence[Refused] = ()) -> None:
        """The hub committed the exam; ``refused`` are the objects it refused (the exam is then
        incomplete): each is set aside (a link, so pruning keeps it) with its reason for a person."""
        now = _iso(_now())
        with self._lock, self._tx() as db:
            db.execute(
                "UPDATE exams SET state='committed', hub_exam_id=?, committed_at=?, last_error='', refused_count=?"
                " WHERE id=?",
                (hub_exam_id, now, len(refused), exam_id),
            )
            for r in refused:
                db.execute(
                    "INSERT INTO refusals (at, source, reason, exam_id) VALUES (?, 'hub', ?, ?)",
                    (now, r.reason[:64], exam_id),
                )
        for r in refused:
            source = self.objects_dir / r.sha256
            target = self.set_aside_dir / f"{r.sha256}{r.suffix}"
            message = f"refused by the hub: {r.message}\nexam {hub_exam_id} was committed without it"
            try:
                self.set_aside_dir.mkdir(mode=0o700, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.link(source, target)
                target.with_name(target.name + REASON_SUFFIX).write_text(
                    f"{r.reason}\n{message}\nset aside by the gateway at {now}\n", encoding="utf-8"
                )
            except OSError as exc:  # the refusal stands in the database and the status either way
                log.error("refused file not set aside", extra={"reason": type(exc).__name__})

    def exam(self, exam_id: str) -> OutboxExam:
        with self._lock:
            row = self._db.execute(
                "SELECT id, group_key, kind, priority, indication, state, attempts, last_error, hub_exam_id, created_at"
                " FROM exams WHERE id=?",
                (exam_id,),
            ).fetchone()
        if row is None:
            raise InvalidInput("no such outbox exam", reason="NOT_IN_OUTBOX")
        return OutboxExam(*row)

    def exams(self, *, state: str) -> list[OutboxExam]:
        """The exams in one state, oldest first."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM exams WHERE state=? ORDER BY rowid", (state,))]
        return [self.exam(i) for i in ids]

    def follow_up_of(self, exam_id: str) -> str:
        """The earlier exam of the same study this one follows ('' for a first exam)."""
        with self._lock:
            row = self._db.execute("SELECT follow_up_of FROM exams WHERE id=?", (exam_id,)).fetchone()
        return str(row[0]) if row else ""

    def status(self) -> OutboxStatus:
        with self._lock:
            by_state = dict(self._db.execute("SELECT state, count(*) FROM exams GROUP BY state").fetchall())
            (waiting,) = self._db.execute(
                "SELECT coalesce(sum(o.size), 0) FROM objects o JOIN exams e ON e.id = o.exam_id"
                " WHERE e.state IN ('collecting', 'ready', 'uploading')"
            ).fetchone()
            (oldest,) = self._db.execute(
                "SELECT min(created_at) FROM exams WHERE state IN ('collecting', 'ready', 'uploading')"
            ).fetchone()
            last = self._db.execute(
                "SELECT last_error FROM exams WHERE last_error != '' ORDER BY next_attempt_at DESC LIMIT 1"
            ).fetchone()
            link = self._db.execute("SELECT state, since, last_contact_at FROM link WHERE id=1").fetchone()
            since = _iso(_now() - dt.timedelta(hours=REFUSALS_SHOWN_HOURS))
            refused, last_refusal = self._db.execute(
                "SELECT count(*), (SELECT reason FROM refusals WHERE at >= ?1 AND source = 'receiver'"
                " ORDER BY id DESC LIMIT 1) FROM refusals WHERE at >= ?1 AND source = 'receiver'",
                (since,),
            ).fetchone()
            (incomplete,) = self._db.execute("SELECT count(*) FROM exams WHERE refused_count > 0").fetchone()
        link_state, link_since, last_contact = link or ("unknown", None, None)
        return OutboxStatus(
            {s: int(by_state.get(s, 0)) for s in STATES},
            int(waiting),
            oldest,
            last[0] if last else "",
            link_state=link_state,
            link_since=link_since,
            last_contact_at=last_contact,
            set_aside=self.set_aside_count(),
            incomplete=int(incomplete),
            refused_recent=int(refused),
            last_refusal=last_refusal or "",
        )

    def link(self, up: bool, *, now: dt.datetime | None = None) -> None:
        """Record whether the hub answered the last attempt; ``since`` changes only when the state does."""
        at, state = _iso(now or _now()), "up" if up else "down"
        with self._lock, self._tx() as db:
            db.execute(
                "INSERT INTO link (id, state, since, last_contact_at) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET since=CASE WHEN state=excluded.state THEN since ELSE excluded.since END, state=excluded.state,"
                " last_contact_at=coalesce(excluded.last_contact_at, last_contact_at)",
                (state, at, at if up else None),
            )

    def prune(self, *, keep_seconds: float, now: dt.datetime | None = None) -> int:
        """Delete the files of exams the hub committed more than ``keep_seconds`` ago (their rows stay,
        so a resent instance is still recognised); return how many files were removed. A file that an
        exam still waiting to be sent also uses is kept."""
        cutoff = _iso((now or _now()) - dt.timedelta(seconds=keep_seconds))
        with self._lock, self._tx() as db:
            rows = db.execute(
                "SELECT DISTINCT o.sha256 FROM objects o JOIN exams e ON e.id = o.exam_id"
                " WHERE e.state='committed' AND e.committed_at <= ? AND o.sha256 NOT IN"
                " (SELECT o2.sha256 FROM objects o2 JOIN exams e2 ON e2.id = o2.exam_id"
                " WHERE e2.state NOT IN ('committed'))",
                (cutoff,),
            ).fetchall()
            removed = 0
            for (sha,) in rows:
                path = self.objects_dir / sha
                if path.exists():
                    path.unlink()
                    removed += 1
        return removed

    def sweep(self) -> int:
        """Delete object files no row references (a crash between the rename and the insert)."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM objects")}
        removed = 0
        for f in self.objects_dir.iterdir():
            if f.name not in known:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locking) transaction; rolled back on any error. ``durable=False``
        commits without syncing the WAL (``synchronous=NORMAL``): the database stays consistent
        after a power cut but may lose this transaction; the next durable commit syncs it too."""
        if not durable:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")


@contextlib.contextmanager
def _disk_full_is_typed() -> Iterator[None]:
    """SQLite's "database or disk is full" (and ENOSPC) as :class:`ResourceExhausted`."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
        raise


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an outbox written by an earlier gateway to the current schema, in place."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='exams'").fetchone()
    if not exists or version >= SCHEMA_VERSION:
        return
    if version < 2:
        _migrate_to_2(db)
    columns = {r[1] for r in db.execute("PRAGMA table_info(exams)")}
    if "refused_count" not in columns:  # 3: the refusals table comes from _SCHEMA
        db.execute("ALTER TABLE exams ADD COLUMN refused_count INTEGER NOT NULL DEFAULT 0")


def _migrate_to_2(db: sqlite3.Connection) -> None:
    # version 1 had UNIQUE(group_key): rebuild the table without it (SQLite cannot drop a constraint)
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("BEGIN IMMEDIATE")
    try:
        table = _SCHEMA.split(";")[0].replace("IF NOT EXISTS exams", "exams_v2")
        db.execute(table)
        columns = "id, group_key, kind, priority, priority_rank, indication, state, created_at, last_object_at,"
        columns += " attempts, next_attempt_at, last_error, hub_exam_id, committed_at"
        db.execute(f"INSERT INTO exams_v2 ({columns}) SELECT {columns} FROM exams")
        db.execute("DROP TABLE exams")
        db.execute("ALTER TABLE exams_v2 RENAME TO exams")
        db.execute("PRAGMA user_version=2")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _check_fields(group_key: str, instance_key: str, priority: str) -> None:
    _check_key(group_key, "group key")
    _check_key(instance_key, "instance key")
    if priority not in PRIORITY_RANK:
        raise InvalidInput(f"unknown priority {priority!r}", reason="BAD_PRIORITY")


def _check_key(value: str, what: str) -> None:
    if not value or len(value) > 256 or any(c in value for c in "\x00\n\r") or ".." in value.split("/"):
        raise InvalidInput(f"unusable {what}", reason="BAD_KEY")
