"""Scanning files into exams (real DICOM and WFDB files), and the resumable upload protocol
driven against an in-memory fake Ingest stub (no sockets), plus rich-status decoding."""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path
from typing import Any, Iterator

import grpc
import pydicom
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from helpers import datasets_dir
from teleread.client import RetryPolicy, describe_rpc_error, error_reason
from teleread.gateway.uploader import client as upload, scan
from teleread.gateway.uploader.client import ExamKind, ObjectRole, ScanExam, file_sha256, scan_paths, upload_exams
from teleread.v1 import common_pb2, ingest_pb2

WFDB = datasets_dir() / "wfdb"
CT = Path(get_testdata_file("CT_small.dcm"))
ECG = Path(get_testdata_file("waveform_ecg.dcm"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ct_copy(path: Path, *, study_uid: str | None = None) -> Path:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    ds.save_as(path, enforce_file_format=True)
    return path


# --- scanning -------------------------------------------------------------------------------


def test_dicom_files_group_by_study_and_kind(tmp_path: Path) -> None:
    _ct_copy(tmp_path / "a.dcm")
    _ct_copy(tmp_path / "b.dcm")
    shutil.copy(ECG, tmp_path / "ecg.dcm")
    result = scan_paths([tmp_path])
    exams = {exam.client_exam_key: exam for exam in result.exams}
    ct_study = str(pydicom.dcmread(CT).StudyInstanceUID)
    ecg_study = str(pydicom.dcmread(ECG, stop_before_pixels=True).StudyInstanceUID)
    assert set(exams) == {ct_study, ecg_study}
    assert exams[ct_study].kind is ExamKind.IMAGING and exams[ct_study].modality == "CT"
    assert sorted(o.name for o in exams[ct_study].objects) == ["a.dcm", "b.dcm"]
    assert exams[ecg_study].kind is ExamKind.ECG
    for obj in exams[ct_study].objects + exams[ecg_study].objects:
        assert obj.role is ObjectRole.DICOM
        assert obj.sha256 == _sha(obj.path) and obj.size == obj.path.stat().st_size
    assert result.skipped == []


def test_dicom_found_by_magic_not_extension(tmp_path: Path) -> None:
    shutil.copy(CT, tmp_path / "image.txt")
    (tmp_path / "fake.dcm").write_bytes(b"not a dicom file at all")
    result = scan_paths([tmp_path])
    assert [o.name for e in result.exams for o in e.objects] == ["image.txt"]
    assert [(s.path.name, "not DICOM" in s.reason) for s in result.skipped] == [("fake.dcm", True)]


def test_same_study_with_ecg_and_images_makes_two_exams(tmp_path: Path) -> None:
    study = str(pydicom.dcmread(ECG, stop_before_pixels=True).StudyInstanceUID)
    _ct_copy(tmp_path / "ct.dcm", study_uid=study)
    shutil.copy(ECG, tmp_path / "ecg.dcm")
    keys = {(e.client_exam_key, e.kind) for e in scan_paths([tmp_path]).exams}
    assert keys == {(f"{study}:imaging", ExamKind.IMAGING), (f"{study}:ecg", ExamKind.ECG)}


def test_unusable_dicom_is_skipped_with_a_reason(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "nostudy.dcm")
    (tmp_path / "stub.dcm").write_bytes(b"\0" * 128 + b"DICM")
    result = scan_paths([tmp_path])
    assert result.exams == []
    assert {s.path.name: s.reason for s in result.skipped} == {
        "nostudy.dcm": "DICOM file has no StudyInstanceUID",
        "stub.dcm": "DICOM file has no StudyInstanceUID",
    }


def test_parser_error_text_never_reaches_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(CT, tmp_path / "ct.dcm")

    def broken(*_: Any, **__: Any) -> None:
        raise ValueError("PatientName PHI_CANARY_张三 is malformed")

    monkeypatch.setattr(scan.pydicom, "dcmread", broken)
    [skipped] = scan_paths([tmp_path]).skipped
    assert skipped.reason == "unreadable DICOM header (ValueError)"


def test_identical_copies_upload_once(tmp_path: Path) -> None:
    shutil.copy(CT, tmp_path / "one.dcm")
    shutil.copy(CT, tmp_path / "two.dcm")
    result = scan_paths([tmp_path, tmp_path / "one.dcm"])  # the same file named twice, too
    assert [o.name for o in result.exams[0].objects] == ["one.dcm"]
    skipped = [(s.path.name, s.reason) for s in result.skipped]
    assert skipped == [("two.dcm", "identical to one.dcm")]


def test_wfdb_records_are_exams_keyed_by_content(tmp_path: Path) -> None:
    shutil.copytree(WFDB / "ptbxl-records100", tmp_path / "ptbxl")
    shutil.copytree(WFDB / "mitdb-100-60s", tmp_path / "mitdb")
    result = scan_paths([tmp_path])
    assert len(result.exams) == 3
    for exam in result.exams:
        header, signal = exam.objects
        assert exam.kind is ExamKind.ECG and exam.modality == "ECG"
        assert (header.role, signal.role) == (ObjectRole.WFDB_HEADER, ObjectRole.WFDB_SIGNAL)
        assert signal.path == header.path.with_suffix(".dat")
        expected = hashlib.sha256((_sha(header.path) + _sha(signal.path)).encode()).hexdigest()
        assert exam.client_exam_key == expected
    assert [(s.path.name, "WFDB" in s.reason) for s in result.skipped] == [("100.atr", True)]
    assert {e.client_exam_key for e in scan_paths([tmp_path]).exams} == {e.client_exam_key for e in result.exams}


def test_header_path_alone_finds_its_signal_file() -> None:
    [exam] = scan_paths([WFDB / "mitdb-100-60s" / "100.hea"]).exams
    assert [(o.name, o.role) for o in exam.objects] == [
        ("100.hea", ObjectRole.WFDB_HEADER),
        ("100.dat", ObjectRole.WFDB_SIGNAL),
    ]


def test_record_with_two_signal_files_is_skipped_whole() -> None:
    result = scan_paths([WFDB / "ptbdb-s0010_re"])  # s0010_re.dat + s0010_re.xyz
    assert result.exams == []
    assert [(s.path.name, s.reason) for s in result.skipped] == [
        ("s0010_re.hea", "WFDB record with more than one signal file is not supported")
    ]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("rec 1 360\nrec.dat 212 200 11 0 0 0 0 I\n", "WFDB signal file missing: rec.dat"),
        ("rec/2 1 360\n", "multi-segment WFDB records are not supported"),
        ("rec 1 360\n../rec.dat 16 200 16 0 0 0 0 I\n", "WFDB signal file outside"),
        ("# only a comment\n", "not a WFDB header"),
        ("rec 2 360\nrec.dat 16 200 16 0 0 0 0 I\n", "too few signal lines"),
    ],
)
def test_bad_wfdb_headers_are_skipped(tmp_path: Path, header: str, reason: str) -> None:
    (tmp_path / "rec.hea").write_text(header)
    result = scan_paths([tmp_path])
    assert result.exams == []
    assert len(result.skipped) == 1 and reason in result.skipped[0].reason


