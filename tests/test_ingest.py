"""Ingest over real gRPC: bad input is refused with a typed, detailed error and leaves nothing
visible; duplicates are acknowledged; conflicting bytes under one UID are refused and recorded;
an upload cut at a random byte resumes from the server's confirmed offset."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import grpc
import pydicom
import pytest
from sqlalchemy import func, select

from helpers import copy_testdata, error_reason, wait_for_state
from teleread.db.schema import conflicts, events, objects, uploads
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

pytestmark = pytest.mark.timeout(180)
CHUNK = 64 * 1024


def _open(ingest, key: str, *, kind=common_pb2.EXAM_KIND_IMAGING) -> str:
    return ingest.OpenExam(
        ingest_pb2.OpenExamRequest(client_exam_key=key, kind=kind, priority=common_pb2.PRIORITY_ROUTINE), timeout=10
    ).exam_id


def _begin(ingest, exam_id: str, data: bytes, role: str = "dicom") -> ingest_pb2.UploadStatus:
    return ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(
            exam_id=exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role=role
        ),
        timeout=10,
    )


def _chunks(upload_id: str, data: bytes, offset: int):
    yield ingest_pb2.UploadChunk(upload_id=upload_id, offset=offset, data=data[offset : offset + CHUNK])
    for start in range(offset + CHUNK, len(data), CHUNK):
        yield ingest_pb2.UploadChunk(data=data[start : start + CHUNK])


def _send(ingest, exam_id: str, data: bytes, role: str = "dicom") -> ingest_pb2.UploadStatus:
    status = _begin(ingest, exam_id, data, role)
    if status.state in (ingest_pb2.UPLOAD_STATE_STORED, ingest_pb2.UPLOAD_STATE_DUPLICATE):
        return status
    return ingest.Upload(_chunks(status.upload_id, data, status.committed_offset), timeout=30)


def _count(stack, table) -> int:
    with stack.hub.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _ct_bytes(tmp_path: Path) -> bytes:
    return copy_testdata(tmp_path, "CT_small.dcm")[0].read_bytes()


@pytest.mark.parametrize(
    "case, reason",
    [
        ("not_dicom", "DICOM_NO_META"),
        ("truncated", "TRUNCATED"),
        ("no_sop_uid", "DICOM_MISSING_ATTRIBUTE"),
        ("bad_uid", "BAD_UID"),
        ("traversal_uid", "BAD_UID"),
        ("exe_preamble", "DICOM_EXECUTABLE_PREAMBLE"),
    ],
)
def test_bad_dicom_is_refused_and_nothing_is_left(embedded_stack, tmp_path: Path, case: str, reason: str) -> None:
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    good = _ct_bytes(tmp_path)
    if case == "not_dicom":
        data = b"hello, this is not a DICOM file" * 100
    elif case == "truncated":
        data = pydicom.data.get_testdata_file("MR_truncated.dcm")
        data = Path(data).read_bytes()
    else:
        ds = pydicom.dcmread(io.BytesIO(good))
        if case == "no_sop_uid":
            del ds.SOPInstanceUID
        elif case == "bad_uid":
            ds.SOPInstanceUID = "1.2.abc.4"
            ds.file_meta.MediaStorageSOPInstanceUID = "1.2.abc.4"
        elif case == "traversal_uid":
            ds.SOPInstanceUID = "../x"
            ds.file_meta.MediaStorageSOPInstanceUID = "../x"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        data = buf.getvalue()
        if case == "exe_preamble":
            data = b"MZ" + data[2:]
    exam_id = _open(ingest, f"bad-{case}")
    with pytest.raises(grpc.RpcError) as err:
        _send(ingest, exam_id, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == reason  # a stable reason in google.rpc.ErrorInfo
    assert _count(embedded_stack, objects) == 0
    staging = embedded_stack.hub.settings.staging_dir()
    assert not list(staging.glob("*.part"))
    objects_root = embedded_stack.hub.settings.object_root()
    assert not [p for p in objects_root.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    # the refusal is kept as a record (what and why), and an exam with nothing valid is rejected
    (refused,) = ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10).refused
    assert refused.reason == error_reason(err.value) and refused.code == "INVALID_ARGUMENT"
    with pytest.raises(grpc.RpcError) as commit:
        ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=exam_id, expected_objects=1), timeout=10)
    assert commit.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(commit.value) == "NO_VALID_OBJECTS"
    assert ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10).state == "rejected"


def test_wrong_sha256_is_refused(embedded_stack, tmp_path: Path) -> None:
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    data = _ct_bytes(tmp_path)
    exam_id = _open(ingest, "sha")
    status = ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(exam_id=exam_id, size=len(data), sha256="0" * 64, role="dicom"), timeout=10
    )
    with pytest.raises(grpc.RpcError) as err:
        ingest.Upload(_chunks(status.upload_id, data, 0), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err.value) == "SHA256_MISMATCH"
    assert _count(embedded_stack, objects) == 0


def test_same_uid_same_bytes_is_stored_once(hub_stack, tmp_path: Path) -> None:
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    data = _ct_bytes(tmp_path)
    first = _send(ingest, _open(ingest, "dup-1"), data)
    assert first.state == ingest_pb2.UPLOAD_STATE_STORED
    acks = [_send(ingest, _open(ingest, f"dup-{i}"), data) for i in range(2, 6)]
    assert all(a.state == ingest_pb2.UPLOAD_STATE_DUPLICATE for a in acks)
    assert {a.object.object_id for a in acks} == {first.object.object_id}
    assert _count(hub_stack, objects) == 1


def test_same_uid_different_bytes_is_refused_and_recorded(hub_stack, tmp_path: Path) -> None:
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    data = _ct_bytes(tmp_path)
    first = _send(ingest, _open(ingest, "orig"), data)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyDescription = "changed"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(grpc.RpcError) as err:
        _send(ingest, _open(ingest, "mutated"), buf.getvalue())
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err.value) == "INSTANCE_UID_CONFLICT"
    assert _count(hub_stack, conflicts) == 1 and _count(hub_stack, objects) == 1
    with hub_stack.hub.engine.connect() as conn:
        row = conn.execute(select(objects)).one()
        assert (
            conn.execute(
                select(func.count()).select_from(events).where(events.c.type == "instance_conflict")
            ).scalar_one()
            == 1
        )
    assert row.sha256 == hashlib.sha256(data).hexdigest() == first.object.sha256
    with hub_stack.hub.store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as fh:
        assert fh.read() == data  # the original is intact


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_upload_cut_at_random_byte_resumes(hub_stack, seed: int) -> None:
    rng = random.Random(seed)
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 1024, 1536 + rng.randrange(64)
    ds.PixelData = rng.randbytes(ds.Rows * ds.Columns * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    exam_id = _open(ingest, f"resume-{seed}")
    status = _begin(ingest, exam_id, data)
    cut_at = rng.randrange(1, len(data) - 1)
    # Send up to the cut, then drop the stream (client cancel) mid-way.
    call = ingest.Upload.future(_chunks_until(status.upload_id, data, cut_at), timeout=30)
    with pytest.raises(grpc.RpcError) as cut:
        call.result()
    # the client's own abort (gRPC's status for a request iterator that raised), not a refusal by the hub
    assert (cut.value.code(), cut.value.details()) == (grpc.StatusCode.UNKNOWN, "Exception iterating requests!")
    resumed = ingest.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=status.upload_id), timeout=10)
    assert resumed.state == ingest_pb2.UPLOAD_STATE_PARTIAL
    assert 0 <= resumed.committed_offset <= cut_at
    # What was in flight when the stream broke is lost with it (HTTP/2 buffers); the client
    # re-sends from the server's confirmed offset, which never exceeds what was really written.
    # Resuming from a wrong offset is refused with the server's offset.
    with pytest.raises(grpc.RpcError) as wrong:
        ingest.Upload(
            _chunks(status.upload_id, data, max(0, resumed.committed_offset - 1) if resumed.committed_offset else 1),
            timeout=30,
        )
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(wrong.value) == "OFFSET_MISMATCH"
    resumed = ingest.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=status.upload_id), timeout=10)
    done = ingest.Upload(_chunks(status.upload_id, data, resumed.committed_offset), timeout=30)
    assert done.state == ingest_pb2.UPLOAD_STATE_STORED and done.object.sha256 == hashlib.sha256(data).hexdigest()
    exam = ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=exam_id, expected_objects=1), timeout=10)
    assert exam.state == "received" and exam.total_bytes == len(data)  # committed; triage queues it next
    assert wait_for_state(ingest, exam_id, "queued").total_bytes == len(data)


class _Cut(Exception):
    pass


def _chunks_until(upload_id: str, data: bytes, cut_at: int):
    sent = 0
    for msg in _chunks(upload_id, data, 0):
        if sent + len(msg.data) > cut_at:
            msg.data = msg.data[: cut_at - sent]
            yield msg
            raise _Cut()  # the client dies mid-stream: gRPC cancels the call
        sent += len(msg.data)
        yield msg


def test_wfdb_record_with_short_signal_is_refused_at_commit(embedded_stack, tmp_path: Path) -> None:
    from helpers import write_synthetic_wfdb

    hea, dat = write_synthetic_wfdb(tmp_path, rhythm="normal")
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    exam_id = _open(ingest, "wfdb-short", kind=common_pb2.EXAM_KIND_ECG)
    _send(ingest, exam_id, hea.read_bytes(), role="wfdb_header")
    _send(ingest, exam_id, dat.read_bytes()[:-100], role="wfdb_signal")
    with pytest.raises(grpc.RpcError) as err:
        ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=exam_id, expected_objects=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "WFDB_SIGNAL_SIZE_MISMATCH"
    exam = ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10)
    assert exam.state == "rejected"  # never queued for reading, and not left open either
    assert sorted((r.role, r.reason) for r in exam.refused) == [
        ("wfdb_header", "WFDB_SIGNAL_SIZE_MISMATCH"),
        ("wfdb_signal", "WFDB_SIGNAL_SIZE_MISMATCH"),
    ]
    # the records stay, the bytes go
    assert _count(embedded_stack, uploads) == 2 and _count(embedded_stack, objects) == 0
    objects_root = embedded_stack.hub.settings.object_root()
    assert not [p for p in objects_root.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    with pytest.raises(grpc.RpcError) as again:  # a retry gets the same answer
        ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=exam_id, expected_objects=2), timeout=10)
    assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(again.value) == "WFDB_SIGNAL_SIZE_MISMATCH"


COMPRESSED_AND_MULTIFRAME = [
    "JPEG2000.dcm",  # JPEG 2000, NM
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless, MR
    "examples_ybr_color.dcm",  # JPEG baseline, 30-frame US
    "SC_rgb_rle_2frame.dcm",  # RLE lossless, 2 frames
    "examples_jpeg2k.dcm",  # JPEG 2000 lossless, US
]


def test_compressed_and_multiframe_dicom_are_stored_byte_identical(hub_stack, tmp_path: Path) -> None:
    from teleread.gateway.uploader.client import scan_paths, upload_exams

    files = copy_testdata(tmp_path / "in", *COMPRESSED_AND_MULTIFRAME)
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    scan = scan_paths([tmp_path / "in"])
    outcomes = upload_exams(ingest, scan.exams, priority="routine")
    assert all(o.exam_id and not o.errors for o in outcomes), [o.errors for o in outcomes]
    assert sum(o.objects_stored for o in outcomes) == len(files)
    with hub_stack.hub.engine.connect() as conn:
        rows = conn.execute(select(objects)).all()
    stored = {}
    for row in rows:
        with hub_stack.hub.store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as fh:
            stored[row.sha256] = fh.read()
    for path in files:
        data = path.read_bytes()
        assert stored[hashlib.sha256(data).hexdigest()] == data
    assert {r.modality for r in rows} >= {"US", "MR", "NM", "OT"}


class _FullDisk:
    """A staging file whose disk fills up after ``room`` bytes (ENOSPC), as a small tmpfs would."""

    def __init__(self, real, room: int) -> None:
        self._real, self._room = real, room

    def write(self, data: bytes) -> int:
        import errno

        if self._room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._real.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._real.close()


def test_full_staging_disk_is_reported_and_the_upload_resumes(embedded_stack, tmp_path: Path, monkeypatch) -> None:
    staging = embedded_stack.hub.ingest._staging
    real_open = staging.open_part
    monkeypatch.setattr(staging, "open_part", lambda part: _FullDisk(real_open(part), room=2 * CHUNK))
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 512, 512
    ds.PixelData = random.Random(5).randbytes(512 * 512 * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    exam_id = _open(ingest, "full-disk")
    status = _begin(ingest, exam_id, data)
    with pytest.raises(grpc.RpcError) as err:
        ingest.Upload(_chunks(status.upload_id, data, 0), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(err.value) == "STAGING_FULL"
    assert _count(embedded_stack, objects) == 0
    monkeypatch.setattr(staging, "open_part", real_open)  # space is freed
    resumed = ingest.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=status.upload_id), timeout=10)
    assert resumed.committed_offset == 2 * CHUNK  # what fitted is kept, intact
    done = ingest.Upload(_chunks(status.upload_id, data, resumed.committed_offset), timeout=30)
    assert done.state == ingest_pb2.UPLOAD_STATE_STORED and done.object.sha256 == hashlib.sha256(data).hexdigest()
