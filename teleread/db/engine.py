"""Engine creation and schema migration.

SQLite (embedded default) runs in WAL mode with a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE`` so that writers serialise instead of failing; PostgreSQL uses psycopg 3.
``upgrade()`` applies the Alembic migrations shipped in ``teleread.db.migrations``. A SQLite file is
created 0600 (in a 0700 folder when the folder is new) before anything connects, and an existing
one is made 0600; SQLite gives its ``-wal`` and ``-shm`` files the database file's mode.
"""

from __future__ import annotations

import os
import stat
import threading
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Select, create_engine, event
from sqlalchemy.engine import make_url

from teleread.errors import Unavailable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
WRITE_WAIT_SECONDS = 30.0
DB_FILE_MODE = 0o600
DB_DIR_MODE = 0o700


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes: they are UTC by construction."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def normalise_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for PostgreSQL or an in-memory database."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(database)


def prepare_sqlite_file(url: str) -> None:
    """Create the SQLite file (and missing folders) readable by its owner only, before SQLite or
    Alembic would create it with the default mode; an existing file and its -wal/-shm become 0600."""
    path = sqlite_path(url)
    if path is None:
        return
    missing: list[Path] = []
    folder = path.parent
    while not folder.is_dir() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for new_dir in reversed(missing):
        with suppress(FileExistsError):
            new_dir.mkdir(mode=DB_DIR_MODE)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DB_FILE_MODE))
    except FileExistsError:
        pass
    for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with suppress(FileNotFoundError):
            if stat.S_IMODE(existing.stat().st_mode) != DB_FILE_MODE:
                os.chmod(existing, DB_FILE_MODE)


def make_engine(url: str, *, pool_size: int = 20) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        prepare_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    writers = _WriterQueue(engine)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front (no lock upgrade failures) after queueing on an
        # in-process mutex (SQLite's own busy handler sleeps 1-100 ms between retries); readers
        # never wait for writers in WAL mode, so their transactions stay deferred.
        if conn.get_execution_options().get("teleread_read_only", False):
            conn.exec_driver_sql("BEGIN")
            return
        writers.acquire(conn.connection.dbapi_connection)
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            writers.release(conn.connection.dbapi_connection)
            raise


class _WriterQueue:
    """One in-process mutex for SQLite write transactions, released after COMMIT or ROLLBACK."""

    def __init__(self, engine: Engine) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None
        dialect = engine.dialect
        base_commit, base_rollback = dialect.do_commit, dialect.do_rollback

        def do_commit(dbapi_conn: Any) -> None:
            try:
                base_commit(dbapi_conn)
            finally:
                self.release(dbapi_conn)

        def do_rollback(dbapi_conn: Any) -> None:
            try:
                base_rollback(dbapi_conn)
            finally:
                self.release(dbapi_conn)

        dialect.do_commit = do_commit  # type: ignore[method-assign,assignment]
        dialect.do_rollback = do_rollback  # type: ignore[method-assign,assignment]

    def acquire(self, conn: Any) -> None:
        if not self._lock.acquire(timeout=WRITE_WAIT_SECONDS):
            raise Unavailable("the database is busy; try again", reason="DATABASE_BUSY")
        self._holder = id(_raw(conn))

    def release(self, conn: Any) -> None:
        if self._holder is not None and self._holder == id(_raw(conn)):
            self._holder = None
            self._lock.release()


def _raw(conn: Any) -> Any:
    """The driver's connection behind a pool proxy (SQLAlchemy passes either)."""
    return getattr(conn, "dbapi_connection", None) or conn


def reading(engine: Engine) -> Connection:
    """A connection for reads only (on SQLite its transaction does not take the write lock)."""
    return engine.connect().execution_options(teleread_read_only=True)


def locked_for_change(query: Select[Any], *, skip_locked: bool = False) -> Select[Any]:
    """``query`` taking its rows' locks to change them: ``FOR NO KEY UPDATE`` on PostgreSQL (the
    one row lock the hub takes; SQLite ignores it). Not ``FOR UPDATE``: that also waits on (and,
    with ``skip_locked``, skips) every row another transaction merely references through a foreign
    key (an object, an upload, a report or a result inserted for the exam holds ``KEY SHARE`` on
    it), and two such waits deadlock. The hub changes no key of a locked row."""
    return query.with_for_update(key_share=True, skip_locked=skip_locked)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database schema to ``revision`` (idempotent)."""
    from alembic import command

    prepare_sqlite_file(url)
    command.upgrade(alembic_config(url), revision)
