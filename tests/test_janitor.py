"""The hub's clean-up, against a real hub on loopback (SQLite + local store, PostgreSQL + S3): exams
left receiving expire and their bytes go, staging files nobody will finish are deleted, objects no
row references are swept after a grace period, and the hub's files are readable by their owner
only. The clock is passed in: no test waits for hours."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from conftest import make_settings, start_stack
from helpers import error_reason, wait_for, write_synthetic_wfdb
from teleread.db.engine import as_utc, make_engine, utcnow
from teleread.db.schema import events, exams, objects, sites, uploads
from teleread.storage import object_key
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

pytestmark = pytest.mark.timeout(180)
CHUNK = 64 * 1024
ABANDONED = timedelta(hours=48)


# --- the Ingest API, as a site uses it ----------------------------------------------------------


def _open(ingest: Any, key: str, *, kind: int = common_pb2.EXAM_KIND_IMAGING) -> common_pb2.Exam:
    return ingest.OpenExam(
        ingest_pb2.OpenExamRequest(client_exam_key=key, kind=kind, priority=common_pb2.PRIORITY_ROUTINE), timeout=10
    )


def _begin(ingest: Any, exam_id: str, data: bytes, role: str = "dicom") -> ingest_pb2.UploadStatus:
    return ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(
            exam_id=exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role=role
        ),
        timeout=10,
    )


def _chunks(upload_id: str, data: bytes, offset: int) -> Any:
    yield ingest_pb2.UploadChunk(upload_id=upload_id, offset=offset, data=data[offset : offset + CHUNK])
    for start in range(offset + CHUNK, len(data), CHUNK):
        yield ingest_pb2.UploadChunk(data=data[start : start + CHUNK])


def _send(ingest: Any, exam_id: str, data: bytes, role: str = "dicom") -> ingest_pb2.UploadStatus:
    status = _begin(ingest, exam_id, data, role)
    if status.state in (ingest_pb2.UPLOAD_STATE_STORED, ingest_pb2.UPLOAD_STATE_DUPLICATE):
        return status
    return ingest.Upload(_chunks(status.upload_id, data, status.committed_offset), timeout=30)


def _send_part(ingest: Any, exam_id: str, data: bytes, upto: int) -> ingest_pb2.UploadStatus:
    """Announce the whole object and send only its first ``upto`` bytes (the client went away)."""
    status = _begin(ingest, exam_id, data)
    part = ingest.Upload(iter([ingest_pb2.UploadChunk(upload_id=status.upload_id, offset=0, data=data[:upto])]))
    assert part.state == ingest_pb2.UPLOAD_STATE_PARTIAL and part.committed_offset == upto
    return part


def _ct(study: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- looking at what the hub holds --------------------------------------------------------------


def _site_id(stack: Any, code: str = "clinic-a") -> int:
    with stack.hub.engine.connect() as conn:
        return int(conn.execute(select(sites.c.id).where(sites.c.code == code)).scalar_one())


def _state(stack: Any, exam_id: str) -> str:
    with stack.hub.engine.connect() as conn:
        return str(conn.execute(select(exams.c.state).where(exams.c.id == exam_id)).scalar_one())


def _rows(stack: Any, table: Any, **where: Any) -> list[Any]:
    with stack.hub.engine.connect() as conn:
        return list(conn.execute(select(table).where(*(table.c[k] == v for k, v in where.items()))))


def _staged(stack: Any, upload_id: str) -> Path:
    return stack.hub.settings.staging_dir() / f"{upload_id}.part"


def _last_activity(stack: Any, exam_id: str) -> datetime:
    """The latest moment anything of the exam changed: its row, its uploads, its staged bytes."""
    (exam,) = _rows(stack, exams, id=exam_id)
    times = [as_utc(exam.updated_at)]
    for u in _rows(stack, uploads, exam_id=exam_id):
        times.append(as_utc(u.updated_at))
        if _staged(stack, u.id).exists():
            times.append(datetime.fromtimestamp(_staged(stack, u.id).stat().st_mtime, tz=timezone.utc))
    return max(t for t in times if t is not None)


def _between(older: datetime, newer: datetime) -> datetime:
    """A clock at which ``older`` activity is past the abandoned period and ``newer`` is not."""
    assert older < newer
    return older + ABANDONED + (newer - older) / 2


def _put_orphan(stack: Any, tmp_path: Path, data: bytes) -> str:
    """Bytes in the store with no row: what a hub that died between the two writes leaves."""
    key = object_key(tenant_id=_site_id(stack), sha256=hashlib.sha256(data).hexdigest())
    source = tmp_path / f"orphan-{len(data)}.bin"
    source.write_bytes(data)
    stack.hub.store.put_file(key, source, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert stack.hub.store.exists(key)
    return key


def _readable(stack: Any, row: Any) -> bytes:
    with stack.hub.store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as fh:
        return fh.read()


# --- 1. abandoned exams expire ------------------------------------------------------------------


def test_an_exam_left_receiving_expires_and_its_bytes_go(hub_stack: Any) -> None:
    janitor = hub_stack.hub.janitor
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    study = generate_uid()
    whole, cut = _ct(study), _ct(study)
    old = _open(ingest, "abandoned-1").exam_id
    stored = _send(ingest, old, whole)
    assert stored.state == ingest_pb2.UPLOAD_STATE_STORED
    partial = _send_part(ingest, old, cut, upto=10_000)
    (stored_row,) = _rows(hub_stack, objects, exam_id=old)
    assert _staged(hub_stack, partial.upload_id).stat().st_size == 10_000
    recent = _open(ingest, "recent-1").exam_id  # opened after the other one went quiet
    recent_status = _send(ingest, recent, _ct(generate_uid()))
    (recent_row,) = _rows(hub_stack, objects, exam_id=recent)
    (recent_exam,) = _rows(hub_stack, exams, id=recent)

    # not yet: 47 hours of silence is not abandoned
    early = janitor.run_once(now=_last_activity(hub_stack, old) + ABANDONED - timedelta(hours=1))
    assert early.exams_expired == 0
    assert _state(hub_stack, old) == "receiving" and hub_stack.hub.store.exists(stored_row.storage_key)
    assert _staged(hub_stack, partial.upload_id).exists()

    cut = _between(_last_activity(hub_stack, old), as_utc(recent_exam.created_at))
    report = janitor.run_once(now=cut)
    assert (report.exams_expired, report.uploads_expired, report.object_rows_deleted) == (1, 2, 1)
    assert report.objects_deleted == 1 and report.staging_files_deleted == 1 and report.errors == 0
    site_view = ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=old), timeout=10)
    assert site_view.state == "expired" and list(site_view.stored_sha256) == []
    assert {u.state for u in _rows(hub_stack, uploads, exam_id=old)} == {"expired"}
    assert _rows(hub_stack, objects, exam_id=old) == []
    assert [e.type for e in _rows(hub_stack, events, exam_id=old)][-1] == "expired"
    assert not _staged(hub_stack, partial.upload_id).exists()  # the partial bytes are gone
    assert not hub_stack.hub.store.exists(stored_row.storage_key)  # and the stored ones
    if hub_stack.name == "embedded":
        assert not (hub_stack.hub.settings.object_root() / stored_row.storage_key).exists()
    # the exam with recent activity is untouched
    assert _state(hub_stack, recent) == "receiving"
    assert _readable(hub_stack, recent_row) and recent_status.state == ingest_pb2.UPLOAD_STATE_STORED
    # the key opens a fresh exam, which takes the same instance afresh (not as a duplicate)
    again = _open(ingest, "abandoned-1")
    assert again.exam_id != old and again.state == "receiving"
    assert _send(ingest, again.exam_id, whole).state == ingest_pb2.UPLOAD_STATE_STORED
    # a second pass finds nothing more to do
    later = janitor.run_once(now=cut)
    assert (later.exams_expired, later.objects_deleted, later.orphans_deleted) == (0, 0, 0)


def test_a_late_stream_into_an_expired_exam_is_refused(embedded_stack: Any) -> None:
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    data = _ct(generate_uid())
    old = _open(ingest, "abandoned-late").exam_id
    part = _send_part(ingest, old, data, upto=5_000)
    embedded_stack.hub.janitor.run_once(now=_last_activity(embedded_stack, old) + ABANDONED + timedelta(minutes=1))
    assert _state(embedded_stack, old) == "expired"
    with pytest.raises(grpc.RpcError) as err:  # nothing new goes into an expired exam
        _begin(ingest, old, _ct(generate_uid()))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(err.value) == "EXAM_EXPIRED"
    for resume in (  # a client that resumes the upload is told, never "partial at byte 0" again and again
        lambda: ingest.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=part.upload_id), timeout=10),
        lambda: ingest.Upload(iter([ingest_pb2.UploadChunk(upload_id=part.upload_id, offset=0, data=data)])),
    ):
        with pytest.raises(grpc.RpcError) as err:
            resume()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(err.value) == "EXAM_EXPIRED"


# --- 2. staging files nobody will finish --------------------------------------------------------


def test_leftover_staging_files_go_and_live_partial_uploads_stay(hub_stack: Any, tmp_path: Path) -> None:
    janitor = hub_stack.hub.janitor
    staging = hub_stack.hub.settings.staging_dir()
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam_id = _open(ingest, "staging-1").exam_id
    study = generate_uid()
    with pytest.raises(grpc.RpcError) as not_dicom:  # refused: not DICOM
        _send(ingest, exam_id, b"not a DICOM file at all" * 200)
    assert not_dicom.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(not_dicom.value) == "DICOM_NO_META"
    (refused,) = [u for u in _rows(hub_stack, uploads, exam_id=exam_id) if u.state == "rejected"]
    stored = _send(ingest, exam_id, _ct(study))
    live_data = _ct(study)
    live = _send_part(ingest, exam_id, live_data, upto=7_000)
    # what a hub that died mid-way leaves: the bytes of a refused and of a stored upload, and a file
    # whose upload row is unknown to this database
    leftovers = [staging / f"{refused.id}.part", staging / f"{stored.upload_id}.part"]
    for path in leftovers:
        path.write_bytes(b"left behind" * 100)
    unknown = staging / f"{'e' * 32}.part"
    unknown.write_bytes(b"nobody's")
    checking = staging / "tmpq1w2e3r4"  # a validation's copy, left when the hub stopped mid-way
    checking.mkdir()
    (checking / "stored.dcm").write_bytes(b"a copy")
    made = utcnow()

    report = janitor.run_once(now=made + timedelta(minutes=30))  # inside the grace period
    assert report.staging_files_deleted == 2 and report.errors == 0
    assert not any(p.exists() for p in leftovers)
    assert unknown.exists() and checking.exists()  # perhaps a write just starting: kept for now
    assert _staged(hub_stack, live.upload_id).stat().st_size == 7_000

    report = janitor.run_once(now=made + timedelta(hours=2))
    assert report.staging_files_deleted == 2 and not unknown.exists() and not checking.exists()
    assert _staged(hub_stack, live.upload_id).stat().st_size == 7_000  # never touched
    resumed = ingest.Upload(_chunks(live.upload_id, live_data, 7_000), timeout=30)
    assert (
        resumed.state == ingest_pb2.UPLOAD_STATE_STORED
        and resumed.object.sha256 == hashlib.sha256(live_data).hexdigest()
    )
    assert _state(hub_stack, exam_id) == "receiving"


# --- 3. objects no row references ----------------------------------------------------------------


def test_objects_without_a_row_are_swept_after_the_grace_period(hub_stack: Any, tmp_path: Path) -> None:
    janitor = hub_stack.hub.janitor
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    committed = _open(ingest, "kept-committed").exam_id
    _send(ingest, committed, _ct(generate_uid()))
    ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=committed, expected_objects=1), timeout=10)
    receiving = _open(ingest, "kept-receiving").exam_id
    _send(ingest, receiving, _ct(generate_uid()))
    with_rows = _rows(hub_stack, objects)
    assert len(with_rows) == 2
    orphan = _put_orphan(hub_stack, tmp_path, os.urandom(3000))
    put_at = utcnow()

    report = janitor.run_once(now=put_at + timedelta(minutes=30))  # perhaps its row is on its way
    assert report.orphans_deleted == 0 and hub_stack.hub.store.exists(orphan)

    report = janitor.run_once(now=put_at + timedelta(hours=2))
    assert report.orphans_deleted == 1 and report.errors == 0
    assert not hub_stack.hub.store.exists(orphan)
    for row in with_rows:  # objects with rows are never swept
        assert _readable(hub_stack, row)
    assert janitor.run_once(now=put_at + ABANDONED - timedelta(hours=1)).orphans_deleted == 0
    for row in with_rows:
        assert _readable(hub_stack, row)
    report = janitor.run_once(now=put_at + timedelta(days=365))  # the receiving exam expires by then
    assert report.orphans_deleted == 0 and report.exams_expired == 1
    (kept,) = _rows(hub_stack, objects)
    assert kept.exam_id == committed and _readable(hub_stack, kept)  # a committed exam's, however old


def test_an_object_shared_with_another_exam_survives_the_expiry(hub_stack: Any, tmp_path: Path) -> None:
    """Content-addressed keys: the same WFDB header in two exams is two rows and one stored object."""
    janitor = hub_stack.hub.janitor
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    hea, dat = write_synthetic_wfdb(tmp_path, rhythm="normal")
    kept = _open(ingest, "wfdb-kept", kind=common_pb2.EXAM_KIND_ECG).exam_id
    _send(ingest, kept, hea.read_bytes(), role="wfdb_header")
    _send(ingest, kept, dat.read_bytes(), role="wfdb_signal")
    ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=kept, expected_objects=2), timeout=10)
    abandoned = _open(ingest, "wfdb-abandoned", kind=common_pb2.EXAM_KIND_ECG).exam_id
    _send(ingest, abandoned, hea.read_bytes(), role="wfdb_header")  # the signal never comes
    (mine,) = _rows(hub_stack, objects, exam_id=abandoned)
    shared = [r for r in _rows(hub_stack, objects, exam_id=kept) if r.storage_key == mine.storage_key]
    assert len(shared) == 1 and shared[0].id != mine.id

    report = janitor.run_once(now=_last_activity(hub_stack, abandoned) + ABANDONED + timedelta(minutes=1))
    assert (report.exams_expired, report.object_rows_deleted, report.objects_deleted) == (1, 1, 0)
    assert _state(hub_stack, abandoned) == "expired" and _rows(hub_stack, objects, exam_id=abandoned) == []
    assert _state(hub_stack, kept) != "expired"
    for row in _rows(hub_stack, objects, exam_id=kept):  # both files of the kept record, readable
        assert _readable(hub_stack, row)


def test_an_object_another_exam_relies_on_survives_the_expiry(hub_stack: Any) -> None:
    """A later exam that sent the same instance holds a duplicate of the abandoned exam's row."""
    janitor = hub_stack.hub.janitor
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    data = _ct(generate_uid())
    abandoned = _open(ingest, "first-copy").exam_id
    _send(ingest, abandoned, data)
    (row,) = _rows(hub_stack, objects, exam_id=abandoned)
    later = _open(ingest, "second-copy").exam_id
    dup = _send(ingest, later, data)
    assert dup.state == ingest_pb2.UPLOAD_STATE_DUPLICATE and dup.object.object_id == row.id
    ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=later, expected_objects=1), timeout=10)

    report = janitor.run_once(now=_last_activity(hub_stack, abandoned) + ABANDONED + timedelta(minutes=1))
    assert report.exams_expired == 1 and report.object_rows_deleted == 0 and report.objects_deleted == 0
    assert _state(hub_stack, abandoned) == "expired"
    again = ingest.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=dup.upload_id), timeout=10)
    assert again.state == ingest_pb2.UPLOAD_STATE_DUPLICATE and again.object.object_id == row.id
    assert _readable(hub_stack, row) == data


