"""The watch feed: one reader of the events table per hub process, whatever the number of
streams; it never loses an event that commits after a later one (ids are assigned at insert,
commits land in any order on PostgreSQL), and never sends one twice; results watchers get their
own site's results in cursor order, without gaps or repeats."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from sqlalchemy import event, func, select

from conftest import HubStack, make_settings, running, start_stack
from helpers import error_reason, run_coroutine, wait_for
from teleread.db.engine import utcnow
from teleread.db.schema import events, sites
from teleread.errors import Unavailable
from teleread.events import record_event
from teleread.reader.hub.feed import EventCursor, Subscription
from teleread.v1 import results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc
from test_stream_limits import open_watch, queued_exam

pytestmark = pytest.mark.timeout(180)
WL = worklist_pb2.WorklistEvent


def _rows(*ids: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(event_id=i, event_at=utcnow()) for i in ids]


def test_late_committed_event_is_sent_once() -> None:
    feed = EventCursor(start=4)
    assert [r.event_id for r in feed.new(_rows(3, 4, 5, 7))] == [5, 7]  # 3, 4: before the snapshot
    assert [r.event_id for r in feed.new(_rows(5, 6, 7, 8))] == [6, 8]  # 6 committed late
    assert feed.new(_rows(5, 6, 7, 8)) == []


def test_a_gap_is_looked_for_during_the_window_only() -> None:
    now = [1000.0]
    feed = EventCursor(start=0, window_seconds=60, clock=lambda: now[0])
    assert [r.event_id for r in feed.new(_rows(1, 3))] == [1, 3]
    assert feed.gaps == {2}  # id 2 was not committed yet: it is read again
    now[0] += 59
    assert feed.gaps == {2} and "IN" in str(feed.condition()).upper()
    now[0] += 2  # past the window: a rolled-back id is given up
    feed.condition()
    assert feed.gaps == frozenset() and feed.new(_rows(2)) == []
    big = EventCursor(start=0, max_gap=100)
    big.new(_rows(1_000_000))  # a sequence jump is not a million transactions in flight
    assert len(big.gaps) == 100


def test_a_watcher_that_falls_behind_is_told_to_watch_again() -> None:
    async def scenario() -> None:
        sub = Subscription(key=("worklist", "h", "s"), floor=0, loop=asyncio.get_running_loop(), max_pending=3)
        sub.offer([1, 2])
        assert await sub.take() == [1, 2]
        sub.offer([3, 4, 5, 6])  # more than it may hold: dropped, not buffered without bound
        with pytest.raises(Unavailable) as behind:
            await sub.take()
        assert behind.value.reason == "WATCH_BEHIND" and behind.value.retryable

    run_coroutine(scenario())  # not asyncio.run: see its docstring


def _claim_and_release(stack: HubStack, times: int) -> None:
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    for _ in range(times):
        claim = worklist.ClaimNext(worklist_pb2.ClaimNextRequest(), timeout=10)
        worklist.ReleaseClaim(
            worklist_pb2.ReleaseClaimRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10
        )


def test_one_feed_reads_the_events_for_every_stream(embedded_stack: HubStack) -> None:
    stack = embedded_stack
    exam_id = queued_exam(stack)
    calls = [open_watch(stack, stack.channel(who)) for who in ("cardio", "cardio2") for _ in range(30)]
    feeds = [t for t in threading.enumerate() if t.name == "watch-feed"]
    assert len(feeds) == 1

    reads = [0]

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM events" in statement:
            reads[0] += 1

    event.listen(stack.hub.engine, "before_cursor_execute", count)
    try:
        _claim_and_release(stack, 3)
        for call in calls:
            got = [next(call) for _ in range(6)]
            assert [e.type for e in got] == [WL.TYPE_CLAIMED, WL.TYPE_RELEASED] * 3
            assert {(e.exam.exam_id, e.exam.site) for e in got} == {(exam_id, "clinic-a")}
            assert len({e.event_id for e in got}) == 6
    finally:
        event.remove(stack.hub.engine, "before_cursor_execute", count)
    # Six commits, sixty streams: a handful of reads (a wake-up per commit at most, and the
    # one-second poll), where a reader per stream would have made at least 360.
    assert 1 <= reads[0] <= 12, reads[0]
    for call in calls:
        call.cancel()


@pytest.fixture
def unpolled_stack(tmp_path: Path) -> Iterator[HubStack]:
    """An embedded hub whose feed does not poll during a test: only wake-ups make it read."""
    yield from running(start_stack("embedded", make_settings(tmp_path).updated(grpc__watch_poll_seconds=30.0)))


def test_no_read_without_a_watcher_and_no_checkout_per_read(unpolled_stack: HubStack) -> None:
    stack = unpolled_stack
    feed = stack.hub.feed
    queued_exam(stack)
    reads = feed.reads
    _claim_and_release(stack, 3)  # six commits, six wake-ups, nobody watching
    threading.Event().wait(0.3)  # several times the feed's 50 ms between reads
    assert feed.reads == reads

    checkouts = [0]

    def count(*_args: Any) -> None:
        if threading.current_thread().name == "watch-feed":
            checkouts[0] += 1

    event.listen(stack.hub.engine, "checkout", count)
    try:
        watch = open_watch(stack, stack.channel("cardio"))
        _claim_and_release(stack, 3)
        got = [next(watch) for _ in range(6)]
        assert [e.type for e in got] == [WL.TYPE_CLAIMED, WL.TYPE_RELEASED] * 3
        assert feed.reads > reads
    finally:
        event.remove(stack.hub.engine, "checkout", count)
    assert checkouts[0] == 0  # the feed reads on the connection it holds
    watch.cancel()


def _sign(stack: HubStack, exam_id: str) -> None:
    worklist = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    claim = worklist.ClaimExam(worklist_pb2.ClaimExamRequest(exam_id=exam_id), timeout=10)
    worklist.SaveReport(
        worklist_pb2.SaveReportRequest(exam_id=exam_id, fence=claim.fence, text="Sinus rhythm.", impression="Normal"),
        timeout=10,
    )
    worklist.SignReport(worklist_pb2.SignReportRequest(exam_id=exam_id, fence=claim.fence), timeout=10)


def test_results_watchers_get_their_sites_results_in_order_once(embedded_stack: HubStack) -> None:
    stack = embedded_stack
    results = results_pb2_grpc.ResultsStub(stack.channel("site_a"))
    early = results.WatchResults(results_pb2.WatchResultsRequest(after_cursor=0), timeout=60)
    early.initial_metadata()  # sent once the watch is subscribed, before any result exists
    first = [queued_exam(stack) for _ in range(2)]
    _sign(stack, first[0])
    assert next(early).cursor == 1  # live from the feed
    live = results.WatchResults(results_pb2.WatchResultsRequest(after_cursor=0), timeout=60)
    assert next(live).cursor == 1  # caught up from the table
    wait_for(lambda: stack.hub.feed.subscribers() == 2)
    _sign(stack, queued_exam(stack, site="clinic-b"))  # another site's result: not shown here
    _sign(stack, first[1])
    got = next(live)
    assert (got.cursor, got.exam.exam_id, got.exam.site) == (2, first[1], "clinic-a")
    assert next(early).cursor == 2
    later = results.WatchResults(results_pb2.WatchResultsRequest(after_cursor=1), timeout=60)
    assert next(later).cursor == 2
    wait_for(lambda: stack.hub.feed.subscribers() == 3)
    third = queued_exam(stack)
    _sign(stack, third)
    assert [next(early).cursor, next(live).cursor, next(later).cursor] == [3, 3, 3]
    with stack.hub.engine.connect() as conn:
        assert conn.execute(select(sites.c.result_seq).where(sites.c.code == "clinic-b")).scalar_one() == 1
    # A reader may not watch results: the feed applies the same rule as ListResults.
    with pytest.raises(Exception) as denied:
        next(results_pb2_grpc.ResultsStub(stack.channel("cardio")).WatchResults(results_pb2.WatchResultsRequest()))
    assert error_reason(denied.value) == "ROLE_DENIED"
    for call in (early, live, later):
        call.cancel()


def test_an_event_committed_after_a_later_one_is_delivered_once(pg_stack: HubStack) -> None:
    stack = pg_stack
    exam_id = queued_exam(stack)
    watch = open_watch(stack, stack.channel("cardio"))
    engine, feed = stack.hub.engine, stack.hub.feed
    where = {"exam_id": exam_id, "hospital": "county-hosp", "specialty": "cardiology"}

    slow = engine.connect()
    slow_tx = slow.begin()
    record_event(slow, type="claimed", **where)  # its id is taken now, its commit comes last
    early = slow.execute(select(func.max(events.c.id))).scalar_one()
    with engine.begin() as conn:
        record_event(conn, type="released", **where)
    got = next(watch)
    assert (got.type, got.event_id) == (WL.TYPE_RELEASED, early + 1)
    reads = feed.reads
    wait_for(lambda: feed.reads >= reads + 2)  # the feed has read past the gap, more than once
    slow_tx.commit()
    slow.close()
    got = next(watch)
    assert (got.type, got.event_id) == (WL.TYPE_CLAIMED, early)  # late, but delivered
    with engine.begin() as conn:
        record_event(conn, type="queued", **where)
    got = next(watch)
    assert (got.type, got.event_id) == (WL.TYPE_QUEUED, early + 2)  # and neither of the two again
    watch.cancel()


def _queue_1200(stack: HubStack) -> None:
    """1,200 queued cardiology exams of clinic-a straight into the database; ids 1..1200 (hex) in
    queue order (by deadline)."""
    from datetime import timedelta

    from sqlalchemy import insert

    from teleread.db.schema import exams

    now = utcnow()
    with stack.hub.engine.begin() as conn:
        site_id = conn.execute(select(sites.c.id).where(sites.c.code == "clinic-a")).scalar_one()
        conn.execute(
            insert(exams),
            [
                {
                    "id": f"{n:032x}",
                    "site_id": site_id,
                    "client_exam_key": f"bulk-{n}",
                    "kind": "ecg",
                    "modality": "ECG",
                    "state": "queued",
                    "priority": "routine",
                    "specialty": "cardiology",
                    "hospital": "county-hosp",
                    "level": "routine",
                    "level_rank": 3,
                    "deadline": now + timedelta(minutes=n),
                    "received_at": now,
                    "created_at": now,
                    "updated_at": now,
                }  # fmt: skip
                for n in range(1, 1201)
            ],
        )


def test_a_worklist_snapshot_carries_the_whole_queue_not_a_first_page(embedded_stack: HubStack) -> None:
    _queue_1200(embedded_stack)
    call = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("cardio")).Watch(
        worklist_pb2.WatchWorklistRequest(), timeout=60
    )
    snapshot = []
    for item in call:
        if item.type == WL.TYPE_SNAPSHOT_END:
            break
        snapshot.append(item.exam.exam_id)
    call.cancel()
    assert len(snapshot) == 1200 and snapshot[0] == f"{1:032x}" and snapshot[-1] == f"{1200:032x}"  # queue order


def test_a_snapshot_asked_in_batches_comes_in_queue_order_500_exams_at_a_time(embedded_stack: HubStack) -> None:
    _queue_1200(embedded_stack)
    call = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("cardio")).Watch(
        worklist_pb2.WatchWorklistRequest(snapshot_batches=True), timeout=60
    )
    batches = []
    for item in call:
        if item.type == WL.TYPE_SNAPSHOT_END:
            break
        assert item.type == WL.TYPE_SNAPSHOT_BATCH and not item.HasField("exam")
        batches.append([e.exam_id for e in item.exams])
    call.cancel()
    assert [len(b) for b in batches] == [500, 500, 200]
    assert [i for b in batches for i in b] == [f"{n:032x}" for n in range(1, 1201)]


def test_changes_asked_in_batches_come_as_one_message_per_read_with_the_same_events(embedded_stack: HubStack) -> None:
    stack = embedded_stack
    queued_exam(stack)
    single = open_watch(stack, stack.channel("cardio"))
    batched = worklist_pb2_grpc.WorklistStub(stack.channel("cardio2")).Watch(
        worklist_pb2.WatchWorklistRequest(change_batches=True), timeout=60
    )
    assert next(batched).type == WL.TYPE_SNAPSHOT and next(batched).type == WL.TYPE_SNAPSHOT_END
    with stack.hub.feed._reading:  # the feed reads the six commits together, once they are all in
        _claim_and_release(stack, 3)
    message = next(batched)
    assert message.type == WL.TYPE_CHANGES and not message.HasField("exam")
    assert [e.type for e in message.changes] == [WL.TYPE_CLAIMED, WL.TYPE_RELEASED] * 3
    assert message.event_id == message.changes[-1].event_id and message.at == message.changes[-1].at
    one_by_one = [next(single) for _ in range(6)]  # the same events, byte for byte, one message each
    assert [e.SerializeToString() for e in one_by_one] == [e.SerializeToString() for e in message.changes]
    single.cancel()
    batched.cancel()
