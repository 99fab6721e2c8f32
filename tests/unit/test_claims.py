"""The reading queue's claim rules on the in-memory repository and a fake clock: most urgent
first, leases that lapse on the clock, fencing, release, claims for amendment, and a refused move
that changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest

from teleread.auth import Principal
from teleread.clock import EPOCH, FakeClock
from teleread.errors import Conflict, LeaseLost, NotFound, PermissionDenied
from teleread.events import EventBus
from teleread.lifecycle import InvalidTransition
from teleread.reader.hub.repository import MemoryStore, MemoryUnitOfWork
from teleread.reader.hub.queue import QueueService
from teleread.vocab import ExamState, Level, Role

LI = Principal(id=1, name="dr-li", role=Role.CARDIOLOGIST, site_id=None, site_code=None, hospital="county",
               specialty="cardiology")  # fmt: skip
WANG = Principal(id=2, name="dr-wang", role=Role.CARDIOLOGIST, site_id=None, site_code=None, hospital="county",
                 specialty="cardiology")  # fmt: skip
RAD = Principal(id=3, name="dr-zhao", role=Role.RADIOLOGIST, site_id=None, site_code=None, hospital="county",
                specialty="radiology")  # fmt: skip


def _exam(store: MemoryStore, exam_id: str, *, level: Level, minutes: int, state: ExamState = ExamState.QUEUED,
          specialty: str = "cardiology", hospital: str = "county") -> None:  # fmt: skip
    store.add(
        id=exam_id, site_id=1, state=state, hospital=hospital, specialty=specialty, level_rank=level.queue_rank,
        deadline=EPOCH + timedelta(minutes=minutes), received_at=EPOCH,
    )  # fmt: skip


@pytest.fixture()
def rig() -> tuple[QueueService, MemoryStore, FakeClock]:
    store, clock = MemoryStore(), FakeClock()
    queue = QueueService(
        engine=None, store=None, bus=EventBus(), lease_seconds=600, max_lease_seconds=3600, clock=clock,
        uow=MemoryUnitOfWork(store),
    )  # fmt: skip
    return queue, store, clock


def test_claim_next_takes_the_most_urgent_then_the_earliest_deadline(rig) -> None:
    queue, store, clock = rig
    _exam(store, "routine-early", level=Level.ROUTINE, minutes=5)
    _exam(store, "critical-late", level=Level.CRITICAL, minutes=60)
    _exam(store, "critical-early", level=Level.CRITICAL, minutes=10)
    _exam(store, "other-hospital", level=Level.CRITICAL, minutes=1, hospital="city")
    _exam(store, "chest", level=Level.CRITICAL, minutes=1, specialty="radiology")
    got = [queue.claim_next(LI) for _ in range(4)]
    assert [g["id"] if g else None for g in got] == ["critical-early", "critical-late", "routine-early", None]
    claimed = store.exams["critical-early"]
    assert claimed["state"] == ExamState.IN_READING and claimed["claimed_by"] == 1 and claimed["fence"] == 1
    assert claimed["lease_expires_at"] == clock.now() + timedelta(seconds=600)
    assert [e["type"] for e in store.events] == ["claimed"] * 3


def test_a_lease_lapses_on_the_clock_and_the_next_reader_takes_over_with_a_new_fence(rig) -> None:
    queue, store, clock = rig
    _exam(store, "e1", level=Level.URGENT, minutes=30)
    first = queue.claim(LI, exam_id="e1", lease_seconds=60)
    with pytest.raises(LeaseLost) as err:
        queue.claim(WANG, exam_id="e1")
    assert err.value.reason == "NOT_CLAIMABLE"
    clock.advance(59)
    assert queue.claim_next(WANG) is None  # still held
    clock.advance(2)
    second = queue.claim_next(WANG)
    assert second is not None and second["id"] == "e1" and second["fence"] == first["fence"] + 1
    with pytest.raises(LeaseLost) as err:  # the first reader's fence is stale now
        queue.renew(LI, exam_id="e1", fence=first["fence"])
    assert err.value.reason == "LEASE_LOST"
    renewed = queue.renew(WANG, exam_id="e1", fence=second["fence"], lease_seconds=120)
    assert renewed["lease_expires_at"] == clock.now() + timedelta(seconds=120)


def test_release_puts_the_exam_back_and_a_stale_release_changes_nothing(rig) -> None:
    queue, store, clock = rig
    _exam(store, "e1", level=Level.ROUTINE, minutes=30)
    claim = queue.claim(LI, exam_id="e1")
    with pytest.raises(LeaseLost):
        queue.release(LI, exam_id="e1", fence=claim["fence"] + 5)
    assert store.exams["e1"]["state"] == ExamState.IN_READING
    queue.release(LI, exam_id="e1", fence=claim["fence"])
    row = store.exams["e1"]
    assert (row["state"], row["claimed_by"], row["lease_expires_at"]) == (ExamState.QUEUED, None, None)
    assert [e["type"] for e in store.events] == ["claimed", "released"]


def test_a_claim_for_amendment_keeps_the_exam_reported(rig) -> None:
    queue, store, clock = rig
    _exam(store, "e1", level=Level.ROUTINE, minutes=30, state=ExamState.REPORTED)
    with pytest.raises(LeaseLost):
        queue.claim(LI, exam_id="e1")  # a reported exam is not in the queue
    claim = queue.claim(LI, exam_id="e1", for_amendment=True)
    assert store.exams["e1"]["state"] == ExamState.REPORTED and claim["fence"] == 1
    with pytest.raises(Conflict) as err:
        queue.claim(WANG, exam_id="e1", for_amendment=True)
    assert err.value.reason == "AMENDMENT_CLAIMED"
    assert queue.claim_next(WANG) is None
    queue.release(LI, exam_id="e1", fence=claim["fence"])
    assert store.exams["e1"]["state"] == ExamState.REPORTED
    assert [e["type"] for e in store.events] == ["amendment_claimed", "amendment_released"]


def test_tenancy_and_specialty_are_enforced(rig) -> None:
    queue, store, clock = rig
    _exam(store, "e1", level=Level.ROUTINE, minutes=30)
    _exam(store, "far", level=Level.ROUTINE, minutes=30, hospital="city")
    with pytest.raises(PermissionDenied) as err:
        queue.claim(RAD, exam_id="e1")
    assert err.value.reason == "WRONG_SPECIALTY"
    with pytest.raises(NotFound) as nf:
        queue.claim(LI, exam_id="far")
    assert nf.value.reason == "EXAM_NOT_FOUND"
    assert store.events == []


def test_a_move_the_life_cycle_refuses_rolls_the_unit_of_work_back(rig) -> None:
    queue, store, clock = rig
    _exam(store, "e1", level=Level.ROUTINE, minutes=30)
    uow = MemoryUnitOfWork(store)
    with pytest.raises(InvalidTransition) as err, uow() as tx:
        tx.exams.take("e1", ExamState.IN_READING, reader_id=1, until=clock.now(), now=clock.now())
        tx.exams.drop("e1", ExamState.RECEIVED, event="received", actor_id=1, now=clock.now())
    assert err.value.metadata == {"track": "exam", "from": "in_reading", "to": "received"}
    assert store.exams["e1"]["state"] == ExamState.QUEUED and store.exams["e1"]["fence"] == 0
    assert store.events == []


def test_a_reader_claiming_an_exam_they_hold_gets_the_same_claim_back(rig) -> None:
    queue, store, clock = rig
    _exam(store, "e1", level=Level.URGENT, minutes=30)
    first = queue.claim(LI, exam_id="e1", lease_seconds=60)  # e.g. from the command line
    clock.advance(30)
    again = queue.claim(LI, exam_id="e1", lease_seconds=600)  # the same reader, now in the station
    assert again["fence"] == first["fence"] == 1
    assert again["lease_expires_at"] == clock.now() + timedelta(seconds=600)
    assert [e["type"] for e in store.events] == ["claimed"]  # no second claim
    queue.renew(LI, exam_id="e1", fence=first["fence"])  # the first holder's fence still works
    with pytest.raises(LeaseLost):  # another reader still cannot take it
        queue.claim(WANG, exam_id="e1")
    clock.advance(601)
    lapsed = queue.claim(LI, exam_id="e1")  # after a lapse it is a new claim with a new fence
    assert lapsed["fence"] == 2
