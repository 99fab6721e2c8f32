"""Long-lived streams never starve the hub (RELIABILITY F20), over real gRPC on loopback.

More watch streams than the old server had threads stay open while unary calls are answered; an
identity over its stream cap is refused with RESOURCE_EXHAUSTED / STREAM_LIMIT while another
identity's streams and calls go on; an upload stream that goes quiet is closed after the idle time
with a retryable status, and the upload resumes from its confirmed offset; idle uploads hold no
thread, so a real upload beside them completes with a stream pool of two threads."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from sqlalchemy import insert, select

from conftest import HubStack, make_settings, start_stack
from helpers import error_reason, wait_for
from teleread.db.engine import utcnow
from teleread.db.schema import exams, sites
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2
from teleread.v1 import worklist_pb2_grpc

pytestmark = pytest.mark.timeout(240)
SNAPSHOT_END = worklist_pb2.WorklistEvent.TYPE_SNAPSHOT_END
CHUNK = 64 * 1024


@pytest.fixture
def stack_with(tmp_path: Path) -> Iterator[Any]:
    """Start an embedded hub with some gRPC settings changed; stopped at the end."""
    started: list[HubStack] = []

    def start(**grpc_settings: Any) -> HubStack:
        settings = make_settings(tmp_path / f"hub{len(started)}")
        settings = settings.updated(**{f"grpc__{name}": value for name, value in grpc_settings.items()})
        stack = start_stack("embedded", settings)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        for ch in stack.channels:
            ch.close()
        stack.server.stop(grace=None).wait(10)
        stack.hub.close()


def queued_exam(stack: HubStack, *, site: str = "clinic-a", hospital: str = "county-hosp") -> str:
    """A queued cardiology exam written straight into the hub's database."""
    now = utcnow()
    exam_id = uuid.uuid4().hex
    with stack.hub.engine.begin() as conn:
        site_id = conn.execute(select(sites.c.id).where(sites.c.code == site)).scalar_one()
        conn.execute(
            insert(exams).values(
                id=exam_id,
                site_id=site_id,
                client_exam_key=f"test-{exam_id}",
                kind="ecg",
                modality="ECG",
                state="queued",
                priority="routine",
                specialty="cardiology",
                hospital=hospital,
                level="routine",
                level_rank=3,
                deadline=now + timedelta(hours=24),
                received_at=now,
                object_count=1,
                created_at=now,
                updated_at=now,
            )
        )
    return exam_id


def open_watch(stack: HubStack, channel: grpc.Channel) -> Any:
    """A Watch stream read up to its SNAPSHOT_END (the stream stays open)."""
    call = worklist_pb2_grpc.WorklistStub(channel).Watch(worklist_pb2.WatchWorklistRequest(), timeout=120)
    for event in call:
        if event.type == SNAPSHOT_END:
            return call
    raise AssertionError("the watch ended before its snapshot did")


def test_more_watch_streams_than_the_old_threads_while_unary_calls_answer(stack_with) -> None:
    stack = stack_with()
    exam_id = queued_exam(stack)
    watchers = ("cardio", "cardio2", "radio", "cardio_city")  # 4 identities x 50 streams, under the cap of 64
    calls = [open_watch(stack, channel) for who in watchers for channel in [stack.channel(who)] for _ in range(50)]
    assert len(calls) == 200  # the old server: 32 threads, 128 calls at most (the rest refused)
    assert stack.hub.feed.subscribers() == 200

    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    started = time.perf_counter()
    claim = worklist.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert claim.exam.exam_id == exam_id and time.perf_counter() - started < 5.0
    site = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    assert site.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10).state == "in_reading"

    # The claim reached every watcher of county-hosp cardiology (100 streams), and no other.
    for call in calls[:100]:
        event = next(call)
        assert event.type == worklist_pb2.WorklistEvent.TYPE_CLAIMED and event.exam.exam_id == exam_id
    worklist.ReleaseClaim(worklist_pb2.ReleaseClaimRequest(exam_id=exam_id, fence=claim.fence), timeout=10)
    for call in calls[:100]:
        assert next(call).type == worklist_pb2.WorklistEvent.TYPE_RELEASED
    for call in calls:
        call.cancel()
    wait_for(lambda: stack.hub.feed.subscribers() == 0)


def test_an_identity_over_its_stream_cap_is_refused_and_no_one_else_is(stack_with) -> None:
    stack = stack_with(max_streams_per_identity=3)
    mine = stack.channel("cardio")
    held = [open_watch(stack, mine) for _ in range(3)]
    with pytest.raises(grpc.RpcError) as refused:
        open_watch(stack, mine)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "STREAM_LIMIT" and "max_streams_per_identity = 3" in refused.value.details()
    # Other identities open their streams as usual: a reader's watches, a site's results watch.
    other = stack.channel("cardio2")
    theirs = [open_watch(stack, other) for _ in range(3)]
    results = results_pb2_grpc.ResultsStub(stack.channel("site_a"))
    feed = results.WatchResults(results_pb2.WatchResultsRequest(after_cursor=0), timeout=60)
    wait_for(lambda: stack.hub.feed.subscribers() == 7)
    assert not feed.done()
    exam_id = queued_exam(stack)
    # Unary calls of the identity at its cap are not counted and still answered.
    claim = worklist_pb2_grpc.WorklistStub(mine).ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert claim.exam.exam_id == exam_id
    for call in held + theirs:
        event = next(call)
        assert event.type == worklist_pb2.WorklistEvent.TYPE_CLAIMED and event.exam.exam_id == exam_id
    # A stream that ends gives its slot back.
    held.pop().cancel()
    slots = stack.server.slots
    principal = stack.hub.authenticator.authenticate(f"Bearer {stack.tokens['cardio']}")
    wait_for(lambda: slots.held(principal.id) == 2)
    held.append(open_watch(stack, mine))
    for call in held + theirs + [feed]:
        call.cancel()


