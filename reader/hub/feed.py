"""The watch feed: one reader of the events table per hub process, feeding every live stream.

A single thread (``WatchFeed.start``) wakes on the in-process :class:`EventBus` after a commit, or
every ``poll_seconds`` for commits of other hub processes on the same database, reads the event
rows it has not read yet once, and hands each to the subscriptions it concerns: worklist watchers
of the event's hospital and specialty, and results watchers of the event's site. Streams never
query the events table themselves, so a thousand watchers cost one read per wake-up, not a
thousand. With no stream subscribed the feed reads only every ``poll_seconds`` (keeping its
cursor near the head), not on every commit; it reads on its own connection, held between reads
(each read its own short transaction), so a read costs no pool checkout and no liveness ping.

Event ids are assigned at insert but PostgreSQL transactions commit in any order, so an id below
the highest one read can still appear later. :class:`EventCursor` remembers the ids it skipped
over (the gaps) and reads them again for ``window_seconds`` after it first saw the gap: a late
commit is delivered once, and a rolled-back id is given up after the window.

The async generators :meth:`WatchFeed.worklist` and :meth:`WatchFeed.results` are what the
servicers iterate (on the gRPC server's event loop): a subscription wakes its stream through the
stream's loop, and their blocking work (the snapshot, a results catch-up) runs in the loop's
default executor. The service layer's rules apply unchanged: a worklist is a reader's hospital and
specialty (``require_reader``), results are the caller's site (``require_result_reader``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, func, or_, select

from teleread.auth import Principal, require_reader, require_result_reader
from teleread.db.engine import reading
from teleread.db.schema import events, exams, principals, results, sites
from teleread.errors import InvalidInput, Unavailable
from teleread.events import EventBus
from teleread.reader.hub.directory import Directory
from teleread.reader.hub.queue import QueueService
from teleread.reader.hub.repository import ResultRecord, result_of, result_query
from teleread.reader.hub.results import ResultsService

log = logging.getLogger("teleread.feed")

# Event types a worklist watcher sees (the others are audit only).
WORKLIST_TYPES = ("queued", "critical", "claimed", "released", "reported", "critical_result")
# Event types written with each published result (its cursor in the event's detail).
RESULT_TYPES = ("reported", "critical_result")
READ_BATCH = 2000  # event rows per query; a longer backlog is read in several
RESULTS_PAGE = 200  # results per catch-up query of a results watcher
# A worklist snapshot carries the reader's whole queue (a station draws all of it), up to this bound.
SNAPSHOT_LIMIT = 20_000


# ---- what a stream receives ------------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotExam:
    """One exam of a worklist snapshot."""

    exam: dict[str, Any]
    site_code: str


@dataclass(frozen=True)
class SnapshotEnd:
    """The snapshot is complete; events after ``event_id`` follow."""

    event_id: int


@dataclass(frozen=True)
class WorklistChange:
    """An event of a worklist, with its exam as it is now."""

    event_id: int
    type: str
    at: datetime
    exam: dict[str, Any]
    site_code: str


@dataclass(frozen=True)
class WorklistChanges:
    """Changes of a worklist read together (with ``batched``), oldest first."""

    changes: tuple[WorklistChange, ...]


WorklistItem = SnapshotExam | SnapshotEnd | WorklistChange | WorklistChanges


@dataclass(frozen=True)
class ResultsLive:
    """A results watch has caught up and is subscribed: every later result will follow."""

    cursor: int


@dataclass(frozen=True)
class ResultPublished:
    """A result published to a site, as ``ResultsService.list_after`` returns it."""

    event_id: int
    site_id: int
    seq: int
    result: ResultRecord


# ---- the commit-order gap --------------------------------------------------------------------
class EventCursor:
    """Which event ids have been read. ``condition()`` selects the rows not read yet: ids above the
    highest one read, and the ids skipped below it (not committed yet when a higher one was read),
    each re-read for ``window_seconds`` after the gap was seen. ``new(rows)`` returns the rows not
    returned before, each exactly once."""

    def __init__(
        self,
        start: int,
        *,
        window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_gap: int = 10_000,
    ) -> None:
        self._last = start  # nothing at or below the start is returned, except a known gap
        self._missing: dict[int, float] = {}  # skipped id -> when to stop looking for it
        self._window = window_seconds
        self._clock = clock
        self._max_gap = max_gap

    @property
    def last(self) -> int:
        return self._last

    @property
    def gaps(self) -> frozenset[int]:
        return frozenset(self._missing)

    def condition(self) -> Any:
        self._expire()
        if not self._missing:
            return events.c.id > self._last
        return or_(events.c.id > self._last, events.c.id.in_(sorted(self._missing)))

    def new(self, rows: Sequence[Any]) -> list[Any]:
        self._expire()
        fresh = []
        for row in sorted(rows, key=lambda r: int(r.event_id)):
            event_id = int(row.event_id)
            if event_id > self._last:
                self._skip(self._last + 1, event_id)
                self._last = event_id
                fresh.append(row)
            elif self._missing.pop(event_id, None) is not None:
                fresh.append(row)  # committed after a later id: delivered now, once
        return fresh

    def _skip(self, low: int, high: int) -> None:
        """Ids ``low`` .. ``high - 1`` were not there when ``high`` was: remember them."""
        if high - low > self._max_gap:  # a sequence jump, not transactions in flight
            log.warning("event id jump", extra={"count": high - low})
            low = high - self._max_gap
        until = self._clock() + self._window
        for event_id in range(low, high):
            self._missing[event_id] = until

    def _expire(self) -> None:
        now = self._clock()
        if any(until <= now for until in self._missing.values()):
            self._missing = {k: v for k, v in self._missing.items() if v > now}


# ---- subscriptions ---------------------------------------------------------------------------
@dataclass(eq=False)
class Subscription:
    """One stream's inbox. The feed thread appends; the stream's task takes on its own loop."""

    key: tuple[Any, ...]
    floor: int
    loop: asyncio.AbstractEventLoop
    max_pending: int
    items: deque[Any] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    behind: bool = False
    closed: bool = False

    def offer(self, batch: list[Any]) -> None:
        """Called by the feed thread with its lock held."""
        if self.behind:
            return
        if len(self.items) + len(batch) > self.max_pending:
            self.behind = True
            self.items.clear()
        else:
            self.items.extend(batch)

    async def take(self) -> list[Any] | None:
        """The items waiting (at least one), or None once the feed has closed."""
        while True:
            if self.behind:
                raise Unavailable(
                    "this watch fell behind the hub's event feed; watch again for a fresh snapshot",
                    reason="WATCH_BEHIND",
                    metadata={"max_pending": str(self.max_pending)},
                )
            out = []
            while self.items:  # the feed thread may append meanwhile: popleft is atomic
                out.append(self.items.popleft())
            if out:
                return out
            if self.closed:
                return None
            self.ready.clear()
            if self.items or self.behind or self.closed:
                continue
            await self.ready.wait()


def _wake(subs: Iterable[Subscription]) -> None:
    for sub in subs:
        sub.ready.set()


# ---- the feed --------------------------------------------------------------------------------
class WatchFeed:
    def __init__(
        self,
        *,
        engine: Engine,
        bus: EventBus,
        queue: QueueService,
        results: ResultsService,
        directory: Directory,
        poll_seconds: float = 1.0,
        min_interval_seconds: float = 0.05,
        window_seconds: float = 60.0,
        max_pending: int = 10_000,
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._queue = queue
        self._results = results
        self._directory = directory
        self._poll = poll_seconds
        self._min_interval = min_interval_seconds
        self._window = window_seconds
        self._max_pending = max_pending
        self._lock = threading.Lock()  # the subscriptions, and the cursor's advance with its hand-out
        self._reading = threading.Lock()  # one read at a time (the thread, or a caller of poll)
        self._subs: dict[tuple[Any, ...], set[Subscription]] = {}
        self._cursor: EventCursor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._conn: Connection | None = None  # the feed's own connection, held between reads
        self._query = _events_query()
        self.reads = 0  # queries of the events table, for tests and status

    # ---- life cycle ----------------------------------------------------------------------
    def _ensure_cursor(self) -> EventCursor:
        with self._lock:
            if self._cursor is None:
                with reading(self._engine) as conn:
                    start = conn.execute(select(func.max(events.c.id))).scalar() or 0
                self._cursor = EventCursor(int(start), window_seconds=self._window)
            return self._cursor

    def start(self) -> None:
        self._ensure_cursor()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="watch-feed", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._bus.publish()  # wake the thread
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._reading.acquire(timeout=10):  # not while a read hangs on an unreachable database
            try:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()
            finally:
                self._reading.release()
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
            for sub in subs:
                sub.closed = True
        self._wake(subs)

    def _run(self) -> None:
        seen = self._bus.generation()
        last_read = 0.0
        while not self._stop.is_set() and not self._bus.closed:
            pause = self._min_interval - (time.monotonic() - last_read)
            if pause > 0 and self._stop.wait(pause):  # a burst of commits is read once
                break
            last_read = time.monotonic()
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the database may be away; try again later
                log.warning("watch feed read failed", exc_info=True)
                self._stop.wait(self._poll)
            seen = self._bus.wait(seen, self._poll)
            # Nobody watching: a commit's wake-up is not worth a read; the poll keeps the cursor near.
            while not self.subscribers() and not self._stop.is_set() and not self._bus.closed:
                left = self._poll - (time.monotonic() - last_read)
                if left <= 0:
                    break
                seen = self._bus.wait(seen, left)

    # ---- one read ------------------------------------------------------------------------
    def poll(self) -> int:
        """Read the events not read yet and hand them to the subscriptions; returns how many."""
        with self._reading:
            return self._read(self._ensure_cursor())

    def _connection(self) -> Connection:
        """The feed's connection (opened, with the pool's liveness check, when there is none)."""
        if self._conn is None:
            self._conn = reading(self._engine)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # after a failure its state is unknown: never back into the pool
                conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def _read(self, cursor: EventCursor) -> int:
        total = 0
        while True:
            conn = self._connection()
            try:
                rows = conn.execute(self._query.where(cursor.condition())).all()
                self.reads += 1
                published = self._published(conn, rows)
                conn.rollback()  # each read its own transaction: the next one sees later commits
            except BaseException:
                self._drop_connection()
                raise
            with self._lock:
                keys = set(self._subs)
            changes = self._changes(rows, keys)  # only the keys someone watches
            with self._lock:  # a subscription starts before or after this batch, never inside it
                fresh = {int(r.event_id) for r in cursor.new(rows)}
                joined = set(self._subs) - keys  # subscribed meanwhile: this batch is theirs too
                if joined:
                    changes += self._changes(rows, joined)
                woken = self._offer(
                    [c for c in changes if c[1].event_id in fresh]
                    + [(("results", p.site_id), p) for p in published if p.event_id in fresh]
                )
            self._wake(woken)
            total += len(fresh)
            if len(rows) < READ_BATCH:
                return total

    def _published(self, conn: Any, rows: Sequence[Any]) -> list[ResultPublished]:
        """The results rows of the result events among ``rows`` (one query per site)."""
        wanted: dict[int, dict[int, int]] = {}  # site -> seq -> event id
        for r in rows:
            if r.event_type in RESULT_TYPES and r.event_site_id is not None:
                seq = _cursor_of(r.event_detail)
                if seq:
                    wanted.setdefault(int(r.event_site_id), {})[seq] = int(r.event_id)
        out = []
        for site_id, seqs in wanted.items():
            query = result_query(site_id).where(results.c.seq.in_(sorted(seqs)))
            for row in conn.execute(query):
                item = result_of(row._mapping)
                out.append(ResultPublished(event_id=seqs[item.seq], site_id=site_id, seq=item.seq, result=item))
        out.sort(key=lambda p: p.event_id)
        return out

    @staticmethod
    def _changes(rows: Sequence[Any], keys: set[tuple[Any, ...]]) -> list[tuple[tuple[Any, ...], WorklistChange]]:
        """Worklist changes for the subscription ``keys`` (the event's hospital and specialty)."""
        out = []
        for r in rows:
            key = ("worklist", r.event_hospital, r.event_specialty)
            if key in keys and r.event_type in WORKLIST_TYPES and r.id is not None:  # r.id: the exam row is there
                exam = {c.name: r._mapping[c] for c in exams.c}
                exam["claimed_by_name"] = r.claimed_by_name or ""
                change = WorklistChange(
                    event_id=int(r.event_id), type=r.event_type, at=r.event_at, exam=exam, site_code=r.site_code or ""
                )
                out.append((key, change))
        return out

    def _offer(self, items: Sequence[tuple[tuple[Any, ...], Any]]) -> list[Subscription]:
        """Hand each item to the subscriptions of its key (the feed's lock held)."""
        batches: dict[tuple[Any, ...], list[Any]] = {}
        for key, item in items:
            batches.setdefault(key, []).append(item)
        woken = []
        for key, batch in batches.items():
            for sub in self._subs.get(key, ()):
                sub.offer(batch)
                woken.append(sub)
        return woken

    @staticmethod
    def _wake(subs: Sequence[Subscription]) -> None:
        """Set each subscription's event on its own loop: one call per loop, not per stream."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Subscription]] = {}
        for sub in subs:
            by_loop.setdefault(sub.loop, []).append(sub)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake, group)
            except RuntimeError:  # that loop is closed: its streams are gone
                pass

    # ---- subscriptions -------------------------------------------------------------------
    def _subscribe(self, key: tuple[Any, ...]) -> Subscription:
        cursor = self._ensure_cursor()
        loop = asyncio.get_running_loop()
        with self._lock:
            sub = Subscription(key=key, floor=cursor.last, loop=loop, max_pending=self._max_pending)
            self._subs.setdefault(key, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.get(sub.key)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[sub.key]

    def subscribers(self) -> int:
        with self._lock:
            return sum(len(group) for group in self._subs.values())

    # ---- the streams ---------------------------------------------------------------------
    def _snapshot(self, p: Principal) -> list[SnapshotExam]:
        rows = self._queue.worklist(p, limit=SNAPSHOT_LIMIT, include_claimed=True)
        codes = self._directory.site_codes({int(r["site_id"]) for r in rows})
        return [SnapshotExam(exam=r, site_code=codes.get(int(r["site_id"]), "")) for r in rows]

    async def worklist(self, p: Principal, *, batched: bool = False) -> AsyncIterator[WorklistItem]:
        """A reader's worklist: the snapshot, its end with the feed's event id, then every event
        of the reader's hospital and specialty read after that, until the feed closes; with
        ``batched``, the events waiting for the stream as one :class:`WorklistChanges` (one write
        to the client for a burst instead of one per event)."""
        hospital, specialty = require_reader(p)
        sub = self._subscribe(("worklist", hospital, specialty))  # before the snapshot: nothing falls between
        try:
            for item in await asyncio.to_thread(self._snapshot, p):
                yield item
            yield SnapshotEnd(event_id=sub.floor)
            while (batch := await sub.take()) is not None:
                if batched:
                    yield WorklistChanges(tuple(batch))
                    continue
                for change in batch:
                    yield change
        finally:
            self._unsubscribe(sub)

    async def results(self, p: Principal, *, after: int) -> AsyncIterator[ResultRecord | ResultsLive]:
        """The caller's site's results after cursor ``after``, in cursor order without gaps or
        repeats, then (after one :class:`ResultsLive`) each new one as it is published, until the
        feed closes."""
        site_id = require_result_reader(p)
        if after < 0:
            raise InvalidInput("cursor cannot be negative", reason="BAD_CURSOR")
        sub = self._subscribe(("results", site_id))  # before catching up: nothing falls between
        cursor = after
        try:
            async for row in self._catch_up(p, cursor):
                cursor = row.seq
                yield row
            yield ResultsLive(cursor=cursor)
            while (batch := await sub.take()) is not None:
                for item in batch:
                    if item.seq <= cursor:
                        continue  # already sent by a catch-up
                    if item.seq == cursor + 1:
                        cursor = item.seq
                        yield item.result
                        continue
                    async for row in self._catch_up(p, cursor):  # a gap: read it from the table
                        cursor = row.seq
                        yield row
        finally:
            self._unsubscribe(sub)

    async def _catch_up(self, p: Principal, after: int) -> AsyncIterator[ResultRecord]:
        while True:
            rows = await asyncio.to_thread(self._results.list_after, p, after=after, limit=RESULTS_PAGE)
            for row in rows:
                after = row.seq
                yield row
            if len(rows) < RESULTS_PAGE:
                return


def _events_query() -> Select[Any]:
    """The feed's read without its condition: the events, and for worklist events the exam as it is
    now (with its claimer's name and its site's code). Built once; each read adds the cursor's."""
    claimer = principals.alias("claimer")
    return (
        select(
            events.c.id.label("event_id"),
            events.c.type.label("event_type"),
            events.c.at.label("event_at"),
            events.c.site_id.label("event_site_id"),
            events.c.hospital.label("event_hospital"),
            events.c.specialty.label("event_specialty"),
            events.c.detail.label("event_detail"),
            exams,
            claimer.c.name.label("claimed_by_name"),
            sites.c.code.label("site_code"),
        )
        .select_from(
            events.outerjoin(exams, and_(events.c.exam_id == exams.c.id, events.c.type.in_(WORKLIST_TYPES)))
            .outerjoin(claimer, exams.c.claimed_by == claimer.c.id)
            .outerjoin(sites, exams.c.site_id == sites.c.id)
        )
        .order_by(events.c.id)
        .limit(READ_BATCH)
    )


def _cursor_of(detail: str | None) -> int:
    try:
        value = json.loads(detail or "{}").get("cursor", 0)
    except (ValueError, AttributeError):
        return 0
    return int(value) if isinstance(value, int) else 0
