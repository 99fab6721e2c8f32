"""A critical exam nobody claims: the readers' alert reaches the hook at once, the on-call list's
at 10 minutes, once each; a claim stops the next step. On SQLite and on PostgreSQL + S3, with the
clock passed in and a real HTTP webhook on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import make_settings, running, start_stack
from helpers import signed_critical_ecg, wait_for_state, write_synthetic_wfdb
from teleread.clock import FakeClock
from teleread.db.engine import as_utc, utcnow
from teleread.db.schema import events, exams, notifications
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.reader.hub import sla
from teleread.reader.hub.notify import Notifier
from teleread.reader.hub.timers import TimerSweeper
from teleread.settings import NotifySettings, QueueSettings
from teleread.v1 import ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc


class Hook:
    """A webhook on loopback: every POST's body and Idempotency-Key; answers ``status``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.calls.append((self.headers["Idempotency-Key"], json.loads(body)))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    try:
        yield h
    finally:
        h.server.shutdown()


@pytest.fixture(params=["embedded", "postgres_s3"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, hook: Hook) -> Iterator[Any]:
    if request.param == "embedded":
        settings = make_settings(tmp_path)
    else:
        pg, s3, bucket = (request.getfixturevalue(f) for f in ("pg_url", "s3_server", "s3_bucket"))
        settings = make_settings(tmp_path, database_url=pg, s3=s3, bucket=bucket)
    quiet = {  # the test sweeps and delivers, on its own clock
        "queue": QueueSettings(timer_interval_seconds=0),
        "notify": NotifySettings(webhook_url=hook.url, interval_seconds=0),
    }
    settings = settings.model_copy(update=quiet)
    yield from running(start_stack(request.param, settings))


def test_an_unclaimed_critical_ecg_is_escalated_once_and_a_claim_stops_the_next_step(
    stack: Any, hook: Hook, tmp_path: Path
) -> None:
    hub = stack.hub
    write_synthetic_wfdb(tmp_path / "ecg", rhythm="pause")  # a >= 3 s pause: critical
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    [outcome] = upload_exams(ingest, scan_paths([tmp_path / "ecg"]).exams)
    exam = wait_for_state(ingest, outcome.exam_id, "queued")
    assert exam.triage.level == 1
    with hub.engine.connect() as conn:
        arrived = as_utc(conn.execute(select(exams.c.received_at).where(exams.c.id == exam.exam_id)).scalar_one())
    clock = FakeClock(max(utcnow(), arrived) + timedelta(seconds=1))  # the alert was written at the hub's now
    timers = TimerSweeper(engine=hub.engine, clock=clock, handlers=sla.handlers(hub.queue.roster), interval_seconds=0)
    notifier = Notifier(engine=hub.engine, clock=clock, settings=hub.settings.notify)

    assert notifier.run_once() == 1 and notifier.run_once() == 0  # the readers' alert, at once, once
    [(key, alert)] = hook.calls
    assert alert["kind"] == "critical_alert" and alert["audience"] == "readers" and alert["exam_id"] == exam.exam_id
    assert alert["specialty"] == "cardiology" and alert["level"] == "critical"
    assert not any(name in json.dumps(alert).lower() for name in ("patient", "name", "birth"))  # no patient data

    clock.advance(by=arrived + timedelta(minutes=10, seconds=-1) - clock.now())  # just before 10 min
    assert timers.run_once() == 5  # the alert again at 2, 4, 6 and 8 min; the reading warning at 8 (80 % of 10)
    assert notifier.run_once() == 4
    assert sorted((c[1]["kind"], c[1]["audience"], c[1].get("repeat")) for c in hook.calls[1:]) == [
        ("critical_alert", "readers", k) for k in (1, 2, 3, 4)
    ]
    with hub.engine.connect() as conn:  # the stations and watches rang again each time
        rings = conn.execute(select(events.c.id).where(events.c.exam_id == exam.exam_id, events.c.type == "critical"))
        assert len(rings.all()) == 5
    del hook.calls[1:]
    clock.advance(2)
    timers.run_once()
    hook.status = 503  # the first delivery fails: tried again after 5 s, once delivered
    assert notifier.run_once() == 0
    hook.status = 200
    assert notifier.run_once() == 0  # not due again yet
    clock.advance(5)
    assert notifier.run_once() == 1 and notifier.run_once() == 0
    assert [c[1]["kind"] for c in hook.calls] == ["critical_alert", "escalation", "escalation"]
    failed, delivered = hook.calls[1], hook.calls[2]
    assert failed[0] == delivered[0] != key  # the same notification, by its Idempotency-Key
    assert delivered[1]["audience"] == "on-call" and delivered[1]["step"] == 1 and delivered[1]["after_minutes"] == 10
    with hub.engine.connect() as conn:
        query = select(events.c.detail).where(events.c.exam_id == exam.exam_id, events.c.type == "escalated")
        escalated = conn.execute(query).scalars().all()
        sent = conn.execute(select(notifications.c.status, notifications.c.attempts)
                            .where(notifications.c.exam_id == exam.exam_id)).all()  # fmt: skip
    assert [json.loads(d)["to"] for d in escalated] == ["on-call"]
    assert sorted(sent) == [("sent", 1)] * 5 + [("sent", 2)]

    cardio = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    claim = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
    assert claim.exam.exam_id == exam.exam_id
    clock.advance(by=timedelta(minutes=15))  # past the department head's step (20 min): claimed, so nothing
    timers.run_once()
    assert notifier.run_once() == 0 and len(hook.calls) == 3
    with hub.engine.connect() as conn:
        assert conn.execute(select(events.c.id).where(events.c.exam_id == exam.exam_id,
                                                      events.c.type == "escalated")).all().__len__() == 1  # fmt: skip


def test_without_a_hook_a_notification_is_marked_failed_at_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path).model_copy(update={
        "queue": QueueSettings(timer_interval_seconds=0), "notify": NotifySettings(interval_seconds=0)})  # fmt: skip
    with running_stack(settings) as stack:
        write_synthetic_wfdb(tmp_path / "ecg", rhythm="pause")
        ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
        [outcome] = upload_exams(ingest, scan_paths([tmp_path / "ecg"]).exams)
        wait_for_state(ingest, outcome.exam_id, "queued")
        clock = FakeClock(utcnow() + timedelta(seconds=1))
        notifier = Notifier(engine=stack.hub.engine, clock=clock, settings=stack.hub.settings.notify)
        assert notifier.run_once() == 0
        with stack.hub.engine.connect() as conn:
            row = conn.execute(select(notifications.c.status, notifications.c.last_error)).one()
        assert tuple(row) == ("failed", "NO_HOOK")


