"""The viewer's copy of each large JPEG 2000 image: made once after its exam is committed, kept in
the object store, served to viewers that take any transfer syntax.

A browser decodes JPEG 2000 in WebAssembly on one thread: a 3300 x 3300 radiograph takes it some
3 s here, which is most of the time to its first full-resolution image. The same pixels as an HTJ2K
lossless codestream decode some 20 times faster. After an exam is committed (``submit``, beside
triage), each of its DICOM instances that is one large unsigned grey JPEG 2000 frame
(``teleread.pixels.wants_rendition``) is copied out hash-verified, transcoded in one of the hub's
niced worker processes (``teleread/pixels.py``: kept only if it decodes back to exactly the stored
values), stored under ``t<site>/renditions/`` (``rendition_key``) and recorded on the instance's
``dicom_metadata`` row. WADO-RS then answers a frame request that accepts any syntax
(``transfer-syntax=*``, as OHIF asks) with the copy, labelled
``transfer-syntax=1.2.840.10008.1.2.4.201``; until it is there, and for every other request, the
frame is answered as stored or decoded, as before. The stored instance is never changed.

Nothing is lost when the hub stops first: the clean-up pass makes what is missing
(:meth:`RenditionService.build_missing`). Only committed exams get copies, and their objects are
kept for the retention period, so a copy never outlives its instance. Logs carry the object id and
a reason, never patient data.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update

from teleread.cpu import CpuPool
from teleread.db.engine import reading
from teleread.db.schema import dicom_metadata, exams, objects
from teleread.pixels import RENDITION_MIN_PIXELS, RENDITION_SOURCES, htj2k_rendition
from teleread.storage import ObjectStore, rendition_key
from teleread.vocab import ExamState

log = logging.getLogger("teleread.renditions")
REPAIR_BATCH = 50


class RenditionService:
    def __init__(self, *, engine: Engine, store: ObjectStore, spool_dir: Path, cpu: CpuPool | None = None) -> None:
        self._engine = engine
        self._store = store
        self._spool = Path(spool_dir)
        self._cpu = cpu or CpuPool(0)
        self._executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rendition")
        self._lock = threading.Lock()
        self._pending: set[futures.Future[None]] = set()

    def submit(self, exam_id: str) -> None:
        """Make the committed exam's copies soon, on the service's thread."""
        try:
            future = self._executor.submit(self._build_quietly, exam_id)
        except RuntimeError:  # closing: the clean-up pass makes them
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait for every exam queued so far; False if ``timeout`` passed first."""
        with self._lock:
            pending = set(self._pending)
        _, not_done = futures.wait(pending, timeout=timeout)
        return not not_done

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def build_missing(self, *, limit: int = REPAIR_BATCH) -> int:
        """Make the copies committed exams still lack (the hub stopped first); how many were made."""
        return sum(self._build(row) for row in self._wanting(limit=limit))

    def _build_quietly(self, exam_id: str) -> None:
        for row in self._wanting(exam_id=exam_id):
            self._build(row)

    def _wanting(self, *, exam_id: str = "", limit: int | None = None) -> list[Any]:
        """The instances (of one exam, or of any committed one) that should have a copy and have none."""
        query = (
            select(objects.c.id, objects.c.site_id, objects.c.storage_key, objects.c.sha256, objects.c.size)
            .join(dicom_metadata, dicom_metadata.c.object_id == objects.c.id)
            .join(exams, exams.c.id == objects.c.exam_id)
            .where(
                objects.c.role == "dicom",
                objects.c.transfer_syntax_uid.in_(RENDITION_SOURCES),
                objects.c.number_of_frames == 1,
                objects.c.pixel_rows * objects.c.pixel_columns >= RENDITION_MIN_PIXELS,
                dicom_metadata.c.rendition_key.is_(None),
                exams.c.state.not_in((ExamState.RECEIVING, ExamState.REJECTED, ExamState.EXPIRED)),
            )
            .order_by(objects.c.created_at)
        )
        if exam_id:
            query = query.where(objects.c.exam_id == exam_id)
        if limit is not None:
            query = query.limit(limit)
        with reading(self._engine) as conn:
            return list(conn.execute(query).all())

    def _build(self, row: Any) -> bool:
        """One instance's copy, stored and recorded; False (logged) if it is not made. An instance
        the copy cannot be made for is marked so (an empty key) and not tried again; a store that
        fails leaves it for the next pass."""
        object_id = str(row.id)
        try:
            self._spool.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self._spool, prefix="rendition-") as tmp:
                source, target = Path(tmp) / "source.dcm", Path(tmp) / "copy.htj2k"
                with self._store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as raw:
                    with open(source, "wb") as out:
                        while block := raw.read(1 << 20):
                            out.write(block)
                try:
                    made = self._cpu.run(htj2k_rendition, source, target)
                    reason = "NOT_ELIGIBLE"
                except Exception as exc:  # noqa: BLE001 - the file decodes no better next time
                    made, reason = None, type(exc).__name__
                if made is None:
                    self._record(object_id, key="", sha256=None, size=None)
                    log.info("no viewer copy for this instance", extra={"object_id": object_id, "reason": reason})
                    return False
                sha256, size = made
                key = rendition_key(tenant_id=int(row.site_id), sha256=sha256)
                self._store.put_file(key, target, sha256=sha256, size=size, consume=True)
            self._record(object_id, key=key, sha256=sha256, size=size)
        except Exception as exc:  # noqa: BLE001 - the frame is served as stored meanwhile
            log.warning("viewer copy not made", extra={"object_id": object_id, "reason": type(exc).__name__})
            return False
        log.info("viewer copy made", extra={"object_id": object_id, "bytes": size})
        return True

    def _record(self, object_id: str, *, key: str, sha256: str | None, size: int | None) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(dicom_metadata)
                .where(dicom_metadata.c.object_id == object_id)
                .values(rendition_key=key, rendition_sha256=sha256, rendition_size=size)
            )
