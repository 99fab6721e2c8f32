"""Clinic-side upload: find exams in files and folders, and upload them resumably to the hub.

Owns: scanning paths into exams (DICOM files found by the "DICM" magic and grouped by
StudyInstanceUID; WFDB records as a .hea plus the one signal file it names), streaming SHA-256, the
resumable chunked upload of the Ingest contract (OpenExam, BeginUpload, Upload, GetUploadStatus,
CommitExam) and the ``teleread upload`` command. Files are read in chunks, never whole.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import warnings
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import pydicom
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from teleread.client import (
    DEFAULT_TIMEOUT,
    Backoff,
    RetryPolicy,
    call_with_retry,
    RETRYABLE_CODES,
    add_connection_args,
    connect,
    describe_rpc_error,
    error_reason,
    print_error,
    retry_delay_hint,
    rpc_code,
)
from teleread.errors import TelereadError
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("teleread.gateway.upload")
DEFAULT_PARALLEL = 4  # concurrent streams per client
DEFAULT_RETRY = RetryPolicy()

CHUNK_SIZE = 1024 * 1024
HASH_READ_SIZE = 1024 * 1024
MAX_WFDB_HEADER_BYTES = 1024 * 1024
MIN_UPLOAD_RATE = 64 * 1024  # bytes/s assumed when sizing an upload stream's deadline
WAVEFORM_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.9."
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
_DICOM_TAGS = ["StudyInstanceUID", "Modality", "SOPClassUID"]
_DONE = (ingest_pb2.UPLOAD_STATE_STORED, ingest_pb2.UPLOAD_STATE_DUPLICATE)
_FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
PRIORITIES = {
    "stat": common_pb2.PRIORITY_STAT,
    "urgent": common_pb2.PRIORITY_URGENT,
    "routine": common_pb2.PRIORITY_ROUTINE,
}


class ExamKind(StrEnum):
    ECG = "ecg"
    IMAGING = "imaging"


class Role(StrEnum):
    DICOM = "dicom"
    WFDB_HEADER = "wfdb_header"
    WFDB_SIGNAL = "wfdb_signal"


_KIND_TO_PROTO = {
    ExamKind.ECG: common_pb2.EXAM_KIND_ECG,
    ExamKind.IMAGING: common_pb2.EXAM_KIND_IMAGING,
}


@dataclass(frozen=True)
class ScanObject:
    """One file to upload as one object of an exam."""

    path: Path
    size: int
    sha256: str
    role: Role

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ScanExam:
    """Files that make one exam: a DICOM study of one kind, or one WFDB record."""

    client_exam_key: str
    kind: ExamKind
    modality: str
    study_instance_uid: str = ""
    objects: list[ScanObject] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(obj.size for obj in self.objects)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class ScanResult:
    exams: list[ScanExam] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(exam.total_bytes for exam in self.exams)


class _Skip(Exception):
    """A file cannot be part of an exam; the message is our own reason."""


def file_sha256(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(HASH_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _scan_object(path: Path, role: Role) -> ScanObject:
    try:
        return ScanObject(path, path.stat().st_size, file_sha256(path), role)
    except OSError as err:
        raise _Skip(f"cannot read file ({type(err).__name__})") from None


def _collect_files(paths: Sequence[Path], skipped: list[SkippedFile]) -> list[Path]:
    seen: set[Path] = set()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [Path(d) / n for d, _, names in os.walk(path) for n in names]
        elif path.is_file():
            found = [path]
        else:
            skipped.append(SkippedFile(path, "no such file or folder"))
            continue
        for file in sorted(found):
            if file.is_file() and file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    return files


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as stream:
        head = stream.read(132)
    return head[128:132] == b"DICM"


def _dicom_exam_fields(path: Path) -> tuple[str, ExamKind, str]:
    """(StudyInstanceUID, kind, modality) from the header; the pixel data is never read."""
    try:
        with warnings.catch_warnings():  # pydicom's warnings can quote element values
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except Exception as err:  # pydicom raises many types; its text can quote the data
        raise _Skip(f"unreadable DICOM header ({type(err).__name__})") from None
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if sop_class == MEDIA_DIRECTORY_SOP_CLASS:
        raise _Skip("DICOMDIR media directory, not an instance")
    study_uid = str(ds.get("StudyInstanceUID") or "").strip()
    if not study_uid:
        raise _Skip("DICOM file has no StudyInstanceUID")
    modality = str(ds.get("Modality") or "").strip().upper()
    is_ecg = modality == "ECG" or sop_class.startswith(WAVEFORM_SOP_CLASS_PREFIX)
    return study_uid, ExamKind.ECG if is_ecg else ExamKind.IMAGING, modality


def _dicom_exams(files: list[Path], skipped: list[SkippedFile]) -> list[ScanExam]:
    groups: dict[tuple[str, ExamKind], list[tuple[ScanObject, str]]] = {}
    for path in files:
        try:
            study_uid, kind, modality = _dicom_exam_fields(path)
            obj = _scan_object(path, Role.DICOM)
        except _Skip as skip:
            skipped.append(SkippedFile(path, str(skip)))
            continue
        groups.setdefault((study_uid, kind), []).append((obj, modality))
    kinds_per_study = Counter(study_uid for study_uid, _ in groups)
    exams = []
    for (study_uid, kind), members in groups.items():
        mixed = kinds_per_study[study_uid] > 1
        common = Counter(m for _, m in members if m).most_common(1)
        exam = ScanExam(
            client_exam_key=f"{study_uid}#{kind.value}" if mixed else study_uid,
            kind=kind,
            modality=common[0][0] if common else "",
            study_instance_uid=study_uid,
        )
        _add_unique(exam, [obj for obj, _ in members], skipped)
        exams.append(exam)
    return exams


def _add_unique(exam: ScanExam, objects: list[ScanObject], skipped: list[SkippedFile]) -> None:
    """Add objects, skipping byte-identical copies (the hub would store them once)."""
    by_hash: dict[str, ScanObject] = {}
    for obj in objects:
        if obj.sha256 in by_hash:
            skipped.append(SkippedFile(obj.path, f"identical to {by_hash[obj.sha256].name}"))
            continue
        by_hash[obj.sha256] = obj
        exam.objects.append(obj)


def wfdb_signal_files(header: Path) -> list[str]:
    """The distinct signal file names a WFDB header's signal lines name, in order."""
    if header.stat().st_size > MAX_WFDB_HEADER_BYTES:
        raise _Skip("too large for a WFDB header")
    text = header.read_bytes().decode("latin-1")
    lines = [ln.split("#", 1)[0].split() for ln in text.splitlines()]
    lines = [tokens for tokens in lines if tokens]
    if not lines or len(lines[0]) < 2 or not lines[0][1].isdigit():
        raise _Skip("not a WFDB header (bad record line)")
    if "/" in lines[0][0]:
        raise _Skip("multi-segment WFDB records are not supported")
    count = int(lines[0][1])
    if count == 0 or len(lines) < 1 + count:
        raise _Skip("WFDB header names no signal files or too few signal lines")
    names = list(dict.fromkeys(tokens[0] for tokens in lines[1 : 1 + count]))
    if any(Path(name).name != name or name in ("-", "..", ".") for name in names):
        raise _Skip("WFDB signal file outside the header's folder")
    return names


