"""Client-side measurements of the spine benchmark, each over real gRPC on loopback.

Owns: running N clients in threads from a common start (:func:`run_parallel`), timed ingest with
the real upload client (:func:`ingest`, commit times recorded per exam), the raw client-streaming
ceiling against the sink (:func:`raw_ceiling`), the cardiologist's Watch stream timestamping
TYPE_QUEUED events (:class:`QueueWatcher`), the bulk insert of queued exams and the concurrent
claim-next readers (:func:`claim_next_latencies`), memory sampling of a process tree
(:func:`memory_sampler`) and the CPU each group of processes used during a measurement
(:func:`cpu_meter`).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, Callable, Iterator, cast

import grpc

from teleread.client import open_channel
from teleread.gateway.uploader.client import ScanExam, upload_exams
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

CHUNK = 1024 * 1024
SITE_HEADER = (("x-teleread-site", "bench-clinic"),)
READY_TIMEOUT_S = 30.0
_QUEUED = worklist_pb2.WorklistEvent.TYPE_QUEUED
_SNAPSHOT_END = worklist_pb2.WorklistEvent.TYPE_SNAPSHOT_END


def run_parallel(jobs: list[Callable[[], None]]) -> float:
    """Run the jobs in threads released together; seconds from release to the last finish."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def _ready(channel: grpc.Channel) -> grpc.Channel:
    grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
    return channel


@dataclass
class IngestRun:
    instances: int
    bytes: int
    seconds: float
    commits: dict[str, float] = field(default_factory=dict)  # exam id -> CommitExam returned


class _TimedIngest:
    """The Ingest stub, recording when each CommitExam returned (perf_counter)."""

    def __init__(self, stub: ingest_pb2_grpc.IngestStub, commits: dict[str, float]) -> None:
        self._stub = stub
        self._commits = commits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def CommitExam(self, request: ingest_pb2.CommitExamRequest, **kwargs: Any) -> Any:
        exam = self._stub.CommitExam(request, **kwargs)
        self._commits[exam.exam_id] = time.perf_counter()
        return exam


def ingest(address: str, token: str, parts: list[list[ScanExam]]) -> IngestRun:
    """Each part uploaded by its own client (own channel) with ``upload_exams``; all must commit."""
    commits: dict[str, float] = {}
    channels = [_ready(open_channel(address, token=token, metadata=SITE_HEADER)) for _ in parts]

    def job(channel: grpc.Channel, exams: list[ScanExam]) -> Callable[[], None]:
        def upload() -> None:
            stub = cast(ingest_pb2_grpc.IngestStub, _TimedIngest(ingest_pb2_grpc.IngestStub(channel), commits))
            for outcome in upload_exams(stub, exams):
                if not outcome.ok or outcome.state not in ("received", "queued"):
                    raise RuntimeError(f"exam not committed: {outcome.state} {outcome.errors[:1]}")

        return upload

    try:
        seconds = run_parallel([job(ch, exams) for ch, exams in zip(channels, parts)])
    finally:
        for channel in channels:
            channel.close()
    exams = [exam for part in parts for exam in part]
    return IngestRun(
        instances=sum(len(e.objects) for e in exams),
        bytes=sum(e.total_bytes for e in exams),
        seconds=seconds,
        commits=commits,
    )


def _sink_stream(stub: ingest_pb2_grpc.IngestStub, size: int, payload: bytes) -> None:
    def chunks() -> Iterator[ingest_pb2.UploadChunk]:
        sent = 0
        while sent < size:
            data = payload if size - sent >= CHUNK else payload[: size - sent]
            yield (
                ingest_pb2.UploadChunk(upload_id="0" * 32, data=data)
                if sent == 0
                else ingest_pb2.UploadChunk(data=data)
            )
            sent += len(data)

    status = stub.Upload(chunks(), timeout=600)
    if status.committed_offset != size:
        raise RuntimeError("the sink did not receive every byte")


