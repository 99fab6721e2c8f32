"""The forwarder's pause after the link went down runs on the clock and random source it is given:
no attempt while the pause lasts, one at once when it ends, each pause under a ceiling that doubles
to the outbox's cap, and the exam itself never counted as failing."""

from __future__ import annotations

import io
import random
import socket
from pathlib import Path

import pytest

from teleread.backoff import Backoff
from teleread.client import RetryPolicy, open_channel
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import Outbox
from teleread.v1 import ingest_pb2_grpc


class _Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_link_pause_follows_the_injected_clock_and_grows_to_the_cap(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", backoff=Backoff(base_s=1.0, cap_s=4.0))
    box.receive(io.BytesIO(b"an instance"), group_key="1.2.3", instance_key="1.2.3.4")
    box.complete("1.2.3")
    clock, slept = _Clock(), []
    dead = open_channel(f"127.0.0.1:{_closed_port()}", token="site-token")
    try:
        forwarder = Forwarder(
            box, ingest_pb2_grpc.IngestStub(dead), clock=clock, rng=random.Random(4), sleep=slept.append,
            retry=RetryPolicy(max_attempts=1, initial_backoff=0.0, max_backoff=0.0),
        )  # fmt: skip
        pauses = []
        for ceiling in (1.0, 2.0, 4.0, 4.0, 4.0):
            down = forwarder.drain_once()
            assert down is not None and down.outcome == "retry" and "UNAVAILABLE" in down.detail
            assert 0.0 <= down.delay_s <= ceiling
            assert forwarder.link_wait() == pytest.approx(
                down.delay_s, abs=1e-9
            )  # on the injected clock, not the machine's
            if down.delay_s > 0:
                assert forwarder.drain_once() is None  # still pausing: no attempt
            pauses.append(down.delay_s)
            clock.now += down.delay_s
            assert forwarder.link_wait() == 0.0
        assert len(set(pauses)) == len(pauses)  # jittered
    finally:
        dead.close()
    (exam,) = box.exams(state="ready")
    assert exam.attempts == 0 and box.status().link_state == "down"  # the link's failures, not the exam's
    box.close()