def test_missing_path_is_reported(tmp_path: Path) -> None:
    result = scan_paths([tmp_path / "nowhere"])
    skipped = [(s.path.name, s.reason) for s in result.skipped]
    assert skipped == [("nowhere", "no such file or folder")]


def test_sha256_streams_large_files(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 9000)  # > 2 MiB: several 1 MiB reads
    assert file_sha256(path) == _sha(path)


# --- the upload protocol against a fake Ingest stub ------------------------------------------


class FakeRpcError(grpc.RpcError, grpc.Call):
    def __init__(self, code: grpc.StatusCode, message: str, *details: Any) -> None:
        self._code, self._message = code, message
        packed = []
        for detail in details:
            item = any_pb2.Any()
            item.Pack(detail)
            packed.append(item)
        status = status_pb2.Status(code=code.value[0], message=message, details=packed)
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> Any:
        return self._trailers

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def _error_info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="teleread")


class FakeIngest:
    """Keeps uploads in memory; ``cuts`` lists stream failures to inject, in order, as
    (bytes received in that stream before failing, error)."""

    def __init__(self, cuts: list[tuple[int, FakeRpcError]] | None = None) -> None:
        self.cuts = list(cuts or [])
        self.uploads: dict[str, dict[str, Any]] = {}
        self.committed: dict[str, int] = {}
        self.chunk_sizes: list[int] = []
        self.reject_names: set[str] = set()
        self.refused: dict[str, int] = {}  # exam id -> objects refused (as the hub records them)
        self.open_error: FakeRpcError | None = None

    def OpenExam(self, request: ingest_pb2.OpenExamRequest, timeout: float) -> common_pb2.Exam:
        assert timeout > 0
        if self.open_error:
            raise self.open_error
        return common_pb2.Exam(exam_id=f"ex-{request.client_exam_key[:8]}", state="receiving")

    def BeginUpload(self, request: ingest_pb2.BeginUploadRequest, timeout: float) -> Any:
        if request.name in self.reject_names:
            self.refused[request.exam_id] = self.refused.get(request.exam_id, 0) + 1
            bad = error_details_pb2.BadRequest()
            bad.field_violations.add(field="name", description="not a DICOM instance")
            raise FakeRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "object rejected", _error_info("DICOM_NO_SOP_INSTANCE_UID"), bad
            )
        upload_id = f"up-{request.sha256[:12]}"
        self.uploads.setdefault(upload_id, {"data": bytearray(), "request": request})
        return self.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=upload_id), 1)

    def GetUploadStatus(self, request: ingest_pb2.GetUploadStatusRequest, timeout: float) -> Any:
        entry = self.uploads[request.upload_id]
        data, begin = entry["data"], entry["request"]
        done = len(data) == begin.size and hashlib.sha256(data).hexdigest() == begin.sha256
        state = ingest_pb2.UPLOAD_STATE_STORED if done else ingest_pb2.UPLOAD_STATE_PARTIAL
        return ingest_pb2.UploadStatus(
            upload_id=request.upload_id, committed_offset=len(data), size=begin.size, state=state
        )

    def Upload(self, chunks: Iterator[ingest_pb2.UploadChunk], timeout: float) -> Any:
        first = next(chunks)
        data = self.uploads[first.upload_id]["data"]
        cut = self.cuts.pop(0) if self.cuts else None
        if first.offset != len(data):
            raise FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "offset", _error_info("OFFSET_MISMATCH"))
        received = 0
        for chunk in itertools.chain([first], chunks):
            self.chunk_sizes.append(len(chunk.data))
            if cut is not None and received >= cut[0]:
                raise cut[1]
            data.extend(chunk.data)
            received += len(chunk.data)
        return self.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=first.upload_id), 1)

    def CommitExam(self, request: ingest_pb2.CommitExamRequest, timeout: float) -> Any:
        refused = self.refused.get(request.exam_id, 0)
        if refused == request.expected_objects:  # as the hub: nothing valid, the exam is rejected
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "nothing valid", _error_info("NO_VALID_OBJECTS"))
        self.committed[request.exam_id] = request.expected_objects - refused
        return common_pb2.Exam(exam_id=request.exam_id, state="queued", incomplete=refused > 0, refused_count=refused)


FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


def _big_exam(tmp_path: Path, name: str = "big.dcm", size: int = 300_000) -> ScanExam:
    path = tmp_path / name
    path.write_bytes(hashlib.sha256(name.encode()).digest() * (size // 32))
    obj = upload.ScanObject(path, path.stat().st_size, file_sha256(path), ObjectRole.DICOM)
    return ScanExam(f"key-{name}", ExamKind.IMAGING, "CT", "1.2.3", [obj])


def test_cut_stream_resumes_from_the_confirmed_offset(tmp_path: Path) -> None:
    exam = _big_exam(tmp_path)
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection reset")
    ingest = FakeIngest(cuts=[(128 * 1024, unavailable)])
    sent: list[int] = []
    sleeps: list[float] = []
    [outcome] = upload_exams(
        ingest, [exam], chunk_size=64 * 1024, progress=sent.append, retry=FAST, sleep=sleeps.append
    )
    assert outcome.ok and outcome.state == "queued" and outcome.objects_stored == 1
    [entry] = ingest.uploads.values()
    assert bytes(entry["data"]) == exam.objects[0].path.read_bytes()
    assert max(ingest.chunk_sizes) <= 64 * 1024
    assert sum(sent) == exam.total_bytes and min(sent) > 0  # re-sent bytes count once
    assert len(sleeps) == 1 and 0 < sleeps[0] <= FAST.max_backoff
    assert ingest.committed == {outcome.exam_id: 1}


def test_offset_mismatch_is_resolved_through_get_upload_status(tmp_path: Path) -> None:
    exam = _big_exam(tmp_path)
    ingest = FakeIngest()
    begin = ingest.BeginUpload
    state = {"calls": 0}

    def begin_with_stale_offset(request: Any, timeout: float) -> Any:
        status = begin(request, timeout)
        ingest.uploads[status.upload_id]["data"].extend(exam.objects[0].path.read_bytes()[:1000])
        state["calls"] += 1
        return status  # still says offset 0: the first Upload hits OFFSET_MISMATCH

    ingest.BeginUpload = begin_with_stale_offset  # type: ignore[method-assign]
    [outcome] = upload_exams(ingest, [exam], retry=FAST, sleep=lambda _: None)
    assert outcome.ok and outcome.objects_stored == 1
    assert bytes(next(iter(ingest.uploads.values()))["data"]) == exam.objects[0].path.read_bytes()


def test_rejected_object_leaves_its_exam_uncommitted_and_others_go_on(tmp_path: Path) -> None:
    bad, good = _big_exam(tmp_path, "bad.dcm", 1000), _big_exam(tmp_path, "good.dcm", 1000)
    ingest = FakeIngest()
    ingest.reject_names = {"bad.dcm"}
    bad_outcome, good_outcome = upload_exams(ingest, [bad, good], retry=FAST, sleep=lambda _: None)
    assert not bad_outcome.ok and bad_outcome.exam_id not in ingest.committed
    [refused] = bad_outcome.refused
    assert (refused.name, refused.reason, refused.message) == (
        "bad.dcm",
        "DICOM_NO_SOP_INSTANCE_UID",
        "object rejected",
    )
    [error] = bad_outcome.errors
    assert error.startswith("commit exam: INVALID_ARGUMENT") and "reason=NO_VALID_OBJECTS" in error
    assert bad_outcome.codes == ["INVALID_ARGUMENT"]
    assert good_outcome.ok and ingest.committed == {good_outcome.exam_id: 1}


def test_a_refused_instance_does_not_take_its_study_down(tmp_path: Path) -> None:
    exam = _big_exam(tmp_path, "good.dcm", 1000)
    exam.objects.append(_big_exam(tmp_path, "bad.dcm", 1000).objects[0])
    ingest = FakeIngest()
    ingest.reject_names = {"bad.dcm"}
    [outcome] = upload_exams(ingest, [exam], retry=FAST, sleep=lambda _: None)
    assert outcome.ok and outcome.incomplete and ingest.committed == {outcome.exam_id: 1}
    assert [r.name for r in outcome.refused] == ["bad.dcm"] and outcome.objects_stored == 1


def test_retries_are_bounded(tmp_path: Path) -> None:
    exam = _big_exam(tmp_path)
    cut = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    ingest = FakeIngest(cuts=[(0, cut)] * 20)  # fails before a byte is accepted, every time
    sleeps: list[float] = []
    [outcome] = upload_exams(ingest, [exam], retry=FAST, sleep=sleeps.append)
    assert not outcome.ok and "UNAVAILABLE" in outcome.errors[0]
    assert len(sleeps) == FAST.max_attempts and ingest.committed == {}


def test_authentication_failure_stops_the_run(tmp_path: Path) -> None:
    exams = [_big_exam(tmp_path, "a.dcm", 100), _big_exam(tmp_path, "b.dcm", 100)]
    ingest = FakeIngest()
    ingest.open_error = FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "bad token")
    first, second = upload_exams(ingest, exams, retry=FAST, sleep=lambda _: None, parallel=1)
    assert "UNAUTHENTICATED" in first.errors[0]
    assert second.errors == ["not attempted after UNAUTHENTICATED"]
    # With parallel streams, exams already started fail on their own; none is committed.
    outcomes = upload_exams(ingest, exams * 3, retry=FAST, sleep=lambda _: None, parallel=2)
    assert all("UNAUTHENTICATED" in o.errors[0] for o in outcomes) and ingest.committed == {}


def test_describe_rpc_error_decodes_rich_status() -> None:
    info = error_details_pb2.ErrorInfo(reason="LEASE_LOST", metadata={"exam_id": "ex-1"})
    request = error_details_pb2.RequestInfo(request_id="req-9")
    err = FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "claim lapsed", info, request)
    assert describe_rpc_error(err) == (
        "FAILED_PRECONDITION: claim lapsed [reason=LEASE_LOST exam_id=ex-1] [request_id=req-9]"
    )
    assert error_reason(err) == "LEASE_LOST"


def test_file_shortened_after_scan_is_reported_not_committed(tmp_path: Path) -> None:
    exam = _big_exam(tmp_path)
    path = exam.objects[0].path
    path.write_bytes(path.read_bytes()[:1000])
    [outcome] = upload_exams(FakeIngest(), [exam], retry=FAST, sleep=lambda _: None)
    assert outcome.errors == ["big.dcm: CHANGED: file changed since it was scanned"]
    assert outcome.state == "receiving"