# --- 4. the clean-up runs by itself -------------------------------------------------------------


def test_the_hub_runs_the_clean_up_by_itself(tmp_path: Path) -> None:
    settings = make_settings(tmp_path).updated(
        ingest__janitor_first_seconds=0.0,
        ingest__janitor_interval_seconds=0.2,
        ingest__orphan_grace_seconds=0.0,  # anything without a row goes at the next pass
    )
    stack = start_stack("embedded", settings)
    try:
        janitor = stack.hub.janitor
        orphan = _put_orphan(stack, tmp_path, os.urandom(500))
        stray = settings.staging_dir() / f"{'a' * 32}.part"
        stray.write_bytes(b"stray")
        wait_for(lambda: not stack.hub.store.exists(orphan) and not stray.exists())
        passes = janitor.passes
        assert passes >= 1
        wait_for(lambda: janitor.passes > passes)  # and it keeps running
        assert janitor.last_report is not None and janitor.last_report.errors == 0
    finally:
        stack.server.stop(grace=None)
        stack.hub.close()
    assert not janitor.running  # stopped with the hub


# --- 5. owner-only files ------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_hubs_files_are_readable_by_their_owner_only(embedded_stack: Any) -> None:
    settings = embedded_stack.hub.settings
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    exam_id = _open(ingest, "modes").exam_id
    _send(ingest, exam_id, _ct(generate_uid()))
    partial = _send_part(ingest, exam_id, _ct(generate_uid()), upto=4_000)
    (row,) = _rows(embedded_stack, objects, exam_id=exam_id)

    db = settings.data_dir / "teleread.db"
    for path in (db, db.with_name("teleread.db-wal"), db.with_name("teleread.db-shm")):
        assert path.exists() and _mode(path) == 0o600, path.name
    assert _mode(settings.staging_dir()) == 0o700
    assert _mode(_staged(embedded_stack, partial.upload_id)) == 0o600
    root = settings.object_root()
    stored = root / row.storage_key
    assert _mode(stored) == 0o600
    folder = stored.parent
    while True:  # t1/objects/xx, t1/objects, t1 and the store's root
        assert _mode(folder) == 0o700, folder
        if folder == root:
            break
        folder = folder.parent
    assert _mode(root / ".tmp") == 0o700


def test_an_existing_database_file_is_made_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "data" / "old.db"
    db.parent.mkdir()
    db.touch(mode=0o644)
    os.chmod(db, 0o644)  # as an older hub (or a copy) left it
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        conn.execute(select(func.count()).select_from(select(1).subquery())).scalar_one()
    engine.dispose()
    assert _mode(db) == 0o600
    fresh = tmp_path / "new" / "deeper" / "fresh.db"
    engine = make_engine(f"sqlite:///{fresh}")
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    engine.dispose()
    assert _mode(fresh) == 0o600 and _mode(fresh.parent) == 0o700 and _mode(fresh.parent.parent) == 0o700