class running_stack:  # noqa: N801 - a context manager named as what it gives
    def __init__(self, settings: Any) -> None:
        self._gen = running(start_stack("embedded", settings))

    def __enter__(self) -> Any:
        return next(self._gen)

    def __exit__(self, *exc: Any) -> None:
        next(self._gen, None)


def test_a_critical_result_is_escalated_until_a_named_person_reads_it_back(
    stack: Any, hook: Hook, tmp_path: Path
) -> None:
    """Signed critical -> published to the site -> nobody acknowledges -> the second contact is
    notified at 15 min, the result escalated -> the site acknowledges with name, role, method and
    read-back -> the result says so, the next steps say nothing."""
    import grpc

    from teleread.db.schema import results
    from teleread.v1 import results_pb2, results_pb2_grpc

    hub = stack.hub
    exam_id = signed_critical_ecg(stack, tmp_path / "ecg")
    site = results_pb2_grpc.ResultsStub(stack.channel("site_a"))
    result = site.GetResult(results_pb2.GetResultRequest(exam_id=exam_id), timeout=10)
    assert result.critical and result.critical_state == "notified" and not result.HasField("acknowledgement")
    published = result.published_at.ToDatetime().replace(tzinfo=as_utc(utcnow()).tzinfo)

    clock = FakeClock(published + timedelta(minutes=15, seconds=1))
    timers = TimerSweeper(engine=hub.engine, clock=clock, handlers=sla.handlers(hub.queue.roster), interval_seconds=0)
    notifier = Notifier(engine=hub.engine, clock=clock, settings=hub.settings.notify)
    timers.run_once()
    notifier.run_once()
    escalations = [c[1] for c in hook.calls if c[1]["kind"] == "critical_unacknowledged"]
    assert [(e["audience"], e["step"], e["cursor"]) for e in escalations] == [("second-contact", 1, result.cursor)]
    assert site.GetResult(results_pb2.GetResultRequest(exam_id=exam_id)).critical_state == "escalated"

    def acknowledge(**fields: Any) -> Any:
        request = {"cursor": result.cursor, "name": "Dr Wang Li", "role": "attending physician", "method": "phone",
                   "read_back": "Sinus arrest with a 3.5 s pause, patient to be monitored", **fields}  # fmt: skip
        return site.AcknowledgeCritical(results_pb2.AcknowledgeCriticalRequest(**request), timeout=10)

    for bad in ({"method": "fax"}, {"name": " "}, {"read_back": "x" * 2001}, {"role": "nurse\x00"}):
        with pytest.raises(grpc.RpcError) as err:
            acknowledge(**bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    other = results_pb2_grpc.ResultsStub(stack.channel("site_b"))
    with pytest.raises(grpc.RpcError) as err:  # another site's result looks missing
        other.AcknowledgeCritical(results_pb2.AcknowledgeCriticalRequest(
            cursor=result.cursor, name="x", role="y", method="phone", read_back="z"), timeout=10)  # fmt: skip
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    acked = acknowledge()
    assert acked.critical_state == "acknowledged"
    ack = acked.acknowledgement
    assert (ack.name, ack.role, ack.method) == ("Dr Wang Li", "attending physician", "phone")
    assert ack.read_back.startswith("Sinus arrest") and ack.acknowledged_at.seconds > 0
    with pytest.raises(grpc.RpcError) as err:
        acknowledge()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    clock.advance(by=timedelta(hours=1))  # the supervisor's and the duty office's steps: acknowledged, so nothing
    timers.run_once()
    notifier.run_once()
    assert len([c for c in hook.calls if c[1]["kind"] == "critical_unacknowledged"]) == 1
    with hub.engine.connect() as conn:
        mine = events.c.exam_id == exam_id
        query = select(events.c.type, events.c.detail).where(mine, events.c.type.like("critical_%"))
        trail = conn.execute(query.order_by(events.c.id)).all()
        columns = (results.c.ack_name, results.c.ack_method, results.c.acknowledged_by)
        row = conn.execute(select(*columns).where(results.c.exam_id == exam_id)).one()
    assert [t for t, _ in trail] == ["critical_result", "critical_escalated", "critical_acknowledged"]
    assert json.loads(trail[1][1])["to"] == "second-contact"
    assert row.ack_name == "Dr Wang Li" and row.ack_method == "phone" and row.acknowledged_by is not None
