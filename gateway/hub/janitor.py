"""The hub's clean-up: what uploads leave behind goes, by itself; the records stay.

Each pass, in this order:

1. Exams still ``receiving`` with no activity for the abandoned period (the exam row, its uploads'
   rows, and the staged bytes of its partial uploads) expire: state ``expired`` and an ``expired``
   event in one transaction, their uploads ``expired`` (refused ones keep their state and their
   refusal records), their object rows deleted; then their staged files are deleted, and the stored
   bytes of each deleted row unless another row still names the same key (keys are content hashes:
   the same bytes in another exam share them). A row another exam's upload points to (a duplicate
   acknowledged against it) is kept, with its bytes. Exams expired earlier that something still
   went into (a stream that raced the expiry) are cleaned the same way.
2. Staging files (``<upload id>.part``) of uploads that are no longer partial are deleted, and so
   are staging files no upload row knows and temporary folders a check left behind, once older
   than the grace period. A partial upload's file is never touched.
3. Stored objects that no ``objects`` row names are deleted once older than the grace period (an
   object is written before its row; the period covers that gap).
4. Signed report versions with no printed report recorded get it rendered (``report_pdfs``, the
   hub's ``ReportPdfService.render_missing``): the hub stopped between the signature and the
   rendering, or had no font then. Printed reports live under ``t<site>/reports/``, which step 3
   never looks at.
5. Large JPEG 2000 images of committed exams with no viewer's copy get it made (``renditions``, the
   hub's ``RenditionService.build_missing``); the copies live under ``t<site>/renditions/``, which
   step 3 never looks at either.

Before any stored bytes are deleted the database is asked again, in this order, whether a partial
upload of the same site and content is under way (its row may be on its way) and whether a row
names the key. A crash between the database and the store leaves only unreferenced bytes, which a
later pass sweeps. Passes log counts only, never keys or identifiers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from sqlalchemy import ColumnElement, Engine, delete, exists, select

from teleread.db.engine import as_utc, reading, utcnow
from teleread.db.schema import exams, objects, sites, uploads
from teleread import lifecycle
from teleread.gateway.hub import dicom_index
from teleread.gateway.hub.staging import PART_SUFFIX
from teleread.storage import ObjectStore
from teleread.vocab import ExamState, UploadStatus

log = logging.getLogger("teleread.janitor")

BATCH = 500  # ids or keys per IN (...) list
LIVE = UploadStatus.PARTIAL
HOLDING = lifecycle.HOLDING_UPLOADS  # an upload that points to an object row
EXPIRING = (LIVE, *HOLDING)  # upload states an expiry changes; refused and rejected stay as they are
_KEY = re.compile(r"^t([1-9][0-9]*)/objects/([0-9a-f]{2})/([0-9a-f]{64})$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_T = TypeVar("_T")


@dataclass
class JanitorReport:
    """What one pass did (counts only)."""

    exams_expired: int = 0
    uploads_expired: int = 0
    object_rows_deleted: int = 0
    objects_deleted: int = 0  # stored objects of expired exams
    staging_files_deleted: int = 0  # staged files and left-behind temporary folders
    orphans_deleted: int = 0  # stored objects no row named
    pdfs_rendered: int = 0  # signed report versions that had no printed report
    renditions_made: int = 0  # viewer's copies of large JPEG 2000 images that were missing
    errors: int = 0  # steps or exams that failed (tried again next pass)

    def summary(self) -> str:
        return ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name)}" for f in fields(self))


class _Stopped(Exception):
    """The hub is closing: the pass ends where it is (the next one carries on)."""


class Janitor:
    def __init__(
        self,
        *,
        engine: Engine,
        store: ObjectStore,
        staging_dir: Path,
        abandoned_after: timedelta = timedelta(hours=48),
        grace: timedelta = timedelta(hours=1),
        interval_seconds: float = 600.0,
        first_seconds: float = 60.0,
        clock: Callable[[], datetime] = utcnow,
        report_pdfs: Callable[[], int] | None = None,
        renditions: Callable[[], int] | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._staging = staging_dir
        self._abandoned = abandoned_after
        self._grace = grace
        self._interval = interval_seconds
        self._first = first_seconds
        self._clock = clock
        self._report_pdfs = report_pdfs
        self._renditions = renditions
        self._stop = threading.Event()
        self._pass_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last_report: JanitorReport | None = None

    # ---- the background thread ----------------------------------------------------------------
    def start(self) -> None:
        """Run a pass ``first_seconds`` after now and then every ``interval_seconds`` (0: never)."""
        if self._interval <= 0 or self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="janitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        delay = max(0.0, self._first)
        while not self._stop.wait(delay):
            try:
                self.run_once()
            except Exception as exc:  # never let the thread die; the type only, never the text
                log.error("clean-up pass failed", extra={"reason": type(exc).__name__})
            delay = self._interval

    # ---- one pass -----------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> JanitorReport:
        """One pass at ``now`` (the hub's UTC clock by default)."""
        at = _utc(now if now is not None else self._clock())
        report = JanitorReport()
        with self._pass_lock:
            steps = (self._expire_abandoned, self._sweep_staging, self._sweep_orphans, self._render_pdfs,
                     self._make_renditions)  # fmt: skip
            for step in steps:
                try:
                    step(at, report)
                except _Stopped:
                    break
                except Exception as exc:
                    report.errors += 1
                    log.warning("clean-up step failed", extra={"reason": type(exc).__name__})
            self.passes += 1
            self.last_report = report
        total = sum(getattr(report, f.name) for f in fields(report) if f.name != "errors")
        log.info("clean-up pass: %s", report.summary(), extra={"count": total})
        return report

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()

    # ---- 1. abandoned exams -------------------------------------------------------------------
    def _expire_abandoned(self, now: datetime, report: JanitorReport) -> None:
        cutoff = now - self._abandoned
        quiet = ~exists().where(uploads.c.exam_id == exams.c.id, uploads.c.updated_at >= cutoff)
        with reading(self._engine) as conn:
            site_ids = list(conn.execute(select(sites.c.id)).scalars())
            abandoned: list[tuple[str, int]] = []
            leftovers: list[tuple[str, int]] = []
            for site_id in site_ids:  # per site: the (site_id, state) index
                abandoned += [
                    (r.id, r.site_id)
                    for r in conn.execute(
                        select(exams.c.id, exams.c.site_id).where(
                            exams.c.site_id == site_id,
                            exams.c.state == ExamState.RECEIVING,
                            exams.c.updated_at < cutoff,
                            quiet,
                        )
                    )
                ]
                leftovers += [
                    (r.id, r.site_id)
                    for r in conn.execute(
                        select(exams.c.id, exams.c.site_id).where(
                            exams.c.site_id == site_id, exams.c.state == ExamState.EXPIRED, _holds_something()
                        )
                    )
                ]
            live = {
                str(r.id): str(r.exam_id)
                for batch in _batches([e for e, _ in abandoned])
                for r in conn.execute(
                    select(uploads.c.id, uploads.c.exam_id).where(uploads.c.exam_id.in_(batch), uploads.c.state == LIVE)
                )
            }
        streaming = {exam_id for upload_id, exam_id in live.items() if self._staged_since(upload_id, cutoff)}
        for exam_id, site_id in abandoned:
            if exam_id not in streaming:  # a slow stream keeps its exam open: it is not abandoned
                self._clean_exam(exam_id, site_id, now=now, cutoff=cutoff, report=report)
        for exam_id, site_id in leftovers:
            self._clean_exam(exam_id, site_id, now=now, cutoff=None, report=report)

    def _staged_since(self, upload_id: str, cutoff: datetime) -> bool:
        try:
            mtime = (self._staging / f"{upload_id}{PART_SUFFIX}").stat().st_mtime
        except FileNotFoundError:
            return False
        return datetime.fromtimestamp(mtime, tz=timezone.utc) >= cutoff

    def _clean_exam(
        self, exam_id: str, site_id: int, *, now: datetime, cutoff: datetime | None, report: JanitorReport
    ) -> None:
        """Expire the exam (``cutoff`` given: only if it is still receiving and quiet), or clean what
        went into an exam already expired; then delete its staged and stored bytes."""
        self._check_stop()
        try:
            with self._engine.begin() as conn:
                ups = list(
                    conn.execute(
                        select(uploads.c.id).where(uploads.c.exam_id == exam_id, uploads.c.state.in_(EXPIRING))
                    ).scalars()
                )
                own = conn.execute(
                    select(objects.c.id, objects.c.storage_key).where(objects.c.exam_id == exam_id)
                ).all()
                relied_on = {
                    str(object_id)
                    for batch in _batches([o.id for o in own])
                    for object_id in conn.execute(
                        select(uploads.c.object_id).where(
                            uploads.c.object_id.in_(batch), uploads.c.exam_id != exam_id, uploads.c.state.in_(HOLDING)
                        )
                    ).scalars()
                }
                gone = [o for o in own if o.id not in relied_on]
                if cutoff is not None:
                    # Only if still receiving and quiet: an upload arriving meanwhile (its row newer
                    # than the cutoff) means the exam was not abandoned after all, and nothing changes.
                    quiet = ~exists().where(uploads.c.exam_id == exams.c.id, uploads.c.updated_at >= cutoff)
                    moved = lifecycle.move_exam(
                        conn,
                        exam_id,
                        ExamState.EXPIRED,
                        event="expired",
                        expect=ExamState.RECEIVING,
                        when=(exams.c.updated_at < cutoff) & quiet,
                        values={"updated_at": now},
                        detail={"uploads": len(ups), "objects": len(gone)},
                    )
                    if moved is None:
                        return
                for batch in _batches(ups):
                    lifecycle.move_uploads(
                        conn, batch, UploadStatus.EXPIRED, values={"object_id": None, "updated_at": now}
                    )
                for batch in _batches([o.id for o in gone]):
                    dicom_index.forget(conn, batch)
                    conn.execute(delete(objects).where(objects.c.id.in_(batch), objects.c.exam_id == exam_id))
        except Exception as exc:
            report.errors += 1
            log.warning("expiring an exam failed", extra={"reason": type(exc).__name__})
            return
        if cutoff is not None:
            report.exams_expired += 1
        report.uploads_expired += len(ups)
        report.object_rows_deleted += len(gone)
        try:  # what fails here is left to the staging and orphan sweeps of this or a later pass
            for upload_id in ups:
                if _unlink(self._staging / f"{upload_id}{PART_SUFFIX}"):
                    report.staging_files_deleted += 1
            report.objects_deleted += self._delete_unreferenced(sorted({str(o.storage_key) for o in gone}))
        except _Stopped:
            raise
        except Exception as exc:
            report.errors += 1
            log.warning("deleting an expired exam's bytes failed", extra={"reason": type(exc).__name__})

    # ---- 2. staging ---------------------------------------------------------------------------
    def _sweep_staging(self, now: datetime, report: JanitorReport) -> None:
        cutoff = now - self._grace
        try:
            entries = list(os.scandir(self._staging))
        except FileNotFoundError:
            return
        parts = {e.name[: -len(PART_SUFFIX)]: e for e in entries if e.name.endswith(PART_SUFFIX) and _plain_file(e)}
        states: dict[str, str] = {}
        with reading(self._engine) as conn:
            for batch in _batches([i for i in parts if _UPLOAD_ID.match(i)]):
                states.update(
                    (str(r.id), str(r.state))
                    for r in conn.execute(select(uploads.c.id, uploads.c.state).where(uploads.c.id.in_(batch)))
                )
        for upload_id, entry in parts.items():
            self._check_stop()
            state = states.get(upload_id)
            if state == LIVE:
                continue  # a live upload: its size is the offset the hub confirms
            if state is None and not _older(entry, cutoff):
                continue  # no row: perhaps another hub's write just starting
            if _unlink(Path(entry.path)):
                report.staging_files_deleted += 1
        for entry in entries:  # folders a validation left behind when the hub stopped mid-way
            if entry.name.startswith("tmp") and entry.is_dir(follow_symlinks=False) and _older(entry, cutoff):
                shutil.rmtree(entry.path, ignore_errors=True)
                report.staging_files_deleted += 1

    # ---- 3. objects without a row --------------------------------------------------------------
    def _sweep_orphans(self, now: datetime, report: JanitorReport) -> None:
        cutoff = now - self._grace
        with reading(self._engine) as conn:
            site_ids = list(conn.execute(select(sites.c.id)).scalars())
        for site_id in site_ids:
            known: set[bytes] | None = None
            candidates: list[str] = []
            for key, modified in self._store.iter_keys(f"t{site_id}/objects/"):
                self._check_stop()
                match = _KEY.match(key)
                if match is None or int(match[1]) != site_id or match[3][:2] != match[2]:
                    continue  # not a key this hub writes: not ours to judge
                if _utc(modified) >= cutoff:
                    continue  # its row may be on its way
                if known is None:
                    known = self._site_contents(site_id)
                if bytes.fromhex(match[3]) in known:
                    continue
                candidates.append(key)
                if len(candidates) >= BATCH:
                    report.orphans_deleted += self._delete_unreferenced(candidates)
                    candidates = []
            report.orphans_deleted += self._delete_unreferenced(candidates)

    # ---- 4. printed reports ----------------------------------------------------------------------
    def _render_pdfs(self, now: datetime, report: JanitorReport) -> None:
        if self._report_pdfs is not None:
            self._check_stop()
            report.pdfs_rendered += self._report_pdfs()

    # ---- 5. viewer's copies ----------------------------------------------------------------------
    def _make_renditions(self, now: datetime, report: JanitorReport) -> None:
        if self._renditions is not None:
            self._check_stop()
            report.renditions_made += self._renditions()

    def _site_contents(self, site_id: int) -> set[bytes]:
        """The SHA-256 of every object row of the site (32 bytes each: a site's set stays small)."""
        with reading(self._engine) as conn:
            rows = conn.execute(select(objects.c.sha256).where(objects.c.site_id == site_id))
            return {bytes.fromhex(str(sha)) for sha in rows.scalars()}

    # ---- deleting stored bytes ----------------------------------------------------------------
    def _delete_unreferenced(self, keys: Sequence[str]) -> int:
        """Delete each key no row names and no partial upload of the same bytes may still name."""
        deleted = 0
        for batch in _batches(list(keys)):
            self._check_stop()
            needed = self._still_needed(batch)
            for key in batch:
                if key not in needed:
                    self._store.delete(key)
                    deleted += 1
        return deleted

    def _still_needed(self, keys: Sequence[str]) -> set[str]:
        by_content: dict[tuple[int, str], str] = {}
        for key in keys:
            match = _KEY.match(key)
            if match is not None:
                by_content[(int(match[1]), match[3])] = key
        needed: set[str] = set()
        with reading(self._engine) as conn:
            # Uploads first, rows second: an upload leaves "partial" in the transaction that inserts
            # its row, so whichever side of that commit each query falls, one of them sees it.
            for site_id in sorted({site for site, _ in by_content}):
                shas = [sha for site, sha in by_content if site == site_id]
                for batch in _batches(shas):
                    busy = conn.execute(
                        select(uploads.c.sha256).where(
                            uploads.c.site_id == site_id, uploads.c.state == LIVE, uploads.c.sha256.in_(batch)
                        )
                    ).scalars()
                    needed.update(by_content[(site_id, str(sha))] for sha in busy)
            named = conn.execute(select(objects.c.storage_key).where(objects.c.storage_key.in_(list(keys)))).scalars()
            needed.update(str(k) for k in named)
        return needed


def _holds_something() -> ColumnElement[bool]:
    """An expired exam that still has a live or holding upload, or an object row no other exam's
    upload points to (what a stream racing the expiry may have added)."""
    other_holds = exists().where(
        uploads.c.object_id == objects.c.id, uploads.c.exam_id != objects.c.exam_id, uploads.c.state.in_(HOLDING)
    )
    return exists().where(uploads.c.exam_id == exams.c.id, uploads.c.state.in_(EXPIRING)) | exists().where(
        objects.c.exam_id == exams.c.id, ~other_holds
    )


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _utc(value: datetime) -> datetime:
    aware = as_utc(value)
    assert aware is not None
    return aware.astimezone(timezone.utc)


def _plain_file(entry: os.DirEntry[str]) -> bool:
    return entry.is_file(follow_symlinks=False)


def _older(entry: os.DirEntry[str], cutoff: datetime) -> bool:
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    return datetime.fromtimestamp(mtime, tz=timezone.utc) < cutoff


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