def _wfdb_exams(headers: list[Path], skipped: list[SkippedFile]) -> tuple[list[ScanExam], set[Path]]:
    """One exam per readable record, and the signal files claimed by the headers."""
    exams: list[ScanExam] = []
    claimed: set[Path] = set()
    for header in headers:
        try:
            signals = [header.parent / name for name in wfdb_signal_files(header)]
            claimed.update(p.resolve() for p in signals)
            if len(signals) > 1:  # the hub takes exactly one .hea and one signal file
                raise _Skip("WFDB record with more than one signal file is not supported")
            missing = [p.name for p in signals if not p.is_file()]
            if missing:
                raise _Skip(f"WFDB signal file missing: {', '.join(missing)}")
            objects = [_scan_object(header, Role.WFDB_HEADER)]
            objects += [_scan_object(p, Role.WFDB_SIGNAL) for p in signals]
        except _Skip as skip:
            skipped.append(SkippedFile(header, str(skip)))
            continue
        except OSError as err:
            skipped.append(SkippedFile(header, f"cannot read file ({type(err).__name__})"))
            continue
        key = hashlib.sha256("".join(obj.sha256 for obj in objects).encode("ascii"))
        exam = ScanExam(key.hexdigest(), ExamKind.ECG, modality="ECG")
        _add_unique(exam, objects, skipped)
        exams.append(exam)
    return exams, claimed


