"""The outbox's three parts on their own: the file store (links, set-aside, reserve), the ledger
(rows stamped with the times it is given, never a clock of its own) and the scheduler (priority,
attempts and next-try times on its clock, with the shared backoff)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import random
from pathlib import Path

import pytest

from teleread.backoff import Backoff
from teleread.clock import FakeClock
from teleread.errors import Conflict, NotFound, ResourceExhausted
from teleread.gateway.clinic.outbox_files import REASON_SUFFIX, RESERVE_BYTES, FileStore, typed_disk_full
from teleread.gateway.clinic.outbox_ledger import Ledger, Refused, iso
from teleread.gateway.clinic.outbox_schedule import Scheduler
from teleread.tracks import InvalidTransition

T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone.utc)


def test_the_file_store_links_durable_files_and_sets_aside_with_a_reason(tmp_path: Path) -> None:
    files = FileStore(tmp_path)
    tmp, digest = files.write_incoming(io.BytesIO(b"instance"))
    assert tmp.parent == files.incoming_dir and digest == (hashlib.sha256(b"instance").hexdigest(), 8)
    final = files.link(tmp, digest.sha256)
    assert final.read_bytes() == b"instance" and final.stat().st_nlink == 2  # a link, not a copy
    final.unlink()  # pruned between the link and the row
    files.relink(tmp, final)
    assert final.read_bytes() == b"instance"
    files.set_aside_link(digest.sha256, ".dcm", "BAD_UID", "refused by the hub", at="2026-11-23T08:00:00+00:00")
    kept = files.set_aside_dir / f"{digest.sha256}.dcm"
    assert kept.read_bytes() == b"instance"
    reason = kept.with_name(kept.name + REASON_SUFFIX).read_text(encoding="utf-8")
    assert reason.splitlines() == [
        "BAD_UID",
        "refused by the hub",
        "set aside by the gateway at 2026-11-23T08:00:00+00:00",
    ]
    assert files.remove(digest.sha256) and not files.remove(digest.sha256)
    assert kept.exists() and files.set_aside_count() == 1  # the set-aside link outlives the object


def test_the_reserve_is_released_for_the_database_and_put_back(tmp_path: Path) -> None:
    files = FileStore(tmp_path)
    assert files.keep_reserve() and files.reserve.stat().st_size == RESERVE_BYTES
    assert files.release_reserve() and not files.reserve.exists()
    assert not files.release_reserve()  # nothing left to give
    assert files.keep_reserve() and files.reserve.read_bytes() == bytes(RESERVE_BYTES)


def test_a_full_disk_while_writing_is_typed_and_leaves_no_partial_file(tmp_path: Path) -> None:
    import errno

    class FullDisk(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    files = FileStore(tmp_path)
    with pytest.raises(ResourceExhausted) as err:
        files.write_incoming(FullDisk())  # type: ignore[arg-type]
    assert err.value.reason == "GATEWAY_DISK_FULL" and not any(files.incoming_dir.iterdir())
    with pytest.raises(PermissionError), typed_disk_full():  # other OS errors are not a full disk
        raise PermissionError("denied")


def test_the_ledger_stamps_rows_with_the_times_it_is_given(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "outbox.db", path_of=lambda sha: tmp_path / "objects" / sha)
    at = iso(T0)
    fields = {"group_key": "1.2", "role": "dicom", "kind": "image", "priority": "routine", "indication": ""}
    with ledger.write() as db:
        first = ledger.record(db, sha="a" * 64, size=3, instance_key="1.2.1", at=at, **fields)
    with ledger.write() as db:
        again = ledger.record(
            db, sha="a" * 64, size=3, instance_key="1.2.1", at=iso(T0 + dt.timedelta(hours=1)), **fields
        )
        assert ledger.references(db, "a" * 64) and not ledger.references(db, "b" * 64)
    assert again == first and first.path == tmp_path / "objects" / ("a" * 64)
    assert ledger.exam(first.exam_id).created_at == at
    with pytest.raises(Conflict), ledger.write() as db:  # the same instance, other bytes
        ledger.record(db, sha="b" * 64, size=3, instance_key="1.2.1", at=at, **fields)
    assert ledger.objects_of(first.exam_id) == [first]  # the refused write was rolled back
    ledger.close()


def test_the_scheduler_counts_attempts_and_sets_next_tries_on_its_clock(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "outbox.db", path_of=lambda sha: tmp_path / sha)
    clock = FakeClock(T0)
    scheduler = Scheduler(ledger, Backoff(base_s=4.0, cap_s=16.0, rng=random.Random(9)), clock=clock)
    fields = {"role": "dicom", "kind": "image", "indication": "", "size": 1}
    with ledger.write() as db:
        for study, priority in (("1.1", "routine"), ("1.2", "stat")):
            ledger.record(
                db, sha=study * 10, group_key=study, instance_key=study + ".1", priority=priority, at=iso(T0), **fields
            )
    scheduler.complete("1.1")
    scheduler.complete("1.2")
    exam = scheduler.claim_next()
    assert exam is not None and exam.group_key == "1.2"  # stat before an older routine exam
    ceilings = []
    for attempt in range(1, 5):
        delay = scheduler.failed(exam.id, "DEADLINE_EXCEEDED")
        ceilings.append(scheduler.backoff.policy.ceiling(attempt))
        assert 0 <= delay <= ceilings[-1]
        held = scheduler.claim_next()  # the routine exam goes meanwhile
        assert held is not None and held.group_key == "1.1"
        scheduler.release(held.id, "later")
        clock.advance(delay)
        retry = scheduler.claim_next()
        assert retry is not None and retry.id == exam.id and retry.attempts == attempt
    assert ceilings == [4.0, 8.0, 16.0, 16.0]
    assert scheduler.committed(exam.id, "hub-9", refused=[Refused("c" * 64, "BAD_UID", "x")]) == iso(clock.now())
    assert ledger.status(refusals_since=iso(T0)).incomplete == 1
    ledger.close()


def test_the_outbox_moves_by_its_track_and_names_both_states_when_a_move_is_not_allowed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "outbox.db", path_of=lambda sha: tmp_path / sha)
    scheduler = Scheduler(ledger, Backoff(base_s=1.0, cap_s=1.0), clock=FakeClock(T0))
    fields = {"role": "dicom", "kind": "image", "indication": "", "size": 1, "priority": "routine"}
    with ledger.write() as db:
        obj = ledger.record(db, sha="d" * 64, group_key="1.3", instance_key="1.3.1", at=iso(T0), **fields)
    for outcome in (
        lambda: scheduler.committed(obj.exam_id, "hub-1"),
        lambda: scheduler.rejected(obj.exam_id, "INVALID_ARGUMENT"),
        lambda: scheduler.failed(obj.exam_id, "UNAVAILABLE"),
    ):  # an outcome for an exam nobody is uploading is a bug of the caller
        with pytest.raises(InvalidTransition) as err:
            outcome()
        assert err.value.reason == "INVALID_TRANSITION"
        assert (err.value.source, err.value.target) == ("collecting", err.value.metadata["to"])
        assert "outbox exam: no move from collecting to" in str(err.value)
    assert ledger.exam(obj.exam_id).state == "collecting" and ledger.exam(obj.exam_id).attempts == 0
    with pytest.raises(NotFound):
        scheduler.release("0" * 32, "UNAVAILABLE")
    scheduler.complete("1.3")
    assert scheduler.recover() == 0  # nothing was uploading
    exam = scheduler.claim_next()
    assert exam is not None and exam.state == "uploading"
    with ledger.write() as db:  # a late object of that study opens a follow-up instead of moving it back
        late = ledger.record(db, sha="e" * 64, group_key="1.3", instance_key="1.3.2", at=iso(T0), **fields)
    assert late.exam_id != exam.id and ledger.exam(late.exam_id).state == "collecting"
    assert scheduler.recover() == 1 and ledger.exam(exam.id).state == "ready"
    ledger.close()