def _upload_start(site: Any, data: bytes, key: str) -> ingest_pb2.UploadStatus:
    exam = site.OpenExam(ingest_pb2.OpenExamRequest(client_exam_key=key, kind=common_pb2.EXAM_KIND_IMAGING), timeout=10)
    return site.BeginUpload(
        ingest_pb2.BeginUploadRequest(
            exam_id=exam.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role="dicom"
        ),
        timeout=10,
    )


def _stalling(upload_id: str, data: bytes, *, send: int, release: threading.Event) -> Iterator[Any]:
    """The first ``send`` bytes, then silence until ``release`` (a link that went quiet)."""
    yield ingest_pb2.UploadChunk(upload_id=upload_id, offset=0, data=data[:CHUNK])
    for start in range(CHUNK, send, CHUNK):
        yield ingest_pb2.UploadChunk(data=data[start : min(start + CHUNK, send)])
    release.wait(60)


def _ct() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()  # 39 KiB: one message


def _big_ct(size: int = 512) -> bytes:
    import io
    import random

    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = size, size
    ds.PixelData = random.Random(size).randbytes(size * size * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_quiet_upload_stream_is_closed_and_resumes_from_its_offset(stack_with) -> None:
    stack = stack_with(upload_idle_seconds=0.5)
    site = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    data = _big_ct()
    status = _upload_start(site, data, "idle-upload")
    release = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as closed:
            site.Upload(_stalling(status.upload_id, data, send=3 * CHUNK, release=release), timeout=30)
        waited = time.monotonic() - started
    finally:
        release.set()
    assert closed.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(closed.value) == "UPLOAD_IDLE"
    assert 0.5 <= waited < 10
    resumed = site.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=status.upload_id), timeout=10)
    assert resumed.committed_offset == 3 * CHUNK and resumed.state == ingest_pb2.UPLOAD_STATE_PARTIAL

    def rest() -> Iterator[Any]:
        yield ingest_pb2.UploadChunk(upload_id=status.upload_id, offset=3 * CHUNK, data=data[3 * CHUNK : 4 * CHUNK])
        for start in range(4 * CHUNK, len(data), CHUNK):
            yield ingest_pb2.UploadChunk(data=data[start : start + CHUNK])

    done = site.Upload(rest(), timeout=30)
    assert done.state == ingest_pb2.UPLOAD_STATE_STORED and done.object.sha256 == hashlib.sha256(data).hexdigest()

    # A stream that never sends its first message is closed the same way.
    silent = threading.Event()

    def nothing() -> Iterator[Any]:
        silent.wait(60)
        yield from ()

    try:
        with pytest.raises(grpc.RpcError) as empty:
            site.Upload(nothing(), timeout=30)
    finally:
        silent.set()
    assert empty.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(empty.value) == "UPLOAD_IDLE"


def test_idle_uploads_hold_no_thread(stack_with) -> None:
    # Four threads for unary calls, two for the blocking work of every stream, ten stalled
    # uploads: an eleventh upload and the unary calls still go through at once, because a quiet
    # stream holds no thread (the old server gave each stream one of its threads until it ended).
    stack = stack_with(max_workers=4, stream_workers=2, upload_idle_seconds=60)
    site = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    data = _big_ct()
    release = threading.Event()
    stalled: list[Any] = []
    try:
        for n in range(10):
            status = _upload_start(site, data, f"stalled-{n}")
            stalled.append(site.Upload.future(_stalling(status.upload_id, data, send=CHUNK, release=release)))
        wait_for(lambda: len(list(stack.hub.ingest._staging.root.glob("*.part"))) == 10)
        other = ingest_pb2_grpc.IngestStub(stack.channel("site_b"))
        started = time.perf_counter()
        listed = worklist_pb2_grpc.WorklistStub(stack.channel("cardio")).ListWorklist(
            worklist_pb2.ListWorklistRequest(), timeout=10
        )
        assert list(listed.exams) == [] and time.perf_counter() - started < 5.0
        small = _ct()
        status = _upload_start(other, small, "beside-the-stalled")
        started = time.perf_counter()
        done = other.Upload(iter([ingest_pb2.UploadChunk(upload_id=status.upload_id, data=small)]), timeout=20)
        assert done.state == ingest_pb2.UPLOAD_STATE_STORED and time.perf_counter() - started < 5.0
        assert not any(f.done() for f in stalled)  # still open, waiting for their clients
    finally:
        release.set()
        for f in stalled:
            f.cancel()