def scan_paths(paths: Sequence[Path]) -> ScanResult:
    """Walk files and folders into exams; everything else is listed as skipped with a reason."""
    result = ScanResult()
    dicom: list[Path] = []
    headers: list[Path] = []
    others: list[Path] = []
    for path in _collect_files(paths, result.skipped):
        try:
            is_dicom = _is_dicom(path)
        except OSError as err:
            result.skipped.append(SkippedFile(path, f"cannot read file ({type(err).__name__})"))
            continue
        if is_dicom:
            dicom.append(path)
        else:
            (headers if path.suffix.lower() == ".hea" else others).append(path)
    result.exams.extend(_dicom_exams(dicom, result.skipped))
    wfdb_exams, claimed = _wfdb_exams(headers, result.skipped)
    result.exams.extend(wfdb_exams)
    for path in others:
        if path.resolve() not in claimed:
            reason = "not DICOM (no DICM preamble) nor part of a WFDB record"
            result.skipped.append(SkippedFile(path, reason))
    return result


@dataclass
class ExamOutcome:
    """What became of one exam: its hub id and state, or the errors that kept it open."""

    key: str
    exam_id: str = ""
    state: str = ""
    objects_stored: int = 0
    objects_duplicate: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class _Uploader:
    ingest: ingest_pb2_grpc.IngestStub
    priority: common_pb2.Priority
    indication: str
    chunk_size: int
    progress: Callable[[int], None] | None
    timeout: float
    retry: RetryPolicy
    sleep: Callable[[float], None]
    parallel: int = 1
    fatal: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _call(self, rpc: str, request: Any) -> Any:
        """An idempotent unary Ingest call with a deadline, repeated after retryable failures."""
        method = getattr(self.ingest, rpc)
        return call_with_retry(
            lambda: method(request, timeout=self.timeout),
            policy=self.retry,
            sleep=self.sleep,
            what=rpc,
        )

    def upload_exam(self, exam: ScanExam) -> ExamOutcome:
        outcome = ExamOutcome(key=exam.client_exam_key)
        request = ingest_pb2.OpenExamRequest(
            client_exam_key=exam.client_exam_key,
            kind=_KIND_TO_PROTO[exam.kind],
            priority=self.priority,
            indication=self.indication,
            study_instance_uid=exam.study_instance_uid,
        )
        try:
            opened = self._call("OpenExam", request)
        except grpc.RpcError as err:
            return self._failed(outcome, "open exam", err)
        outcome.exam_id, outcome.state = opened.exam_id, opened.state
        workers = max(1, min(self.parallel, len(exam.objects)))
        if workers == 1:
            for obj in exam.objects:
                self._upload_object_into(outcome, obj)
        else:  # several streams at once: the hub validates and stores one while another arrives
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload") as pool:
                list(pool.map(lambda obj: self._upload_object_into(outcome, obj), exam.objects))
        if self.fatal or outcome.errors:
            return outcome
        commit = ingest_pb2.CommitExamRequest(exam_id=opened.exam_id, expected_objects=len(exam.objects))
        try:
            done = self._call("CommitExam", commit)
        except grpc.RpcError as err:
            return self._failed(outcome, "commit exam", err)
        outcome.state = done.state
        log.info("exam committed", extra={"exam_id": done.exam_id, "state": done.state})
        return outcome

    def _failed(self, outcome: ExamOutcome, what: str, err: grpc.RpcError) -> ExamOutcome:
        with self._lock:
            outcome.errors.append(f"{what}: {describe_rpc_error(err)}")
            if rpc_code(err) in _FATAL_CODES:
                self.fatal = rpc_code(err).name
        return outcome

    def _upload_object_into(self, outcome: ExamOutcome, obj: ScanObject) -> None:
        if self.fatal:
            return
        try:
            status = self.upload_object(outcome.exam_id, obj)
        except grpc.RpcError as err:
            self._failed(outcome, obj.name, err)
            return
        except (OSError, TelereadError) as err:
            reason = str(err) if isinstance(err, TelereadError) else type(err).__name__
            with self._lock:
                outcome.errors.append(f"{obj.name}: {reason}")
            return
        with self._lock:
            if status.state == ingest_pb2.UPLOAD_STATE_DUPLICATE:
                outcome.objects_duplicate += 1
            else:
                outcome.objects_stored += 1

    def upload_object(self, exam_id: str, obj: ScanObject) -> ingest_pb2.UploadStatus:
        """Announce, stream and resume one object until the hub reports it stored."""
        begin = ingest_pb2.BeginUploadRequest(
            exam_id=exam_id, size=obj.size, sha256=obj.sha256, role=obj.role.value, name=obj.name
        )
        status = self._call("BeginUpload", begin)
        mark = _Mark(self.progress)
        backoff = Backoff(self.retry)
        while status.state not in _DONE:
            start = status.committed_offset
            failure: grpc.RpcError | None = None
            try:
                status = self._stream(obj, status.upload_id, offset=start, mark=mark)
            except grpc.RpcError as err:
                if not _resumable(err):
                    raise
                failure = err
            if failure is None and (status.state in _DONE or status.committed_offset > start):
                backoff.reset()
                continue
            self._pause(backoff, failure, what="upload stream" if failure else "stalled upload")
            status = self._status(status.upload_id)
            if status.committed_offset > start:
                backoff.reset()
        mark.reach(obj.size)
        log.info("object uploaded", extra={"exam_id": exam_id, "upload_id": status.upload_id})
        return status

    def _pause(self, backoff: Backoff, err: grpc.RpcError | None, *, what: str) -> None:
        delay = backoff.next_delay(retry_delay_hint(err) if err is not None else None)
        if delay is None:
            if err is not None:
                raise err
            raise TelereadError("upload made no progress; giving up", reason="NO_PROGRESS")
        log.info("resuming %s", what, extra={"status": rpc_code(err).name if err else "PARTIAL"})
        self.sleep(delay)

    def _status(self, upload_id: str) -> ingest_pb2.UploadStatus:
        request = ingest_pb2.GetUploadStatusRequest(upload_id=upload_id)
        return self._call("GetUploadStatus", request)

    def _stream(self, obj: ScanObject, upload_id: str, *, offset: int, mark: _Mark) -> ingest_pb2.UploadStatus:
        reader = _ChunkReader(obj, upload_id=upload_id, offset=offset, size=self.chunk_size)
        deadline = self.timeout + (obj.size - offset) / MIN_UPLOAD_RATE
        try:
            status = self.ingest.Upload(reader.chunks(mark), timeout=deadline)
        except grpc.RpcError:
            if reader.error is not None:  # our read failed and cut the stream short
                raise reader.error from None
            raise
        if reader.error is not None:
            raise reader.error
        return status


