"""Clinic-side upload: exams found by ``teleread.gateway.uploader.scan`` uploaded resumably to the hub.

Owns: the resumable chunked upload of the Ingest contract (OpenExam, BeginUpload, Upload,
GetUploadStatus, CommitExam) with several streams at once, retries with capped backoff, and the
``teleread upload`` command with its progress bar. Files are read in chunks, never whole. What the
technician knows of the patient goes with the exam (the files' own values win at the hub); it is
never printed or logged here.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
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
    connect_or_explain,
    describe_rpc_error,
    error_reason,
    print_error,
    retry_delay_hint,
    rpc_code,
)
from teleread.errors import TelereadError
from teleread.files import sha256_hex
from teleread.gateway.uploader.patient_options import add_patient_options, patient_from_args, patient_message
from teleread.patient import PatientContext
from teleread.gateway.uploader.schedule import TokenBucket, worth_compressing
from teleread.gateway.uploader.scan import (  # re-exported: callers import the client API from here
    ExamKind,
    ObjectRole,
    ScanExam,
    ScanObject,
    ScanResult,
    SkippedFile,
    file_sha256,
    scan_paths,
)
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from teleread.vocab import Priority

log = logging.getLogger("teleread.gateway.uploader.client")
DEFAULT_PARALLEL = 4  # concurrent streams per client
DEFAULT_RETRY = RetryPolicy()

CHUNK_SIZE = 1024 * 1024
MIN_UPLOAD_RATE = 64 * 1024  # bytes/s assumed when sizing an upload stream's deadline
# how often a stream bound to in-flight bytes asks for the hub's confirmed offset: 10 ms, doubling to 100 ms
CONFIRM_POLL = Backoff(
    RetryPolicy(max_attempts=None, initial_backoff=0.01, max_backoff=0.1, max_total_seconds=None, jitter="none")
)
_DONE = (ingest_pb2.UPLOAD_STATE_STORED, ingest_pb2.UPLOAD_STATE_DUPLICATE)
_FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
PRIORITIES = {
    Priority.STAT: common_pb2.PRIORITY_STAT,
    Priority.URGENT: common_pb2.PRIORITY_URGENT,
    Priority.ROUTINE: common_pb2.PRIORITY_ROUTINE,
}
_KIND_TO_PROTO = {
    ExamKind.ECG: common_pb2.EXAM_KIND_ECG,
    ExamKind.IMAGING: common_pb2.EXAM_KIND_IMAGING,
}


# the hub refused the object itself (its bytes, or their place in the exam): the rest of the exam goes on
_REFUSAL_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
_NOT_REFUSALS = ("SHA256_MISMATCH",)  # the file changed under the client: an error, not a refusal


@dataclass(frozen=True)
class RefusedFile:
    """An object the hub refused, with its reason (the exam was committed without it)."""

    name: str
    sha256: str
    reason: str
    message: str


@dataclass
class ExamOutcome:
    """What became of one exam: its hub id and state, the objects the hub refused, the follow-up
    exam opened for new files of a study already committed, or the errors that kept it open."""

    key: str
    exam_id: str = ""
    state: str = ""
    objects_stored: int = 0
    objects_duplicate: int = 0
    already_there: int = 0  # objects the committed exam already held (a retry)
    errors: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)  # gRPC status code names of the failures, one per error
    refused: list[RefusedFile] = field(default_factory=list)
    incomplete: bool = False  # committed without some of what was uploaded (``refused``)
    follow_up_of: str = ""
    follow_up: ExamOutcome | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and (self.follow_up is None or self.follow_up.ok)

    def all_refused(self) -> list[RefusedFile]:
        """The refused objects of this exam and of its follow-up."""
        return self.refused + (self.follow_up.all_refused() if self.follow_up is not None else [])


def follow_up_key(key: str, objects: Sequence[ScanObject]) -> str:
    """The client key of the follow-up exam that takes ``objects`` (new files of a study already
    committed under ``key``): the same files always give the same key, so a retry finds it again."""
    digest = sha256_hex("".join(sorted(o.sha256 for o in objects)))[:24]
    return f"{key[:96]}:fu:{digest}"


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
    limiter: TokenBucket | None = None
    compression: str = "off"  # "off" | "gzip" | "auto" (gzip for objects that shrink)
    in_flight: int = 0  # most bytes a stream runs ahead of the hub's confirmed offset; 0: no bound
    patient: common_pb2.Patient | None = None  # what the request says of the patient (every exam)
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
        outcome = ExamOutcome(key=exam.client_exam_key, follow_up_of=exam.follow_up_of)
        request = ingest_pb2.OpenExamRequest(
            client_exam_key=exam.client_exam_key,
            kind=_KIND_TO_PROTO[exam.kind],
            priority=self.priority,
            indication=self.indication,
            study_instance_uid=exam.study_instance_uid,
            follow_up_of=exam.follow_up_of,
            patient=self.patient,
        )
        try:
            opened = self._call("OpenExam", request)
        except grpc.RpcError as err:
            return self._failed(outcome, "open exam", err)
        outcome.exam_id, outcome.state = opened.exam_id, opened.state
        outcome.follow_up_of = opened.follow_up_of
        if opened.state != "receiving":  # committed or refused already: send only what is new
            return self._closed_before(outcome, exam, opened)
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
        outcome.state, outcome.incomplete = done.state, done.incomplete
        extra = {"exam_id": done.exam_id, "state": done.state, "refused": len(outcome.refused)}
        log.info("exam committed", extra=extra)
        return outcome

    def _closed_before(self, outcome: ExamOutcome, exam: ScanExam, opened: common_pb2.Exam) -> ExamOutcome:
        """The exam was committed by an earlier upload (or an attempt whose answer was lost), or
        refused: files it holds are not sent again, files it refused keep their refusal (the same
        answer, at once), and new files go into a new exam: a follow-up linked to a committed exam,
        or a fresh exam in place of a refused one (files fixed and sent again)."""
        held, refused = set(opened.stored_sha256), {r.sha256: r for r in opened.refused}
        outcome.incomplete = opened.incomplete
        new = []
        for obj in exam.objects:
            if obj.sha256 in held:
                outcome.already_there += 1
            elif obj.sha256 in refused:
                r = refused[obj.sha256]
                outcome.refused.append(RefusedFile(obj.name, obj.sha256, r.reason, r.message))
            else:
                new.append(obj)
        rejected = opened.state == "rejected"
        log.info("exam closed before", extra={"exam_id": opened.exam_id, "state": opened.state, "new": len(new)})
        if rejected and not new:
            with self._lock:
                outcome.errors.append(f"the hub refused this exam ({opened.reject_reason})")
                outcome.codes.append(grpc.StatusCode.INVALID_ARGUMENT.name)
        if new:
            follow = ScanExam(
                client_exam_key=follow_up_key(exam.client_exam_key, new),
                kind=exam.kind,
                modality=exam.modality,
                study_instance_uid=exam.study_instance_uid,
                objects=new,
                follow_up_of="" if rejected else opened.exam_id,
            )
            outcome.follow_up = self.upload_exam(follow)
        return outcome

    def _failed(self, outcome: ExamOutcome, what: str, err: grpc.RpcError) -> ExamOutcome:
        with self._lock:
            outcome.errors.append(f"{what}: {describe_rpc_error(err)}")
            outcome.codes.append(rpc_code(err).name)
            if rpc_code(err) in _FATAL_CODES:
                self.fatal = rpc_code(err).name
        return outcome

    def _upload_object_into(self, outcome: ExamOutcome, obj: ScanObject) -> None:
        if self.fatal:
            return
        try:
            status = self.upload_object(outcome.exam_id, obj)
        except grpc.RpcError as err:
            reason = error_reason(err) or ""
            if rpc_code(err) in _REFUSAL_CODES and reason not in _NOT_REFUSALS:  # recorded at the hub
                with self._lock:
                    outcome.refused.append(RefusedFile(obj.name, obj.sha256, reason, err.details() or ""))
                return
            self._failed(outcome, obj.name, err)
            return
        except (OSError, TelereadError) as err:
            reason = str(err) if isinstance(err, TelereadError) else type(err).__name__
            with self._lock:
                outcome.errors.append(f"{obj.name}: {reason}")
                outcome.codes.append(err.code if isinstance(err, TelereadError) else "UNAVAILABLE")
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

    def _wire_options(self, obj: ScanObject, offset: int) -> dict[str, Any]:
        """gzip for this stream when configured, or (auto) when a sample of what is left shrinks."""
        if self.compression == "gzip" or (self.compression == "auto" and worth_compressing(obj.path, offset=offset)):
            return {"compression": grpc.Compression.Gzip}
        return {}

    def _stream(self, obj: ScanObject, upload_id: str, *, offset: int, mark: _Mark) -> ingest_pb2.UploadStatus:
        size = self.limiter.message_size(self.chunk_size) if self.limiter else self.chunk_size
        reader = _ChunkReader(obj, upload_id=upload_id, offset=offset, size=size, limiter=self.limiter)
        if self.in_flight > 0:
            reader.in_flight, reader.confirmed = self.in_flight, lambda: self._confirmed(upload_id)
        deadline = self.timeout + (obj.size - offset) / MIN_UPLOAD_RATE
        try:
            status = self.ingest.Upload(reader.chunks(mark), timeout=deadline, **self._wire_options(obj, offset))
        except grpc.RpcError:
            if reader.error is not None:  # our read failed and cut the stream short
                raise reader.error from None
            raise
        finally:
            reader.finished.set()  # a reader waiting for confirmations stops with the call
        if reader.error is not None:
            raise reader.error
        return status

    def _confirmed(self, upload_id: str) -> int:
        """The hub's confirmed offset of an upload while its stream runs (one try, short deadline)."""
        request = ingest_pb2.GetUploadStatusRequest(upload_id=upload_id)
        return int(self.ingest.GetUploadStatus(request, timeout=min(self.timeout, 10.0)).committed_offset)


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
    limiter: TokenBucket | None = None
    error: OSError | TelereadError | None = None
    in_flight: int = 0  # see _Uploader.in_flight
    confirmed: Callable[[], int] | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    _acked: int = field(init=False)  # the hub's confirmed offset as last heard

    def __post_init__(self) -> None:
        self._acked = self.offset

    def _hold(self, position: int, n: int) -> None:
        """Wait until sending ``n`` more bytes at ``position`` keeps the stream within ``in_flight``
        bytes of the hub's confirmed offset: bytes handed to gRPC sit in its flow-control windows
        and socket buffers, and a cut that ends the stream makes the gateway send them again."""
        if self.in_flight <= 0 or self.confirmed is None:
            return
        allowed = max(self.in_flight, n)
        asked = 0
        while position + n - self._acked > allowed and not self.finished.is_set():
            try:
                self._acked = max(self._acked, self.confirmed())
            except grpc.RpcError:  # the link is down: the stream itself will fail or carry on
                pass
            if position + n - self._acked <= allowed:
                return
            asked += 1
            self.finished.wait(CONFIRM_POLL.delay(asked))

    def chunks(self, mark: _Mark) -> Iterator[ingest_pb2.UploadChunk]:
        """The stream's messages: the first names the upload and offset; at most ``size``
        bytes each; reading stops at the scanned size. A read error or a file shorter than
        when it was scanned ends the stream early and is kept in ``error``."""
        try:
            with self.obj.path.open("rb") as stream:
                stream.seek(self.offset)
                position = self.offset
                data = stream.read(min(self.size, self.obj.size - position))
                self._pace(len(data))
                yield ingest_pb2.UploadChunk(upload_id=self.upload_id, offset=position, data=data)
                while data:
                    position += len(data)
                    mark.reach(position)
                    data = stream.read(min(self.size, self.obj.size - position))
                    if data:
                        self._hold(position, len(data))
                        if self.finished.is_set():
                            return
                        self._pace(len(data))
                        yield ingest_pb2.UploadChunk(data=data)
            if position < self.obj.size:
                self.error = TelereadError("file changed since it was scanned", reason="CHANGED")
        except OSError as err:
            self.error = err

    def _pace(self, n: int) -> None:
        if self.limiter is not None:
            self.limiter.take(n)


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
    limiter: TokenBucket | None = None,
    compression: str = "off",
    in_flight: int = 0,
    patient: PatientContext | None = None,
) -> list[ExamOutcome]:
    """Upload every exam (resuming cut streams), committing those whose objects all stored.
    ``patient`` goes with every exam's request (give it for one patient's exams only).
    ``progress`` receives the number of newly sent bytes (bytes re-sent after a cut count once).
    A rejected object is reported in its exam's errors and that exam is left uncommitted.
    ``parallel`` streams run at once (across the objects of an exam, and across exams). ``limiter``
    caps the bytes/s of all streams together; ``compression`` is "off", "gzip" or "auto"."""
    uploader = _Uploader(
        ingest,
        PRIORITIES[Priority(priority)],
        indication,
        min(chunk_size, CHUNK_SIZE),
        progress,
        timeout,
        retry,
        sleep,
        parallel=max(1, parallel),
        limiter=limiter,
        compression=compression,
        in_flight=in_flight,
        patient=patient_message(patient) if patient else None,
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
    for column in ("exam id", "kind", "modality", "objects", "stored", "duplicate", "refused", "state"):
        table.add_column(column)

    def row(exam: ScanExam, outcome: ExamOutcome, objects: int, label: str = "") -> None:
        state = outcome.state or "-"
        if not outcome.errors and outcome.incomplete:
            state = f"[yellow]{state} (incomplete)"
        elif outcome.errors:
            state = f"[red]{state} (not committed)"
        table.add_row(
            label + (outcome.exam_id or "-"),
            exam.kind.value,
            exam.modality or "-",
            str(objects),
            str(outcome.objects_stored),
            str(outcome.objects_duplicate + outcome.already_there),
            str(len(outcome.refused)),
            state,
        )

    for exam, outcome in zip(exams, outcomes):
        row(exam, outcome, len(exam.objects))
        follow = outcome.follow_up
        while follow is not None:
            row(exam, follow, follow.objects_stored + follow.objects_duplicate + len(follow.refused), "follow-up ")
            follow = follow.follow_up
    return table


def _print_outcomes(console: Console, exams: Sequence[ScanExam], outcomes: list[ExamOutcome]) -> None:
    for exam, outcome in zip(exams, outcomes):
        label = outcome.exam_id or exam.client_exam_key[:16]
        for error in outcome.errors:
            console.print(f"[red]error[/] exam {escape(label)}: {escape(error)}")
        follow = outcome.follow_up
        if follow is not None and follow.exam_id and outcome.state == "rejected":
            console.print(f"files new since exam {escape(label)} was refused went into exam {escape(follow.exam_id)}")
        elif follow is not None and follow.exam_id:
            console.print(
                f"new files of exam {escape(label)} (already committed) went into follow-up exam"
                f" {escape(follow.exam_id)}, linked to it"
            )
            for error in follow.errors:
                console.print(f"[red]error[/] follow-up exam {escape(follow.exam_id)}: {escape(error)}")
        for item in outcome.all_refused():
            console.print(f"[red]refused[/] {escape(item.name)}: {escape(item.reason)}: {escape(item.message)}")


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
            patient=patient_from_args(args),
        )