def raw_ceiling(address: str, sizes: list[int], *, clients: int) -> float:
    """Seconds to stream ``sizes`` (one stream each, 1 MiB messages) with ``clients`` clients."""
    payload = random.randbytes(CHUNK)
    channels = [_ready(open_channel(address, token="sink")) for _ in range(clients)]

    def job(channel: grpc.Channel, streams: list[int]) -> Callable[[], None]:
        stub = ingest_pb2_grpc.IngestStub(channel)

        def send() -> None:
            for size in streams:
                _sink_stream(stub, size, payload)

        return send

    try:
        return run_parallel([job(ch, sizes[i::clients]) for i, ch in enumerate(channels)])
    finally:
        for channel in channels:
            channel.close()


class QueueWatcher:
    """A cardiologist's Watch stream; records when each exam's TYPE_QUEUED event arrived."""

    def __init__(self, address: str, token: str) -> None:
        self._channel = open_channel(address, token=token)
        self._call: Any = None
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._live = threading.Event()
        self.queued: dict[str, float] = {}
        self.last_event = time.perf_counter()

    def __enter__(self) -> QueueWatcher:
        stub = worklist_pb2_grpc.WorklistStub(self._channel)
        self._call = stub.Watch(worklist_pb2.WatchWorklistRequest(), timeout=3600)
        self._thread.start()
        if not self._live.wait(READY_TIMEOUT_S):
            self.__exit__(None, None, None)
            raise RuntimeError("the worklist watch did not start")
        return self

    def _follow(self) -> None:
        try:
            for event in self._call:
                self.last_event = time.perf_counter()
                if event.type == _SNAPSHOT_END:
                    self._live.set()
                elif event.type == _QUEUED:
                    self.queued.setdefault(event.exam.exam_id, time.perf_counter())
        except grpc.RpcError:
            pass  # cancelled at the end

    def latencies(
        self, commits: dict[str, float], *, timeout: float, settle: float = 10.0
    ) -> tuple[list[float], set[str]]:
        """Seconds from each commit returning to its exam's TYPE_QUEUED event, and the exams whose
        event had not come once the stream was quiet for ``settle`` s (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while (missing := set(commits) - set(self.queued)) and time.monotonic() < deadline:
            if time.perf_counter() - self.last_event > settle:
                break
            time.sleep(0.05)
        return [max(0.0, self.queued[i] - done) for i, done in commits.items() if i in self.queued], missing

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=10)
        self._channel.close()


def exam_states(address: str, token: str, exam_ids: set[str]) -> dict[str, str]:
    """The hub's state of each exam, asked with the site's GetExam."""
    with open_channel(address, token=token, metadata=SITE_HEADER) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        return {i: stub.GetExam(ingest_pb2.GetExamRequest(exam_id=i), timeout=30).state for i in exam_ids}


def _queued_row(number: int, *, site_id: int, now: Any, rng: random.Random) -> dict[str, Any]:
    level = rng.choices(("critical", "urgent", "routine"), weights=(5, 25, 70))[0]
    rank = {"critical": 1, "urgent": 2, "routine": 3}[level]
    received = now - timedelta(minutes=rng.uniform(0, 480))
    deadline = received + timedelta(minutes={"critical": 10, "urgent": 60, "routine": 1440}[level])
    triage = {
        "level": level,
        "score": 4 - rank,
        "findings": [],
        "rules_version": "bench",
        "summary": "bulk-inserted by the benchmark",
    }
    return {
        "id": uuid.uuid4().hex,
        "site_id": site_id,
        "client_exam_key": f"bench-bulk-{number:06d}",
        "kind": "ecg",
        "modality": "ECG",
        "study_instance_uid": "",
        "state": "queued",
        "priority": "stat" if rank == 1 else "routine",
        "indication": "",
        "specialty": "cardiology",
        "hospital": "bench-hosp",
        "level": level,
        "level_rank": rank,
        "score": float(4 - rank),
        "triage_json": json.dumps(triage),
        "deadline": deadline,
        "received_at": received,
        "object_count": 1,
        "total_bytes": 291_088,
        "reject_reason": "",
        "claimed_by": None,
        "lease_expires_at": None,
        "fence": 0,
        "created_at": received,
        "updated_at": received,
    }


def bulk_insert_queued(url: str, *, site_id: int, count: int) -> None:
    """Insert ``count`` queued cardiology exams straight into the hub's database (one
    transaction); on PostgreSQL the table is then ANALYZEd, as autovacuum would soon do."""
    from sqlalchemy import insert, text

    from teleread.db.engine import is_postgres, make_engine, utcnow
    from teleread.db.schema import exams

    rng, now = random.Random(count), utcnow()
    rows = [_queued_row(n, site_id=site_id, now=now, rng=rng) for n in range(count)]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(exams), rows)
        if is_postgres(engine):
            with engine.begin() as conn:
                conn.execute(text("ANALYZE exams"))
    finally:
        engine.dispose()


def claim_next_latencies(address: str, tokens: list[str], *, total: int) -> tuple[list[float], float]:
    """Each token's reader (own channel) calls ClaimNext ``total / len(tokens)`` times after one
    unmeasured warm-up claim; (client-observed seconds of each call, wall seconds)."""
    latencies: list[list[float]] = [[] for _ in tokens]
    channels = [_ready(open_channel(address, token=token)) for token in tokens]
    stubs = [worklist_pb2_grpc.WorklistStub(channel) for channel in channels]
    for stub in stubs:
        stub.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=30)

    def job(stub: worklist_pb2_grpc.WorklistStub, out: list[float]) -> Callable[[], None]:
        def claim() -> None:
            for _ in range(total // len(tokens)):
                started = time.perf_counter()
                stub.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=30)
                out.append(time.perf_counter() - started)

        return claim

    try:
        seconds = run_parallel([job(stub, out) for stub, out in zip(stubs, latencies)])
    finally:
        for channel in channels:
            channel.close()
    return [value for per_reader in latencies for value in per_reader], seconds


@dataclass
class MemoryPeaks:
    """Peaks over a process tree (the hub and its CPU worker processes), in bytes."""

    rss_sum: int = 0  # highest sampled sum of RSS over the tree (shared pages counted per process)
    pss_sum: int = 0  # highest sampled sum of PSS (shared pages split between the processes)
    samples: int = 0

    def add(self, pids: list[int]) -> None:
        import psutil

        rss = pss = 0
        for pid in pids:
            try:
                info = psutil.Process(pid).memory_full_info()
            except psutil.Error:  # exited meanwhile
                continue
            rss, pss = rss + info.rss, pss + info.pss
        self.rss_sum, self.pss_sum, self.samples = max(self.rss_sum, rss), max(self.pss_sum, pss), self.samples + 1


@contextmanager
def memory_sampler(tree: Callable[[], list[int]], *, interval: float = 0.25) -> Iterator[MemoryPeaks]:
    """Samples the memory of the process tree every ``interval`` seconds while the block runs."""
    peaks = MemoryPeaks()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peaks.add(tree())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()
        peaks.add(tree())


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    import psutil

    seconds: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        seconds[pid] = times.user + times.system
    return seconds


@contextmanager
def cpu_meter(groups: dict[str, Callable[[], list[int]]]) -> Iterator[dict[str, float]]:
    """Cores each group of processes kept busy while the block ran (CPU seconds / wall seconds),
    filled into the yielded dict at the end; processes started meanwhile count whole."""
    cores: dict[str, float] = {}
    before = {name: _cpu_by_pid(pids()) for name, pids in groups.items()}
    started = time.perf_counter()
    try:
        yield cores
    finally:
        elapsed = max(time.perf_counter() - started, 1e-9)
        for name, pids in groups.items():
            after = _cpu_by_pid(pids())
            cores[name] = sum(used - before[name].get(pid, 0.0) for pid, used in after.items()) / elapsed