class _Mark:
    """Progress high-water mark of one object: bytes re-sent after a resume count once."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.progress = progress
        self.reached = 0

    def reach(self, offset: int) -> None:
        if offset > self.reached:
            if self.progress is not None:
                self.progress(offset - self.reached)
            self.reached = offset


@dataclass
class _ChunkReader:
    obj: ScanObject
    upload_id: str
    offset: int
    size: int
    error: OSError | TelereadError | None = None

    def chunks(self, mark: _Mark) -> Iterator[ingest_pb2.UploadChunk]:
        """The stream's messages: the first names the upload and offset; at most ``size``
        bytes each; reading stops at the scanned size. A read error or a file shorter than
        when it was scanned ends the stream early and is kept in ``error``."""
        try:
            with self.obj.path.open("rb") as stream:
                stream.seek(self.offset)
                position = self.offset
                data = stream.read(min(self.size, self.obj.size - position))
                yield ingest_pb2.UploadChunk(upload_id=self.upload_id, offset=position, data=data)
                while data:
                    position += len(data)
                    mark.reach(position)
                    data = stream.read(min(self.size, self.obj.size - position))
                    if data:
                        yield ingest_pb2.UploadChunk(data=data)
            if position < self.obj.size:
                self.error = TelereadError("file changed since it was scanned", reason="CHANGED")
        except OSError as err:
            self.error = err


def _resumable(err: grpc.RpcError) -> bool:
    code = rpc_code(err)
    if code in RETRYABLE_CODES or code == grpc.StatusCode.INTERNAL:
        return True
    return code == grpc.StatusCode.FAILED_PRECONDITION and error_reason(err) == "OFFSET_MISMATCH"


def upload_exams(
    ingest: ingest_pb2_grpc.IngestStub,
    exams: Sequence[ScanExam],
    *,
    priority: str = "routine",
    indication: str = "",
    chunk_size: int = CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
    parallel: int = DEFAULT_PARALLEL,
) -> list[ExamOutcome]:
    """Upload every exam (resuming cut streams), committing those whose objects all stored.
    ``progress`` receives the number of newly sent bytes (bytes re-sent after a cut count once).
    A rejected object is reported in its exam's errors and that exam is left uncommitted.
    ``parallel`` streams run at once (across the objects of an exam, and across exams)."""
    uploader = _Uploader(
        ingest,
        PRIORITIES[priority],
        indication,
        min(chunk_size, CHUNK_SIZE),
        progress,
        timeout,
        retry,
        sleep,
        parallel=max(1, parallel),
    )

    def one(exam: ScanExam) -> ExamOutcome:
        if uploader.fatal:
            return ExamOutcome(key=exam.client_exam_key, errors=[f"not attempted after {uploader.fatal}"])
        return uploader.upload_exam(exam)

    if uploader.parallel == 1 or len(exams) < 2:
        return [one(exam) for exam in exams]
    with ThreadPoolExecutor(max_workers=uploader.parallel, thread_name_prefix="exam") as pool:
        return list(pool.map(one, exams))


def _print_skipped(console: Console, skipped: list[SkippedFile]) -> None:
    for item in skipped:
        console.print(f"[yellow]skipped[/] {escape(str(item.path))}: {escape(item.reason)}")


def _outcome_table(exams: Sequence[ScanExam], outcomes: list[ExamOutcome]) -> Table:
    table = Table(title="Upload")
    for column in ("exam id", "kind", "modality", "objects", "stored", "duplicate", "state"):
        table.add_column(column)
    for exam, outcome in zip(exams, outcomes):
        state = outcome.state or "-"
        table.add_row(
            outcome.exam_id or "-",
            exam.kind.value,
            exam.modality or "-",
            str(len(exam.objects)),
            str(outcome.objects_stored),
            str(outcome.objects_duplicate),
            state if outcome.ok else f"[red]{state} (not committed)",
        )
    return table


def _upload_with_bar(
    console: Console, scan: ScanResult, *, channel: grpc.Channel, args: argparse.Namespace
) -> list[ExamOutcome]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("uploading", total=scan.total_bytes)
        return upload_exams(
            ingest_pb2_grpc.IngestStub(channel),
            scan.exams,
            priority=args.priority,
            indication=args.indication,
            progress=lambda sent: bar.advance(task, sent),
            timeout=args.timeout,
        )


def run_upload_cli(args: argparse.Namespace) -> int:
    """``teleread upload``: scan, upload with a progress bar, print each exam's id and state.
    Exit 0 when every exam was committed, 1 otherwise (2 for a local problem)."""
    console = Console()
    with console.status("scanning"):
        scan = scan_paths(args.paths)
    _print_skipped(console, scan.skipped)
    if not scan.exams:
        print_error("no DICOM files or WFDB records found")
        return 1
    try:
        channel = connect(args, metadata=(("x-teleread-site", args.site),))
    except TelereadError as err:
        print_error(str(err))
        return 2
    except OSError as err:
        print_error(f"cannot read a TLS file ({type(err).__name__})")
        return 2
    with channel:
        outcomes = _upload_with_bar(console, scan, channel=channel, args=args)
    console.print(_outcome_table(scan.exams, outcomes))
    for exam, outcome in zip(scan.exams, outcomes):
        for error in outcome.errors:
            label = outcome.exam_id or exam.client_exam_key[:16]
            console.print(f"[red]error[/] exam {escape(label)}: {escape(error)}")
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def add_upload_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``teleread upload PATH... --site SITE`` on an argparse subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "upload", help="upload DICOM files and WFDB records to the hub"
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    parser.add_argument("--site", required=True, help="your site (checked against the token)")
    parser.add_argument("--priority", choices=sorted(PRIORITIES), default="routine")
    parser.add_argument("--indication", default="", help="clinical question for the reader")
    add_connection_args(parser)
    parser.set_defaults(func=run_upload_cli)
    return parser