def run_upload_cli(args: argparse.Namespace) -> int:
    """``teleread upload``: scan, upload with a progress bar, print each exam's id and state, the
    files the hub refused with their reasons, and any follow-up exam opened for new files of a
    study already committed. Exit 0 when every exam was committed whole, 1 otherwise (2 for a local
    problem)."""
    console = Console()
    with console.status("scanning"):
        scan = scan_paths(args.paths)
    _print_skipped(console, scan.skipped)
    if not scan.exams:
        print_error("no DICOM files or WFDB records found")
        return 1
    if patient_from_args(args) is not None and len(scan.exams) > 1:  # one patient's values on another's exam
        print_error(f"the patient options describe one patient; these files make {len(scan.exams)} exams")
        return 2
    channel = connect_or_explain(args, metadata=(("x-teleread-site", args.site),))
    if channel is None:
        return 2
    with channel:
        outcomes = _upload_with_bar(console, scan, channel=channel, args=args)
    console.print(_outcome_table(scan.exams, outcomes))
    _print_outcomes(console, scan.exams, outcomes)
    return 0 if all(outcome.ok and not outcome.all_refused() for outcome in outcomes) else 1


def add_upload_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``teleread upload PATH... --site SITE`` on an argparse subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "upload", help="upload DICOM files and WFDB records to the hub"
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    parser.add_argument("--site", required=True, help="your site (checked against the token)")
    parser.add_argument("--priority", choices=sorted(PRIORITIES), default="routine")
    parser.add_argument("--indication", default="", help="clinical question for the reader")
    add_patient_options(parser)
    add_connection_args(parser)
    parser.set_defaults(func=run_upload_cli)
    return parser


__all__ = [
    "ExamKind",
    "ExamOutcome",
    "ObjectRole",
    "ScanExam",
    "ScanObject",
    "ScanResult",
    "SkippedFile",
    "add_upload_parser",
    "file_sha256",
    "run_upload_cli",
    "scan_paths",
    "upload_exams",
]
