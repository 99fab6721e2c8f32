"""The outbox's SQLite ledger: the schema and its ``user_version`` migrations, the rows of exams,
objects, refusals and the link, and the queries on them. It never reads a clock (every time is an
argument, an ISO-8601 UTC string from :func:`iso`) and never touches a file (an object is named by
its SHA-256; ``path_of`` says where the file store keeps it).

``outbox.db`` runs in WAL mode with ``synchronous=FULL``: a committed row survives a power cut.
:meth:`Ledger.write` is one immediate (write-locking) transaction under the ledger's lock, rolled
back on any error; ``durable=False`` commits it without syncing the WAL (``synchronous=NORMAL``):
the database stays consistent after a power cut but may lose that transaction (the DICOM
receiver's rows, which recovery rebuilds from the files). A write transaction is also what keeps
another process from pruning a file between its placement and its row: SQLite serialises them
across the gateway's receiver processes.

Schema versions: 1 had one exam per study (``UNIQUE(group_key)``); 2 allows several (follow-ups of
a study already sent); 3 adds the ``refusals`` table and ``exams.refused_count``. An older outbox
is migrated in place at open; opening writes nothing when the schema is current (a full disk must
not stop a start).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.tracks import OUTBOX, move_sqlite, open_sqlite
from teleread.vocab import OutboxState, Priority

log = logging.getLogger("teleread.gateway.clinic.outbox")

DB_NAME = "outbox.db"
PRIORITY_RANK = {str(p): p.rank for p in Priority}
STATES = tuple(str(s) for s in OutboxState)
OPEN_STATES = (str(OutboxState.COLLECTING), str(OutboxState.READY))  # an exam that still takes new objects
WAITING_STATES = (*OPEN_STATES, str(OutboxState.UPLOADING))  # not yet at the hub
ERROR_CHARS = 300  # of an error kept in last_error
REASON_CHARS = 64  # of a refusal's reason

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


def iso(t: dt.datetime) -> str:
    """A time as the ledger stores it (UTC, ISO 8601: sorts as text)."""
    return t.astimezone(dt.timezone.utc).isoformat()


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


@contextlib.contextmanager
def typed_db_full() -> Iterator[None]:
    """SQLite's "database or disk is full" (``SQLITE_FULL``) as :class:`ResourceExhausted`."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL") from None
        raise


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One immediate (write-locking) transaction on ``db``: committed when the block ends well,
    rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Ledger:
    """The rows of one outbox (see the module's text). ``path_of(sha256)`` is where the file
    store keeps an object: it fills :attr:`OutboxObject.path`."""

    def __init__(self, path: Path, *, path_of: Callable[[str], Path]) -> None:
        self.path = Path(path)
        self.path_of = path_of
        self.lock = threading.Lock()
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its -wal and -shm the same mode
        self.path.chmod(0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
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

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            yield self.db

    @contextlib.contextmanager
    def write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locking) transaction under the lock; rolled back on any error.
        ``durable=False`` commits without syncing the WAL (``synchronous=NORMAL``): the database
        stays consistent after a power cut but may lose this transaction; the next durable commit
        syncs it too."""
        with self.lock:
            db = self.db
            if not durable:
                db.execute("PRAGMA synchronous=NORMAL")
            try:
                with _immediate(db):
                    yield db
            finally:
                if not durable:
                    db.execute("PRAGMA synchronous=FULL")

    # ------------------------------------------------------------------ objects

    def _object(self, row: tuple[str, str, str, str, str, int]) -> OutboxObject:
        return OutboxObject(row[0], row[1], row[2], row[3], row[4], int(row[5]), self.path_of(row[4]))

    def known_shas(self) -> set[str]:
        """The SHA-256 of every recorded object."""
        with self.read() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT sha256 FROM objects")}

    def recorded_instance(self, group_key: str, instance_key: str) -> OutboxObject | None:
        """The object recorded for this instance of this group, if any."""
        with self.read() as db:
            row = db.execute(
                "SELECT o.id, o.exam_id, o.instance_key, o.role, o.sha256, o.size FROM objects o"
                " JOIN exams e ON e.id = o.exam_id WHERE e.group_key=? AND o.instance_key=?",
                (group_key, instance_key),
            ).fetchone()
        return None if row is None else self._object(row)

    def record(
        self,
        db: sqlite3.Connection,
        *,
        sha: str,
        size: int,
        group_key: str,
        instance_key: str,
        role: str,
        kind: str,
        priority: str,
        indication: str,
        at: str,
    ) -> OutboxObject:
        """Record a durable object in the write transaction ``db``: into the open exam of its
        group, a new exam, or a follow-up exam of a group already sent; the existing row when the
        same instance with the same bytes was recorded before (the sender retried, or resent the
        study); :class:`Conflict` ``INSTANCE_CONFLICT`` when it was recorded with other bytes. A
        more urgent object raises its exam's priority."""
        sent = db.execute(
            "SELECT o.id, o.sha256, o.exam_id FROM objects o JOIN exams e ON e.id = o.exam_id"
            " WHERE e.group_key=? AND o.instance_key=?",
            (group_key, instance_key),
        ).fetchone()
        if sent is not None:  # already durable (and maybe sent)
            if sent[1] != sha:
                raise Conflict("same instance UID with different content", reason="INSTANCE_CONFLICT")
            return OutboxObject(sent[0], sent[2], instance_key, role, sha, size, self.path_of(sha))
        rank = PRIORITY_RANK[priority]
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
            values: dict[str, object] = {"id": exam_id, "group_key": group_key, "kind": kind, "priority": priority}
            values |= {"priority_rank": rank, "indication": indication, "created_at": at, "last_object_at": at}
            values["follow_up_of"] = last[0] if last else ""
            open_sqlite(db, OUTBOX, "exams", OutboxState.COLLECTING, event="collected", values=values)
        else:
            (exam_id,) = row
            move_sqlite(
                db, OUTBOX, "exams", OutboxState.COLLECTING, event="collected", where="id=?", params=(exam_id,),
                sets="last_object_at=?, priority=CASE WHEN ? < priority_rank THEN ? ELSE priority END,"
                " priority_rank=MIN(priority_rank, ?)",
                set_params=(at, rank, priority, rank),
            )  # fmt: skip
        object_id = uuid.uuid4().hex
        db.execute(
            "INSERT INTO objects (id, exam_id, instance_key, role, sha256, size, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (object_id, exam_id, instance_key, role, sha, size, at),
        )
        return OutboxObject(object_id, exam_id, instance_key, role, sha, size, self.path_of(sha))

    @staticmethod
    def references(db: sqlite3.Connection, sha: str) -> bool:
        """Whether any recorded object has these bytes (in the caller's transaction)."""
        return db.execute("SELECT 1 FROM objects WHERE sha256=? LIMIT 1", (sha,)).fetchone() is not None

    def objects_of(self, exam_id: str) -> list[OutboxObject]:
        with self.read() as db:
            rows = db.execute(
                "SELECT id, exam_id, instance_key, role, sha256, size FROM objects"
                " WHERE exam_id=? ORDER BY received_at, id",
                (exam_id,),
            ).fetchall()
        return [self._object(r) for r in rows]

    @staticmethod
    def sent_files(db: sqlite3.Connection, *, committed_before: str) -> list[str]:
        """The SHA-256 of objects of exams committed at or before ``committed_before`` that no exam
        still waiting to be sent also holds (in the caller's transaction)."""
        rows = db.execute(
            "SELECT DISTINCT o.sha256 FROM objects o JOIN exams e ON e.id = o.exam_id"
            " WHERE e.state='committed' AND e.committed_at <= ? AND o.sha256 NOT IN"
            " (SELECT o2.sha256 FROM objects o2 JOIN exams e2 ON e2.id = o2.exam_id"
            " WHERE e2.state NOT IN ('committed'))",
            (committed_before,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    # ------------------------------------------------------------------ exams

    def exam(self, exam_id: str) -> OutboxExam:
        with self.read() as db:
            row = db.execute(
                "SELECT id, group_key, kind, priority, indication, state, attempts, last_error, hub_exam_id, created_at"
                " FROM exams WHERE id=?",
                (exam_id,),
            ).fetchone()
        if row is None:
            raise InvalidInput("no such outbox exam", reason="NOT_IN_OUTBOX")
        return OutboxExam(*row)

    def exam_ids(self, *, state: str) -> list[str]:
        """The exams in one state, oldest first."""
        with self.read() as db:
            return [r[0] for r in db.execute("SELECT id FROM exams WHERE state=? ORDER BY rowid", (state,))]

    def follow_up_of(self, exam_id: str) -> str:
        with self.read() as db:
            row = db.execute("SELECT follow_up_of FROM exams WHERE id=?", (exam_id,)).fetchone()
        return str(row[0]) if row else ""

    # ------------------------------------------------------------------ refusals, link, status

    @staticmethod
    def add_refusal(db: sqlite3.Connection, *, at: str, source: str, reason: str, exam_id: str = "") -> None:
        db.execute(
            "INSERT INTO refusals (at, source, reason, exam_id) VALUES (?, ?, ?, ?)",
            (at, source, reason[:REASON_CHARS], exam_id),
        )

    def refused(self, source: str, reason: str, *, exam_id: str = "", at: str) -> None:
        """Record a refusal (the reason only, never the data). A full disk loses the record, not
        the refusal."""
        try:
            with self.write() as db:
                self.add_refusal(db, at=at, source=source, reason=reason, exam_id=exam_id)
        except sqlite3.OperationalError:
            log.warning("refusal not recorded", extra={"reason": reason})

    def link(self, up: bool, *, at: str) -> None:
        """Record whether the hub answered; ``since`` changes only when the state does."""
        state = "up" if up else "down"
        with self.write() as db:
            db.execute(
                "INSERT INTO link (id, state, since, last_contact_at) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET since=CASE WHEN state=excluded.state THEN since ELSE excluded.since END, state=excluded.state,"
                " last_contact_at=coalesce(excluded.last_contact_at, last_contact_at)",
                (state, at, at if up else None),
            )

    def status(self, *, refusals_since: str) -> OutboxStatus:
        """Exams by state, bytes and the oldest study still to send, the last error, the link, the
        incomplete exams and the receiver's refusals since ``refusals_since`` (``set_aside`` is
        the file store's to fill in)."""
        with self.read() as db:
            by_state = dict(db.execute("SELECT state, count(*) FROM exams GROUP BY state").fetchall())
            (waiting,) = db.execute(
                "SELECT coalesce(sum(o.size), 0) FROM objects o JOIN exams e ON e.id = o.exam_id"
                f" WHERE e.state IN {WAITING_STATES}"
            ).fetchone()
            (oldest,) = db.execute(f"SELECT min(created_at) FROM exams WHERE state IN {WAITING_STATES}").fetchone()
            last = db.execute(
                "SELECT last_error FROM exams WHERE last_error != '' ORDER BY next_attempt_at DESC LIMIT 1"
            ).fetchone()
            link = db.execute("SELECT state, since, last_contact_at FROM link WHERE id=1").fetchone()
            refused, last_refusal = db.execute(
                "SELECT count(*), (SELECT reason FROM refusals WHERE at >= ?1 AND source = 'receiver'"
                " ORDER BY id DESC LIMIT 1) FROM refusals WHERE at >= ?1 AND source = 'receiver'",
                (refusals_since,),
            ).fetchone()
            (incomplete,) = db.execute("SELECT count(*) FROM exams WHERE refused_count > 0").fetchone()
        link_state, link_since, last_contact = link or ("unknown", None, None)
        return OutboxStatus(
            {s: int(by_state.get(s, 0)) for s in STATES},
            int(waiting),
            oldest,
            last[0] if last else "",
            link_state=link_state,
            link_since=link_since,
            last_contact_at=last_contact,
            incomplete=int(incomplete),
            refused_recent=int(refused),
            last_refusal=last_refusal or "",
        )


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
    with _immediate(db):
        table = _SCHEMA.split(";")[0].replace("IF NOT EXISTS exams", "exams_v2")
        db.execute(table)
        columns = "id, group_key, kind, priority, priority_rank, indication, state, created_at, last_object_at,"
        columns += " attempts, next_attempt_at, last_error, hub_exam_id, committed_at"
        db.execute(f"INSERT INTO exams_v2 ({columns}) SELECT {columns} FROM exams")
        db.execute("DROP TABLE exams")
        db.execute("ALTER TABLE exams_v2 RENAME TO exams")
        db.execute("PRAGMA user_version=2")
