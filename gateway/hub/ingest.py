"""The hub's ingest service: exams opened, objects received in resumable chunks, verified,
validated, stored, and exams committed for triage; the patient context of each exam is recorded
from its files and its upload request (``patient_context.py``).

Order of durability: bytes are staged on local disk under a server-generated upload id; when the
last byte arrives the SHA-256 is checked and the content validated; the object is written to the
object store (content-addressed key) and only then is its metadata row inserted. Nothing a reader
or a site can see refers to an object before both are done.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import logging
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import Connection, Engine, Row, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError as DbIntegrityError

from teleread.auth import Principal, require_uploader
from teleread.backoff import Backoff
from teleread.clock import Clock, SystemClock
from teleread.cpu import CpuPool
from teleread.db.engine import reading, utcnow
from teleread.db.schema import conflicts, dicom_series, exams, objects, refusals, sites, uploads
from teleread.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    TelereadError,
    Unavailable,
)
from teleread import lifecycle
from teleread.events import EventBus, record_event
from teleread.files import sha256_hex
from teleread.gateway import validate
from teleread.dicom_index import DicomIndex
from teleread.gateway.hub import dicom_index, patient_context
from teleread.gateway.hub.staging import MAX_CHUNK, Staging
from teleread.storage import ObjectStore, object_key
from teleread.patient import PatientContext
from teleread.reader.hub.routing import Routing
from teleread.vocab import ExamKind, ExamState, ObjectRole, Priority, UploadStatus, is_ecg

log = logging.getLogger("teleread.ingest")

ROLES = tuple(ObjectRole)
KINDS = tuple(ExamKind)
PRIORITIES = tuple(Priority)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REFUSED_UPLOAD_STATES = lifecycle.REFUSED_UPLOADS
# refusals that depend on the exam, not on the bytes alone: another exam may take the same bytes
EXAM_SCOPED_REASONS = frozenset(
    {"STUDY_MISMATCH", "INSTANCE_UID_CONFLICT", "WFDB_SIGNAL_SIZE_MISMATCH", "WFDB_INCOMPLETE", "MIXED_EXAM",
     "NO_VALID_OBJECTS"}
)  # fmt: skip
_REFUSAL_ERRORS: dict[str, type[TelereadError]] = {"INVALID_ARGUMENT": InvalidInput, "ALREADY_EXISTS": AlreadyExists}


@dataclass(frozen=True)
class UploadState:
    upload_id: str
    committed_offset: int
    size: int
    state: str  # partial, stored, duplicate
    object_row: dict[str, object] | None = None


WRITER_LEASE_SECONDS = 30.0  # a stream's hold on its upload, renewed while bytes arrive
WRITER_WAIT_SECONDS = 30.0  # how long a resumed stream waits for the cut one's handler to let go


def new_id() -> str:
    return uuid.uuid4().hex


class IngestService:
    def __init__(
        self,
        *,
        engine: Engine,
        store: ObjectStore,
        staging_dir: Path,
        routing: Routing,
        bus: EventBus,
        on_committed: Callable[[str], None],
        max_object_bytes: int,
        cpu: CpuPool | None = None,
        clock: Clock | None = None,
        instance: str = "",
        writer_wait_seconds: float = WRITER_WAIT_SECONDS,
    ) -> None:
        self._engine = engine
        self._store = store
        self._staging = Staging(staging_dir)
        self._routing = routing
        self._bus = bus
        self._on_committed = on_committed
        self._max_bytes = max_object_bytes
        self._cpu = cpu or CpuPool(0)
        self._clock = clock or SystemClock()
        # Names this hub's streams in the writer leases; the same on a restart of the same hub (its
        # host and staging folder), so a restarted hub frees its dead streams' leases at once.
        self._instance = instance or sha256_hex(f"{socket.gethostname()}:{staging_dir.resolve()}")[:16]
        self._writer_wait = writer_wait_seconds
        self._guard = threading.Lock()
        self._held: dict[tuple[str, str], float] = {}
        self._ended: dict[
            str, float
        ] = {}  # streams that ended recently -> when  # (upload, stream) -> when its lease was renewed
        self._release_my_writers()

    # ---- exams -------------------------------------------------------------------------------
    def open_exam(
        self,
        p: Principal,
        *,
        client_exam_key: str,
        kind: str,
        priority: str,
        indication: str,
        study_instance_uid: str,
        follow_up_of: str = "",
        patient: dict[str, str] | None = None,
    ) -> dict[str, object]:
        """Open an exam (or find it again by its key). ``patient`` is what the request knows of the
        patient: its values are cleaned (an invalid one dropped) and the files' values win over them."""
        site_id = require_uploader(p)
        if not _KEY.match(client_exam_key):
            raise InvalidInput("client_exam_key must be 1-128 of [A-Za-z0-9._:-]", reason="BAD_KEY")
        if kind not in KINDS:
            raise InvalidInput("kind must be ECG or IMAGING", reason="BAD_KIND")
        if priority not in PRIORITIES:
            raise InvalidInput("priority must be stat, urgent or routine", reason="BAD_PRIORITY")
        if study_instance_uid:
            validate.check_uid(study_instance_uid, field="StudyInstanceUID")
        if len(indication) > 2000:
            raise InvalidInput("indication is longer than 2000 characters", reason="BAD_INDICATION")
        if follow_up_of and not re.fullmatch(r"[0-9a-f]{32}", follow_up_of):
            raise InvalidInput("follow_up_of must be an exam id", reason="BAD_EXAM_ID")
        with self._engine.begin() as conn:
            row = conn.execute(
                select(exams).where(exams.c.site_id == site_id, exams.c.client_exam_key == client_exam_key)
            ).first()
            if row is not None and row.state == ExamState.EXPIRED:  # abandoned long ago: the key starts afresh
                conn.execute(update(exams).where(exams.c.id == row.id).values(client_exam_key=f"expired:{row.id}"))
                row = None
            if row is not None:
                return self._uploader_view(conn, dict(row._mapping))
            earlier = self._earlier_exam(
                conn, site_id=site_id, follow_up_of=follow_up_of, study_instance_uid=study_instance_uid
            )
            requested = patient_context.from_request(patient)
            now = utcnow()
            exam_id = new_id()
            lifecycle.open_exam(
                conn,
                values={
                    "id": exam_id,
                    "site_id": site_id,
                    "client_exam_key": client_exam_key,
                    "kind": kind,
                    "modality": "ECG" if kind == ExamKind.ECG else "",
                    "study_instance_uid": study_instance_uid,
                    "priority": priority,
                    "indication": indication,
                    "follow_up_of": earlier,
                    "created_at": now,
                    "updated_at": now,
                    **requested.columns(),
                },
                actor_id=p.id,
                detail={"follow_up_of": earlier} if earlier else None,
            )
            return self._uploader_view(
                conn, dict(conn.execute(select(exams).where(exams.c.id == exam_id)).one()._mapping)
            )

    @staticmethod
    def _earlier_exam(conn: Connection, *, site_id: int, follow_up_of: str, study_instance_uid: str) -> str:
        """The exam a new exam follows: the one the client names (of this site and, when both say,
        of the same study), else the latest committed exam of this site with the same study."""
        if follow_up_of:
            row = conn.execute(
                select(exams.c.id, exams.c.study_instance_uid).where(
                    exams.c.id == follow_up_of, exams.c.site_id == site_id
                )
            ).first()
            if row is None:
                raise NotFound("no such exam for this site", reason="EXAM_NOT_FOUND")
            if study_instance_uid and row.study_instance_uid and row.study_instance_uid != study_instance_uid:
                raise InvalidInput(
                    "a follow-up exam belongs to the study of the exam it follows", reason="STUDY_MISMATCH"
                )
            return str(row.id)
        if not study_instance_uid:
            return ""
        row = conn.execute(
            select(exams.c.id)
            .where(
                exams.c.site_id == site_id,
                exams.c.study_instance_uid == study_instance_uid,
                exams.c.state.not_in((ExamState.RECEIVING, ExamState.REJECTED, ExamState.EXPIRED)),
            )
            .order_by(exams.c.created_at.desc())
            .limit(1)
        ).first()
        return str(row.id) if row is not None else ""

    @staticmethod
    def _uploader_view(conn: Connection, exam: dict[str, object]) -> dict[str, object]:
        """The exam as its site sees it: with its refused objects and the hashes of what it holds."""
        exam["refused"] = [
            dict(r._mapping)
            for r in conn.execute(select(refusals).where(refusals.c.exam_id == exam["id"]).order_by(refusals.c.id))
        ]
        exam["stored_sha256"] = [
            str(r[0])
            for r in conn.execute(
                select(objects.c.sha256).where(objects.c.exam_id == exam["id"]).order_by(objects.c.sha256)
            )
        ]
        return exam

    def get_exam(self, p: Principal, exam_id: str) -> dict[str, object]:
        site_id = require_uploader(p)
        with reading(self._engine) as conn:
            return self._uploader_view(conn, self._site_exam(conn, site_id=site_id, exam_id=exam_id))

    @staticmethod
    def _site_exam(conn: Connection, *, site_id: int, exam_id: str) -> dict[str, object]:
        row = conn.execute(select(exams).where(exams.c.id == exam_id, exams.c.site_id == site_id)).first()
        if row is None:  # another site's exam looks exactly like a missing one
            raise NotFound("no such exam for this site", reason="EXAM_NOT_FOUND")
        return dict(row._mapping)

    # ---- uploads ------------------------------------------------------------------------------
    def begin_upload(self, p: Principal, *, exam_id: str, size: int, sha256: str, role: str) -> UploadState:
        site_id = require_uploader(p)
        if role not in ROLES:
            raise InvalidInput("role must be dicom, wfdb_header or wfdb_signal", reason="BAD_ROLE")
        if not _HEX64.match(sha256):
            raise InvalidInput("sha256 must be 64 lowercase hex digits", reason="BAD_SHA256")
        if size <= 0:
            raise InvalidInput("an object must have at least one byte", reason="EMPTY_OBJECT")
        if size > self._max_bytes:
            raise ResourceExhausted("object is larger than the per-file limit", reason="TOO_LARGE")
        with self._engine.begin() as conn:
            exam = self._site_exam(conn, site_id=site_id, exam_id=exam_id)
            if exam["state"] != ExamState.RECEIVING:
                if exam["state"] == ExamState.EXPIRED:
                    raise Conflict("the exam expired unfinished; open it again", reason="EXAM_EXPIRED")
                raise Conflict("exam is already committed", reason="EXAM_COMMITTED")
            earlier = self._earlier_refusal(conn, site_id=site_id, exam_id=exam_id, sha256=sha256, role=role)
            refused = _refusal_error(earlier) if earlier is not None else None
            if earlier is not None and earlier.exam_id != exam_id:  # counted in this exam too
                self._record_refusal(conn, site_id=site_id, exam_id=exam_id, upload_id=None, like=earlier)
            row = conn.execute(
                select(uploads).where(uploads.c.exam_id == exam_id, uploads.c.sha256 == sha256, uploads.c.role == role)
            ).first()
            if refused is None and row is None:
                upload_id = new_id()
                now = utcnow()
                lifecycle.open_upload(
                    conn,
                    values={
                        "id": upload_id,
                        "exam_id": exam_id,
                        "site_id": site_id,
                        "sha256": sha256,
                        "size": size,
                        "role": role,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                return UploadState(upload_id, 0, size, UploadStatus.PARTIAL)
        if refused is not None:  # the same bytes were refused before: the same answer, at once
            raise refused
        assert row is not None
        return self.upload_status(p, upload_id=row.id)

    @staticmethod
    def _earlier_refusal(conn: Connection, *, site_id: int, exam_id: str, sha256: str, role: str) -> Row[Any] | None:
        """A refusal of the same bytes in this exam, or of bytes unfit whatever the exam."""
        return conn.execute(
            select(refusals)
            .where(
                refusals.c.site_id == site_id,
                refusals.c.sha256 == sha256,
                refusals.c.role == role,
                (refusals.c.exam_id == exam_id) | (refusals.c.scope == "content"),
            )
            .order_by((refusals.c.exam_id == exam_id).desc(), refusals.c.id.desc())
            .limit(1)
        ).first()

    @staticmethod
    def _record_refusal(
        conn: Connection,
        *,
        site_id: int,
        exam_id: str,
        upload_id: str | None,
        like: Row[Any] | None = None,
        role: str = "",
        sha256: str = "",
        size: int = 0,
        sop_instance_uid: str | None = None,
        error: TelereadError | None = None,
    ) -> None:
        """One refusal record (what and why; never the bytes), and its event."""
        if like is not None:
            values: dict[str, Any] = {
                k: like._mapping[k]
                for k in ("role", "sha256", "size", "sop_instance_uid", "code", "reason", "message", "scope")
            }
        else:
            assert error is not None
            values = {
                "role": role,
                "sha256": sha256,
                "size": size,
                "sop_instance_uid": sop_instance_uid,
                "code": error.code,
                "reason": error.reason[:64],
                "message": error.message,
                "scope": "exam" if error.reason in EXAM_SCOPED_REASONS else "content",
            }
        conn.execute(
            insert(refusals).values(
                site_id=site_id, exam_id=exam_id, upload_id=upload_id, created_at=utcnow(), **values
            )
        )
        record_event(
            conn, type="object_rejected", exam_id=exam_id, site_id=site_id, detail={"reason": values["reason"]}
        )

    def upload_status(self, p: Principal, *, upload_id: str) -> UploadState:
        site_id = require_uploader(p)
        with reading(self._engine) as conn:
            row = self._site_upload(conn, site_id=site_id, upload_id=upload_id)
            obj = None
            if row.object_id:
                obj = dict(conn.execute(select(objects).where(objects.c.id == row.object_id)).one()._mapping)
            refusal = None
            if row.state in REFUSED_UPLOAD_STATES:
                refusal = conn.execute(
                    select(refusals).where(refusals.c.upload_id == row.id).order_by(refusals.c.id.desc()).limit(1)
                ).first()
        if row.state in lifecycle.HOLDING_UPLOADS:
            return UploadState(row.id, row.size, row.size, row.state, obj)
        if row.state in REFUSED_UPLOAD_STATES:  # a retry gets the original error, never "partial"
            if refusal is not None:
                raise _refusal_error(refusal)
            raise InvalidInput("the hub refused this object", reason="OBJECT_REFUSED")
        if row.state != UploadStatus.PARTIAL:  # expired with its abandoned exam: never "partial at 0" for ever
            raise Conflict("the upload's exam expired unfinished; open the exam again", reason="EXAM_EXPIRED")
        return UploadState(row.id, self._staging.confirmed(row.id), row.size, UploadStatus.PARTIAL)

    @staticmethod
    def _site_upload(conn: Connection, *, site_id: int, upload_id: str) -> Row[Any]:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id or ""):
            raise InvalidInput("malformed upload id", reason="BAD_UPLOAD_ID")
        row = conn.execute(select(uploads).where(uploads.c.id == upload_id, uploads.c.site_id == site_id)).first()
        if row is None:
            raise NotFound("no such upload for this site", reason="UPLOAD_NOT_FOUND")
        return row

    # ---- the writer lease: which stream may append to an upload, kept in the database -----------
    def _release_my_writers(self) -> None:
        """Streams of this hub instance died with its last process: their leases go at once."""
        with self._engine.begin() as conn:
            conn.execute(
                update(uploads)
                .where(uploads.c.writer.like(f"{self._instance}:%"))
                .values(writer=None, writer_until=None)
            )

    def new_writer(self) -> str:
        """A name for one upload stream's hold on its upload (see :meth:`receive`)."""
        return f"{self._instance}:{uuid.uuid4().hex[:16]}"

    @contextmanager
    def _writer(
        self, upload_id: str, writer: str | None, *, site_id: int
    ) -> Iterator[tuple[Callable[[], None], Row[Any] | None]]:
        """Hold the upload's writer lease while bytes are appended (waiting up to
        ``writer_wait_seconds`` for the handler of a cut stream to let go); yields the keep-alive
        that renews it, and the upload's row when this call took the lease (the taking statement
        returns it: no second read), else None. With ``writer`` (one stream's name) the lease
        outlives this call, so the stream's next run of messages takes it without a database write
        while it is fresh; the stream gives it back with :meth:`release_writer`. Without, it is
        freed on return."""
        me = writer or self.new_writer()
        lease = timedelta(seconds=WRITER_LEASE_SECONDS)
        fresh = WRITER_LEASE_SECONDS / 3
        key = (upload_id, me)
        taken: Row[Any] | None = None
        with self._guard:
            renewed_at = self._held.get(key)
        if renewed_at is None or time.monotonic() - renewed_at >= fresh:
            waited_until = time.monotonic() + self._writer_wait
            pause = Backoff(base_s=0.02, cap_s=0.5)
            while True:
                now = self._clock.now()
                with self._engine.begin() as conn:
                    free = or_(uploads.c.writer.is_(None), uploads.c.writer_until < now, uploads.c.writer == me)
                    taken = conn.execute(
                        update(uploads)
                        .where(uploads.c.id == upload_id, uploads.c.site_id == site_id, free)
                        .values(writer=me, writer_until=now + lease)
                        .returning(*uploads.c)
                    ).first()
                    if taken is None:  # held by another stream, or not this site's upload at all
                        self._site_upload(conn, site_id=site_id, upload_id=upload_id)  # NotFound
                if taken is not None:
                    break
                with self._guard:
                    self._held.pop(key, None)
                if time.monotonic() >= waited_until:
                    raise Conflict("another stream is writing this upload", reason="UPLOAD_BUSY")
                time.sleep(pause.next_delay() or 0.5)
            with self._guard:
                self._held[key] = time.monotonic()
                ended = me in self._ended  # the stream ended while this call was on its way
            if ended:
                self.release_writer(upload_id, me)
                raise Unavailable("the upload stream has ended", reason="STREAM_ENDED")

        def keepalive() -> None:
            with self._guard:
                if time.monotonic() - self._held.get(key, 0.0) < fresh:
                    return
                self._held[key] = time.monotonic()
            with self._engine.begin() as conn:
                conn.execute(
                    update(uploads)
                    .where(uploads.c.id == upload_id, uploads.c.writer == me)
                    .values(writer_until=self._clock.now() + lease)
                )

        try:
            yield keepalive, taken
        finally:
            if writer is None:
                self.release_writer(upload_id, me)

    def release_writer(self, upload_id: str, writer: str) -> None:
        """The stream named ``writer`` is over: free its lease on the upload at once (and refuse it
        to a call of that stream still on its way, which would otherwise hold it until it lapses)."""
        now = time.monotonic()
        with self._guard:
            self._held.pop((upload_id, writer), None)
            self._ended[writer] = now
            for name in [n for n, at in self._ended.items() if now - at > 4 * WRITER_LEASE_SECONDS]:
                del self._ended[name]
        with self._engine.begin() as conn:
            conn.execute(
                update(uploads)
                .where(uploads.c.id == upload_id, uploads.c.writer == writer)
                .values(writer=None, writer_until=None)
            )

    def receive(
        self, p: Principal, *, upload_id: str, offset: int, chunks: Iterator[bytes], writer: str | None = None
    ) -> UploadState:
        """Append a stream of chunks at ``offset`` (which must be the confirmed offset). ``writer``
        names the stream when it calls once per run of messages (its lease is then kept between
        runs and freed by :meth:`release_writer`)."""
        site_id = require_uploader(p)
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id or ""):
            raise InvalidInput("malformed upload id", reason="BAD_UPLOAD_ID")
        with self._writer(upload_id, writer, site_id=site_id) as (keepalive, row):
            if row is None:  # the lease was already this stream's: read the row
                with reading(self._engine) as conn:
                    row = self._site_upload(conn, site_id=site_id, upload_id=upload_id)
            if row.state != UploadStatus.PARTIAL:
                if writer is not None:  # nothing left to write: the stream's hold goes now
                    self.release_writer(upload_id, writer)
                return self.upload_status(p, upload_id=upload_id)
            current = self._staging.confirmed(upload_id)
            if offset != current:
                raise Conflict(
                    f"stream starts at byte {offset} but the server has {current}",
                    reason="OFFSET_MISMATCH",
                    metadata={"committed_offset": str(current)},
                )
            written = self._staging.append(upload_id, chunks, start=current, size=row.size, keepalive=keepalive)
            if written < row.size:
                return UploadState(upload_id, written, row.size, UploadStatus.PARTIAL)
            done = self._finalise(p, site_id=site_id, upload=row)
            if writer is not None:  # the row's move freed the lease: nothing for the stream to give back
                with self._guard:
                    self._held.pop((upload_id, writer), None)
            return done

    def _finalise(self, p: Principal, *, site_id: int, upload: Row[Any]) -> UploadState:
        u = upload
        part = self._staging.path(u.id)
        if self._staging.digest(u.id, size=u.size) != u.sha256:
            self._staging.discard(u.id)  # the upload stays open: the client re-sends from zero
            raise InvalidInput("object bytes do not match the announced SHA-256", reason="SHA256_MISMATCH")
        try:
            meta = self._validate(u.role, part, exam_id=u.exam_id, site_id=site_id, upload_id=u.id)
            stored = self._store_object(p, site_id=site_id, upload=u, part=part, meta=meta)
            self._staging.finished(u.id)
            return stored
        except InvalidInput as exc:
            self._reject_upload(site_id=site_id, upload=u, error=exc)
            raise
        except AlreadyExists:  # an instance UID conflict, recorded where it was found
            self._staging.discard(u.id)
            raise

    def _validate(self, role: str, part: Path, *, exam_id: str, site_id: int, upload_id: str) -> dict[str, object]:
        if role == "dicom":
            info = self._cpu.run(validate.check_dicom_instance, part, metadata=True)  # the check every door applies
            with reading(self._engine) as conn:  # one read: the exam's study, an earlier copy, its first instance
                exam = self._site_exam(conn, site_id=site_id, exam_id=exam_id)
                existing = conn.execute(
                    select(objects.c.id).where(
                        objects.c.site_id == site_id, objects.c.sop_instance_uid == info.sop_instance_uid
                    )
                ).first()
                first = not patient_context.holds_an_object(conn, exam_id=exam_id)
            if exam["study_instance_uid"] and exam["study_instance_uid"] != info.study_instance_uid:
                raise InvalidInput("instance belongs to another study than the exam", reason="STUDY_MISMATCH")
            patient_context.check_instance(
                exam, first=first, patient=info.patient, dropped=info.patient_dropped, upload_id=upload_id
            )
            return {
                "sop_instance_uid": info.sop_instance_uid,
                "existing": existing is not None,
                "sop_class_uid": info.sop_class_uid,
                "series_instance_uid": info.series_instance_uid,
                "modality": info.modality or "OT",
                "study_instance_uid": info.study_instance_uid,
                "patient": info.patient if first else None,  # only a possible first instance records it
                "index": info.index,
                "metadata": info.metadata,
                "pixel_range": info.pixel_range,
                "object": {
                    "study_instance_uid": info.study_instance_uid,
                    "instance_number": info.index.instance_number,
                    "pixel_rows": info.rows,
                    "pixel_columns": info.columns,
                    "number_of_frames": info.number_of_frames if info.rows is not None else None,
                    "transfer_syntax_uid": info.transfer_syntax_uid,
                },  # fmt: skip
            }
        if role == "wfdb_header":
            self._cpu.run(validate.inspect_wfdb_header, part)
            return {"modality": "ECG"}
        return {"modality": "ECG"}

    def _store_object(
        self, p: Principal, *, site_id: int, upload: Row[Any], part: Path, meta: dict[str, object]
    ) -> UploadState:
        u = upload
        uid = meta.get("sop_instance_uid")
        patient = meta.get("patient")
        first = patient if isinstance(patient, PatientContext) else None
        if uid and meta.get("existing"):
            dup = self._existing_instance(site_id=site_id, uid=str(uid), upload=u, part=part, patient=first)
            if dup is not None:
                part.unlink(missing_ok=True)
                return dup
        key = object_key(tenant_id=site_id, sha256=u.sha256)
        self._store.put_file(key, part, sha256=u.sha256, size=u.size, consume=True)
        row: dict[str, object] = {
            "id": new_id(),
            "exam_id": u.exam_id,
            "site_id": site_id,
            "role": u.role,
            "sha256": u.sha256,
            "size": u.size,
            "storage_key": key,
            "sop_instance_uid": uid,
            "sop_class_uid": meta.get("sop_class_uid", ""),
            "series_instance_uid": meta.get("series_instance_uid", ""),
            "modality": meta.get("modality", ""),
            "created_at": utcnow(),
            **dict(meta.get("object") or {}),  # type: ignore[call-overload]
        }
        try:
            with self._engine.begin() as conn:
                self._record_stored(conn, row=row, upload_id=u.id, meta=meta, first=first)
        except DbIntegrityError:
            # A concurrent upload of the same instance won the race: treat as duplicate/conflict.
            part.unlink(missing_ok=True)
            try:
                dup = self._existing_instance(site_id=site_id, uid=str(uid), upload=u, patient=first)
            except AlreadyExists:  # the winner has other bytes: this copy is nobody's
                self.delete_unreferenced(key)
                raise
            if dup is None:
                raise
            return dup
        part.unlink(missing_ok=True)
        log.info("object stored", extra={"upload_id": u.id, "bytes": u.size})
        return UploadState(u.id, u.size, u.size, UploadStatus.STORED, row)

    def _existing_instance(
        self, *, site_id: int, uid: str, upload: Row[Any], part: Path | None = None,
        patient: PatientContext | None = None,
    ) -> UploadState | None:  # fmt: skip
        """The answer when the site already stored this SOP Instance UID: a duplicate (the same
        bytes, or the same instance sent again in another transfer syntax, losslessly or lossily:
        the first copy is kept; as the exam's first instance it gives the exam its patient context),
        or AlreadyExists for a different instance under the same UID."""
        u = upload
        query = select(objects).where(objects.c.site_id == site_id, objects.c.sop_instance_uid == uid)
        with reading(self._engine) as conn:
            first = conn.execute(query).first()
        if first is None:
            return None  # the common case, answered without the write lock
        resend = validate.SAME_BYTES if first.sha256 == u.sha256 else self._resend_kind(first, part)
        with self._engine.begin() as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            if row.sha256 == u.sha256 or (row.id == first.id and resend in validate.KEEP_FIRST):
                self._mark_upload(conn, upload_id=u.id, state=UploadStatus.DUPLICATE, object_id=row.id)
                if patient is not None:
                    patient_context.record_first_instance(conn, exam_id=u.exam_id, upload_id=u.id, patient=patient)
                if row.sha256 != u.sha256:  # recorded: the first copy answers for the resend
                    record_event(
                        conn, type="instance_resent", exam_id=u.exam_id, site_id=site_id,
                        detail={"kind": resend, "kept": row.sha256, "offered": u.sha256},
                    )  # fmt: skip
                    log.info("instance resent in another encoding; first copy kept", extra={"reason": resend})
                return UploadState(u.id, u.size, u.size, UploadStatus.DUPLICATE, dict(row._mapping))
            conn.execute(
                insert(conflicts).values(
                    site_id=site_id,
                    exam_id=u.exam_id,
                    sop_instance_uid=uid,
                    existing_sha256=row.sha256,
                    offered_sha256=u.sha256,
                    created_at=utcnow(),
                )
            )
            self._mark_upload(conn, upload_id=u.id, state=UploadStatus.REFUSED, object_id=None)
            record_event(conn, type="instance_conflict", exam_id=u.exam_id, site_id=site_id)
            error = AlreadyExists(
                "an instance with this SOPInstanceUID and different bytes is already stored;"
                " the stored original is kept",
                reason="INSTANCE_UID_CONFLICT",
            )
            self._record_refusal(
                conn, site_id=site_id, exam_id=u.exam_id, upload_id=u.id, role=u.role, sha256=u.sha256, size=u.size,
                sop_instance_uid=uid, error=error,
            )  # fmt: skip
        log.warning("instance UID conflict refused", extra={"upload_id": u.id, "reason": "INSTANCE_UID_CONFLICT"})
        raise error

    @classmethod
    def _record_stored(
        cls, conn: Connection, *, row: dict[str, object], upload_id: str, meta: dict[str, object],
        first: PatientContext | None,
    ) -> None:  # fmt: skip
        """The rows of an object just stored, in the caller's transaction: the object, its upload
        stored, the exam's study and, for a possible first instance, its patient. Several of these
        run at once for one exam (an upload's streams); each takes the exam's row only in the lock
        modes that let the others' foreign-key checks through (see ``record_first_instance``)."""
        conn.execute(insert(objects).values(**row))
        cls._mark_upload(conn, upload_id=upload_id, state=UploadStatus.STORED, object_id=str(row["id"]))
        cls._touch_exam(conn, exam_id=str(row["exam_id"]), meta=meta)
        index = meta.get("index")
        if isinstance(index, DicomIndex) and row.get("series_instance_uid"):
            dicom_index.record(conn, row=row, index=index, metadata=str(meta.get("metadata") or ""),
                               pixel_range=meta.get("pixel_range"))  # type: ignore[arg-type]  # fmt: skip
        if first is not None:
            patient_context.record_first_instance(conn, exam_id=str(row["exam_id"]), upload_id=upload_id, patient=first)

    @staticmethod
    def _mark_upload(conn: Connection, *, upload_id: str, state: UploadStatus, object_id: str | None) -> None:
        values = {"object_id": object_id, "updated_at": utcnow(), "writer": None, "writer_until": None}
        lifecycle.move_upload(conn, upload_id, state, values=values)

    @staticmethod
    def _touch_exam(conn: Connection, *, exam_id: str, meta: dict[str, object]) -> None:
        values: dict[str, object] = {"updated_at": utcnow()}
        if meta.get("study_instance_uid"):
            values["study_instance_uid"] = meta["study_instance_uid"]
        conn.execute(update(exams).where(exams.c.id == exam_id, exams.c.study_instance_uid == "").values(**values))

    def _reject_upload(self, *, site_id: int, upload: Row[Any], error: TelereadError) -> None:
        self._staging.discard(upload.id)
        with self._engine.begin() as conn:
            self._mark_upload(conn, upload_id=upload.id, state=UploadStatus.REJECTED, object_id=None)
            self._record_refusal(
                conn, site_id=site_id, exam_id=upload.exam_id, upload_id=upload.id, role=upload.role,
                sha256=upload.sha256, size=upload.size, error=error,
            )  # fmt: skip
        log.warning("object rejected", extra={"upload_id": upload.id, "reason": error.reason})

    def _resend_kind(self, stored: Row[Any], part: Path | None) -> str:
        """How the staged ``part`` relates to the stored instance of the same UID (decoded and
        compared in a worker process; only when the bytes differ)."""
        if part is None or stored.role != "dicom":
            return validate.DIFFERENT
        with tempfile.TemporaryDirectory(dir=self._staging.root) as tmp:
            original = Path(tmp) / "stored.dcm"
            with (
                self._store.open_verified(stored.storage_key, sha256=stored.sha256, size=stored.size) as src,
                open(original, "wb") as out,
            ):
                shutil.copyfileobj(src, out, MAX_CHUNK)
            return str(self._cpu.run(validate.resend_kind, original, part))

    def delete_unreferenced(self, key: str) -> bool:
        """Delete a stored object no metadata row refers to (a refused copy); True when deleted. Keys
        are content hashes: only an upload of the same bytes could add a row for it meanwhile, and
        for a DICOM instance that upload meets the same refusal (one SOP Instance UID per site)."""
        with reading(self._engine) as conn:
            if conn.execute(select(objects.c.id).where(objects.c.storage_key == key).limit(1)).first() is not None:
                return False
        self._store.delete(key)
        return True

    # ---- commit -------------------------------------------------------------------------------
    def commit_exam(self, p: Principal, *, exam_id: str, expected_objects: int) -> dict[str, object]:
        """Commit an exam whose announced objects are all stored or refused. Refused instances of an
        imaging exam leave it incomplete, not refused: what is valid is read. An exam with nothing
        valid, or a WFDB record that is not whole, is rejected and its stored bytes are deleted."""
        site_id = require_uploader(p)
        problem: InvalidInput | None = None
        with self._engine.begin() as conn:
            exam = self._site_exam(conn, site_id=site_id, exam_id=exam_id)
            if exam["state"] == ExamState.REJECTED:  # a retry gets the same answer
                raise InvalidInput(
                    "the hub refused this exam; see its refused objects", reason=str(exam["reject_reason"])
                )
            if exam["state"] != ExamState.RECEIVING:
                return self._uploader_view(conn, exam)  # idempotent: already committed
            done = conn.execute(
                select(
                    uploads.c.id.label("upload_id"),
                    objects.c.id,
                    uploads.c.role,
                    objects.c.modality,
                    objects.c.size,
                    objects.c.storage_key,
                    objects.c.sha256,
                    objects.c.sop_instance_uid,
                )  # fmt: skip
                .select_from(uploads.join(objects, uploads.c.object_id == objects.c.id))
                .where(uploads.c.exam_id == exam_id, uploads.c.state.in_(lifecycle.HOLDING_UPLOADS))
            ).all()
            stored = {(r.sha256, r.role) for r in done}
            refused = {
                (r.sha256, r.role)
                for r in conn.execute(select(refusals.c.sha256, refusals.c.role).where(refusals.c.exam_id == exam_id))
            } - stored
            if expected_objects <= 0 or len(done) + len(refused) != expected_objects:
                raise Conflict(
                    f"exam has {len(done)} stored and {len(refused)} refused objects,"
                    f" the client announced {expected_objects}",
                    reason="OBJECTS_MISSING",
                )
            patient: dict[str, str] = {}
            if not done:
                problem = InvalidInput("none of the exam's objects could be stored", reason="NO_VALID_OBJECTS")
            else:
                try:
                    modality, kind = self._exam_modality(exam, [r.role for r in done], [r.modality for r in done])
                    if kind == "ecg" and any(r.role != "dicom" for r in done):
                        if refused:
                            raise InvalidInput(
                                "a WFDB record one of whose files was refused cannot be read", reason="WFDB_INCOMPLETE"
                            )
                        header = self._check_wfdb_exam(done)
                        patient = patient_context.committed_record(exam, header.patient)
                except InvalidInput as exc:
                    problem = exc
            if problem is None:
                self._commit(conn, p, exam_id=exam_id, site_id=site_id, done=done, refused=len(refused),
                             modality=modality, kind=kind, patient=patient)  # fmt: skip
                exam = self._uploader_view(conn, self._site_exam(conn, site_id=site_id, exam_id=exam_id))
        if problem is not None:
            self._reject_exam(site_id=site_id, exam_id=exam_id, error=problem, stored=done)
            raise problem
        self._bus.publish()
        self._on_committed(exam_id)
        return exam

    def _commit(
        self, conn: Connection, p: Principal, *, exam_id: str, site_id: int, done: Sequence[Any], refused: int,
        modality: str, kind: str, patient: dict[str, str],
    ) -> None:  # fmt: skip
        site = conn.execute(select(sites).where(sites.c.id == site_id)).one()
        now = utcnow()
        hospital = self._routing.hospital_for(site_code=site.code, site_lead_hospital=site.lead_hospital)
        specialty = self._routing.specialty_for(modality)
        subspecialty = self._routing.subspecialty_for(
            modality, self._body_parts(conn, site_id=site_id, exam_id=exam_id)
        )
        lifecycle.move_exam(
            conn,
            exam_id,
            ExamState.RECEIVED,
            event="received",
            actor_id=p.id,
            detail={"refused": refused} if refused else None,
            values=dict(
                modality=modality,
                kind=kind,
                received_at=now,
                updated_at=now,
                specialty=specialty,
                subspecialty=subspecialty,
                hospital=hospital,
                object_count=len(done),
                total_bytes=sum(int(r.size) for r in done),
                incomplete=refused > 0,
                refused_count=refused,
                **patient,
            ),
        )

    @staticmethod
    def _body_parts(conn: Connection, *, site_id: int, exam_id: str) -> frozenset[str]:
        """The BodyPartExamined of the exam's DICOM series (routing's subspecialty rules)."""
        series = select(objects.c.series_instance_uid).where(objects.c.exam_id == exam_id).distinct()
        query = select(dicom_series.c.body_part_examined).where(
            dicom_series.c.site_id == site_id, dicom_series.c.series_instance_uid.in_(series)
        )
        return frozenset(str(b).upper() for (b,) in conn.execute(query) if b)

    def _reject_exam(self, *, site_id: int, exam_id: str, error: InvalidInput, stored: Sequence[Any]) -> None:
        """The exam is refused as a whole: each stored object gets a refusal record, its row goes and
        its bytes are deleted; the exam stays, rejected with the reason."""
        with self._engine.begin() as conn:
            for r in stored:
                self._record_refusal(
                    conn, site_id=site_id, exam_id=exam_id, upload_id=r.upload_id, role=r.role, sha256=r.sha256,
                    size=int(r.size), sop_instance_uid=r.sop_instance_uid, error=error,
                )  # fmt: skip
                self._mark_upload(conn, upload_id=r.upload_id, state=UploadStatus.REFUSED, object_id=None)
            mine = [r.id for r in stored]
            if mine:  # a duplicate's row belongs to the exam that stored it first
                dicom_index.forget(conn, mine)
                conn.execute(delete(objects).where(objects.c.id.in_(mine), objects.c.exam_id == exam_id))
            lifecycle.move_exam(
                conn,
                exam_id,
                ExamState.REJECTED,
                event="rejected",
                values={"reject_reason": error.reason[:64]},
                detail={"reason": error.reason},
            )
        for key in {r.storage_key for r in stored}:
            self.delete_unreferenced(key)
        log.warning("exam rejected", extra={"exam_id": exam_id, "reason": error.reason})

    @staticmethod
    def _exam_modality(exam: dict[str, object], roles: list[str], modalities: list[str]) -> tuple[str, str]:
        if any(r.startswith("wfdb") for r in roles):
            if any(r == "dicom" for r in roles):
                raise InvalidInput("an exam mixes WFDB and DICOM objects", reason="MIXED_EXAM")
            return "ECG", "ecg"
        mods = [m for m in modalities if m]
        modality = max(set(mods), key=mods.count) if mods else "OT"
        return modality, ExamKind.ECG if is_ecg(modality=modality) else str(exam["kind"])

    def _check_wfdb_exam(self, done: Sequence[Any]) -> validate.WfdbHeaderInfo:
        roles = sorted(r.role for r in done)
        if roles != ["wfdb_header", "wfdb_signal"]:
            raise InvalidInput("a WFDB exam needs exactly one .hea and one .dat", reason="WFDB_INCOMPLETE")
        with tempfile.TemporaryDirectory(dir=self._staging.root) as tmp:
            paths = {}
            for r in done:
                dest = Path(tmp) / r.role
                with (
                    self._store.open_verified(r.storage_key, sha256=r.sha256, size=r.size) as src,
                    open(dest, "wb") as out,
                ):
                    shutil.copyfileobj(src, out, MAX_CHUNK)
                paths[r.role] = dest
            header = validate.inspect_wfdb_header(paths["wfdb_header"])
            validate.check_wfdb_pair(header, paths["wfdb_signal"])
            return header


def _refusal_error(row: Row[Any]) -> TelereadError:
    """The error an object was refused with, rebuilt from its record."""
    cls = _REFUSAL_ERRORS.get(str(row.code), InvalidInput)
    return cls(str(row.message), reason=str(row.reason))
