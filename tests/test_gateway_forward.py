"""Store-and-forward from the gateway's outbox to a real hub over gRPC on loopback: delivered
byte-identical, kept and retried while the hub is unreachable, refused content set aside."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pydicom
import pytest

from helpers import copy_testdata, wait_for, wait_for_state
from teleread.client import open_channel
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import Backoff, Outbox
from teleread.v1 import common_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def _receive_file(box: Outbox, path: Path, *, priority: str = "routine") -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with open(path, "rb") as f:
        box.receive(f, group_key=ds.StudyInstanceUID, instance_key=ds.SOPInstanceUID, priority=priority)
    box.complete(ds.StudyInstanceUID)
    return str(ds.StudyInstanceUID)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_outbox_exam_reaches_the_hub_byte_identical(embedded_stack, tmp_path: Path) -> None:
    (ct,) = copy_testdata(tmp_path / "in", "CT_small.dcm")
    box = Outbox(tmp_path / "outbox")
    _receive_file(box, ct, priority="urgent")
    forwarder = Forwarder(box, ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a")))
    (result,) = forwarder.drain()
    assert result.outcome == "committed"
    assert box.status().by_state["committed"] == 1 and box.status().bytes_waiting == 0
    wait_for_state(ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a")), result.detail, "queued")
    radio = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("radio"))
    details = radio.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=result.detail), timeout=10)
    (obj,) = details.objects
    assert obj.sha256 == hashlib.sha256(ct.read_bytes()).hexdigest()
    data = b"".join(
        c.data
        for c in radio.StreamObject(
            worklist_pb2.StreamObjectRequest(exam_id=result.detail, object_id=obj.object_id), timeout=10
        )
    )
    assert data == ct.read_bytes()
    assert details.exam.priority == common_pb2.PRIORITY_URGENT  # the outbox kept the clinic's priority


def test_unreachable_hub_keeps_the_exam_and_the_outbox_drains_stat_first_when_the_hub_is_back(
    embedded_stack, tmp_path: Path
) -> None:
    ct, mr = copy_testdata(tmp_path / "in", "CT_small.dcm", "MR_small.dcm")
    box = Outbox(tmp_path / "outbox", backoff=Backoff(base_s=0.2, cap_s=0.2))
    _receive_file(box, ct)
    dead = open_channel(f"127.0.0.1:{_closed_port()}", token=embedded_stack.tokens["site_a"])
    try:
        forwarder = Forwarder(box, ingest_pb2_grpc.IngestStub(dead))
        down = forwarder.drain_once()
        assert down is not None and down.outcome == "retry" and "UNAVAILABLE" in down.detail
        assert forwarder.link_wait() > 0 or down.delay_s < 0.01  # full jitter may draw ~0
        if forwarder.link_wait() > 0:
            assert forwarder.drain_once() is None  # the link is in its backoff: no attempt
    finally:
        dead.close()
    status = box.status()
    assert status.by_state["ready"] == 1 and "UNAVAILABLE" in status.last_error and status.bytes_waiting > 0
    assert status.link_state == "down"
    assert box.exam(down.exam_id).attempts == 0  # the link's failure, not the exam's
    stat_study = _receive_file(box, mr, priority="stat")  # a newer but more urgent study
    wait_for(lambda: forwarder.link_wait() == 0, timeout=5)  # past the link's backoff
    forwarder.ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    up = forwarder.drain()
    assert [r.outcome for r in up] == ["committed", "committed"]
    assert box.exam(up[0].exam_id).group_key == stat_study  # stat first once the link is back
    assert up[1].exam_id == down.exam_id and box.status().link_state == "up"


def test_content_the_hub_refuses_is_set_aside_not_retried(embedded_stack, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)  # truncated after the preamble
    with open(bad, "rb") as f:
        box.receive(f, group_key="1.2.826.0.1.3680043.10.1.1", instance_key="1.2.826.0.1.3680043.10.1.1.1")
    box.complete("1.2.826.0.1.3680043.10.1.1")
    (result,) = Forwarder(box, ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))).drain()
    assert result.outcome == "rejected" and "INVALID_ARGUMENT" in result.detail
    status = box.status()
    assert status.by_state["rejected"] == 1 and status.by_state["ready"] == 0


def test_an_exam_whose_commit_answer_was_lost_is_recorded_committed_not_sent_twice(
    embedded_stack, tmp_path: Path
) -> None:
    (ct,) = copy_testdata(tmp_path / "in", "CT_small.dcm")
    box = Outbox(tmp_path / "outbox")
    _receive_file(box, ct)
    forwarder = Forwarder(box, ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a")))
    (first,) = forwarder.drain()
    assert first.outcome == "committed"
    # the gateway died after the hub committed but before it recorded that: the exam is ready again
    box._db.execute("UPDATE exams SET state='ready', hub_exam_id='' WHERE id=?", (first.exam_id,))
    (again,) = forwarder.drain()
    assert again.outcome == "committed" and again.detail == first.detail  # the same hub exam
    assert box.exam(first.exam_id).hub_exam_id == first.detail


def test_a_stream_never_runs_more_than_the_in_flight_bound_ahead_of_the_hub(
    embedded_stack, tmp_path: Path, monkeypatch
) -> None:
    import numpy as np

    from teleread.gateway.uploader import client as upload

    (ct,) = copy_testdata(tmp_path / "in", "CT_small.dcm")
    ds = pydicom.dcmread(ct)
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.random.default_rng(7).integers(0, 4000, (1024, 1024), dtype=np.uint16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    ahead: list[int] = []
    polls: list[int] = []
    real_hold = upload._ChunkReader._hold

    def hold(self, position: int, n: int) -> None:  # type: ignore[no-untyped-def]
        confirmed = self.confirmed

        def counted() -> int:
            polls.append(1)
            return confirmed()  # type: ignore[no-any-return]

        self.confirmed = counted
        real_hold(self, position, n)
        self.confirmed = confirmed
        ahead.append(position + n - self._acked)

    monkeypatch.setattr(upload._ChunkReader, "_hold", hold)
    box = Outbox(tmp_path / "outbox")
    _receive_file(box, big)
    forwarder = Forwarder(
        box, ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a")), message_bytes=64 * 1024,
        in_flight_bytes=128 * 1024,
    )  # fmt: skip
    (result,) = forwarder.drain()
    assert result.outcome == "committed"
    assert len(ahead) >= 30 and max(ahead) <= 128 * 1024  # every message waited for room
    assert polls  # the hub's confirmed offset was asked for while the stream ran
    wait_for_state(ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a")), result.detail, "queued")
    radio = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("radio"))
    details = radio.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=result.detail), timeout=10)
    assert details.objects[0].sha256 == hashlib.sha256(big.read_bytes()).hexdigest()


def test_a_reader_waiting_for_confirmations_stops_with_its_call(tmp_path: Path) -> None:
    import threading

    from teleread.gateway.uploader import client as upload
    from teleread.gateway.uploader.scan import ScanObject
    from teleread.vocab import ObjectRole

    f = tmp_path / "obj"
    f.write_bytes(b"x" * 300_000)
    reader = upload._ChunkReader(
        ScanObject(f, 300_000, "0" * 64, ObjectRole("dicom")), upload_id="u", offset=0, size=100_000
    )
    reader.in_flight, reader.confirmed = 100_000, lambda: 0  # the hub confirms nothing
    sent: list[int] = []
    mark = upload._Mark(None)
    worker = threading.Thread(target=lambda: sent.extend(len(c.data) for c in reader.chunks(mark)))
    worker.start()
    time.sleep(0.5)
    assert sent == [] or sum(sent) <= 100_000  # held after the first message
    reader.finished.set()  # the call ended (a cut, a deadline): the reader returns
    worker.join(timeout=5)
    assert not worker.is_alive() and sum(sent) == 100_000
