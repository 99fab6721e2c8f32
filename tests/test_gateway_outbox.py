"""The gateway's durable outbox: durable before acknowledged, duplicates and conflicts, study
stability, priority order, backoff, crash leftovers and a full disk."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import random
from pathlib import Path

import pytest

from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.gateway.clinic.outbox import SCHEMA_VERSION, Backoff, Outbox, OutboxObject

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.timezone.utc)


def _put(box: Outbox, data: bytes, study: str, sop: str, **kw: str) -> OutboxObject:
    return box.receive(io.BytesIO(data), group_key=study, instance_key=sop, **kw)


def test_received_objects_survive_a_reopen_byte_identical(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    a = _put(box, b"A" * 3000, "1.2.3", "1.2.3.1")
    _put(box, b"B" * 10, "1.2.3", "1.2.3.2")
    box.close()
    again = Outbox(tmp_path)
    objs = again.objects_of(a.exam_id)
    assert [o.instance_key for o in objs] == ["1.2.3.1", "1.2.3.2"]
    for o, data in zip(objs, (b"A" * 3000, b"B" * 10)):
        assert o.path.read_bytes() == data and o.sha256 == hashlib.sha256(data).hexdigest() and o.size == len(data)
    assert again.status().by_state["collecting"] == 1


def test_a_retried_instance_is_acknowledged_once_and_different_bytes_are_refused(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    first = _put(box, b"same", "1.2", "1.2.1")
    second = _put(box, b"same", "1.2", "1.2.1")
    assert first == second and len(box.objects_of(first.exam_id)) == 1
    with pytest.raises(Conflict) as err:
        _put(box, b"changed", "1.2", "1.2.1")
    assert err.value.reason == "INSTANCE_CONFLICT"
    assert box.objects_of(first.exam_id)[0].path.read_bytes() == b"same"


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "x\ny", "9" * 300])
def test_unusable_keys_are_refused_and_nothing_is_written(tmp_path: Path, key: str) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(InvalidInput):
        _put(box, b"x", key, "1.1")
    assert not any(box.objects_dir.iterdir()) and sum(box.status().by_state.values()) == 0


def test_a_study_is_ready_after_the_quiet_period_or_when_the_sender_says_so(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    _put(box, b"1", "1.1", "1.1.1")
    _put(box, b"2", "1.2", "1.2.1")
    assert box.settle(quiet_s=30, now=dt.datetime.now(dt.timezone.utc)) == 0
    box.complete("1.2")
    assert box.status().by_state == {"collecting": 1, "ready": 1, "uploading": 0, "committed": 0, "rejected": 0}
    assert box.settle(quiet_s=30, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=31)) == 1


def test_drain_order_is_most_urgent_first_then_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for study, priority in (("1.1", "routine"), ("1.2", "urgent"), ("1.3", "stat"), ("1.4", "routine")):
        _put(box, study.encode(), study, study + ".1", priority=priority)
        box.complete(study)
    order = []
    while (exam := box.claim_next()) is not None:
        order.append(exam.group_key)
        box.committed(exam.id, "hub-" + exam.group_key)
    assert order == ["1.3", "1.2", "1.1", "1.4"]
    assert box.status().by_state["committed"] == 4 and box.status().bytes_waiting == 0


def test_a_later_urgent_object_raises_the_study_priority(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    obj = _put(box, b"1", "1.1", "1.1.1", priority="routine")
    _put(box, b"2", "1.1", "1.1.2", priority="stat")
    assert box.exam(obj.exam_id).priority == "stat"


def test_failures_back_off_capped_with_jitter_and_the_exam_waits(tmp_path: Path) -> None:
    box = Outbox(tmp_path, backoff=Backoff(base_s=2.0, cap_s=60.0))
    _put(box, b"x", "1.1", "1.1.1")
    box.complete("1.1")
    rng = random.Random(3)
    delays = []
    for _ in range(8):
        exam = box.claim_next(now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
        assert exam is not None
        delays.append(box.failed(exam.id, "UNAVAILABLE: hub down", rng=rng))
        assert box.claim_next() is None  # not before its retry time
    assert all(0 <= d <= 60.0 for d in delays) and max(delays) > 8.0  # grows, never past the cap
    status = box.status()
    assert status.by_state["ready"] == 1 and status.last_error == "UNAVAILABLE: hub down"
    assert box.exam(exam.id).attempts == 8


def test_an_upload_cut_by_a_crash_is_ready_again_after_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    _put(box, b"x", "1.1", "1.1.1")
    box.complete("1.1")
    assert box.claim_next() is not None
    box.close()
    (tmp_path / "incoming" / "leftover.part").write_bytes(b"half an object")
    again = Outbox(tmp_path)
    assert again.status().by_state["ready"] == 1
    assert not any((tmp_path / "incoming").iterdir())  # a never-acknowledged half file is gone


def test_a_late_instance_of_a_sent_study_opens_a_follow_up_exam(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    first = _put(box, b"x", "1.1", "1.1.1")
    box.complete("1.1")
    exam = box.claim_next()
    assert exam is not None and exam.id == first.exam_id
    late = _put(box, b"y", "1.1", "1.1.2")  # arrives while the study is being uploaded
    assert late.exam_id != first.exam_id
    assert [o.instance_key for o in box.objects_of(first.exam_id)] == ["1.1.1"]  # the upload's set is fixed
    assert [o.instance_key for o in box.objects_of(late.exam_id)] == ["1.1.2"]
    assert box.follow_up_of(late.exam_id) == first.exam_id
    later = _put(box, b"z", "1.1", "1.1.3")  # the follow-up still collects
    assert later.exam_id == late.exam_id
    box.committed(first.exam_id, "hub-1")
    by_state = box.status().by_state
    assert (by_state["committed"], by_state["collecting"]) == (1, 1)


def test_a_resent_study_is_acknowledged_without_a_second_exam(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    first = _put(box, b"x", "1.1", "1.1.1")
    box.complete("1.1")
    exam = box.claim_next()
    assert exam is not None
    box.committed(exam.id, "hub-1")
    again = _put(box, b"x", "1.1", "1.1.1")  # the technician sends the whole study again
    assert again.exam_id == first.exam_id and again.id == first.id
    assert box.status().by_state["collecting"] == 0 and box.claim_next() is None
    with pytest.raises(Conflict) as err:
        _put(box, b"other", "1.1", "1.1.1")
    assert err.value.reason == "INSTANCE_CONFLICT"


def test_an_outbox_of_schema_1_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "outbox.db")
    v1 = (
        "CREATE TABLE exams (id TEXT PRIMARY KEY, group_key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,"
        " priority TEXT NOT NULL, priority_rank INTEGER NOT NULL, indication TEXT NOT NULL DEFAULT '',"
        " state TEXT NOT NULL, created_at TEXT NOT NULL, last_object_at TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT, last_error TEXT NOT NULL DEFAULT '',"
        " hub_exam_id TEXT NOT NULL DEFAULT '', committed_at TEXT);"
        "CREATE TABLE objects (id TEXT PRIMARY KEY, exam_id TEXT NOT NULL REFERENCES exams(id),"
        " instance_key TEXT NOT NULL, role TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
        " received_at TEXT NOT NULL, UNIQUE (exam_id, instance_key));"
        "INSERT INTO exams (id, group_key, kind, priority, priority_rank, state, created_at, last_object_at,"
        " hub_exam_id) VALUES ('e1', '1.1', 'image', 'routine', 2, 'committed', 't', 't', 'hub-1');"
        "INSERT INTO objects VALUES ('o1', 'e1', '1.1.1', 'dicom', 'ab', 1, 't');"
    )
    db.executescript(v1)
    db.close()
    box = Outbox(tmp_path)
    assert box.exam("e1").hub_exam_id == "hub-1" and box.status().by_state["committed"] == 1
    late = _put(box, b"y", "1.1", "1.1.2")  # the old UNIQUE(group_key) would refuse this
    assert late.exam_id != "e1" and box.follow_up_of(late.exam_id) == "e1"
    box.close()
    check = sqlite3.connect(tmp_path / "outbox.db")
    assert check.execute("PRAGMA foreign_key_check").fetchall() == []
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_full_disk_is_a_typed_error_and_leaves_nothing_half_stored(tmp_path: Path, monkeypatch) -> None:
    box = Outbox(tmp_path)
    kept = _put(box, b"kept", "1.1", "1.1.1")

    class FullDisk(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResourceExhausted) as err:
        box.receive(FullDisk(), group_key="1.2", instance_key="1.2.1")
    assert err.value.reason == "GATEWAY_DISK_FULL"
    assert not any(box.incoming_dir.iterdir())
    assert box.status().by_state["collecting"] == 1  # only the first study
    assert kept.path.read_bytes() == b"kept"


def test_sweep_removes_only_unreferenced_object_files(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    kept = _put(box, b"kept", "1.1", "1.1.1")
    (box.objects_dir / ("0" * 64)).write_bytes(b"orphan of a crash before the insert")
    assert box.sweep() == 1
    assert kept.path.exists()


def test_link_state_changes_its_since_only_when_it_flips(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.status().link_state == "unknown"
    t0, t1, t2 = NOW, NOW + dt.timedelta(minutes=1), NOW + dt.timedelta(minutes=2)
    box.link(False, now=t0)
    box.link(False, now=t1)
    status = box.status()
    assert (status.link_state, status.link_since, status.last_contact_at) == ("down", t0.isoformat(), None)
    box.link(True, now=t2)
    status = box.status()
    assert (status.link_state, status.link_since, status.last_contact_at) == ("up", t2.isoformat(), t2.isoformat())
    box.link(False, now=t2 + dt.timedelta(minutes=1))
    assert box.status().last_contact_at == t2.isoformat()  # the last answer is remembered while down


def test_prune_frees_sent_files_but_keeps_what_still_waits_and_the_rows(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    sent = _put(box, b"sent", "1.1", "1.1.1")
    shared = _put(box, b"shared", "1.1", "1.1.2")
    box.complete("1.1")
    exam = box.claim_next()
    assert exam is not None
    box.committed(exam.id, "hub-1")
    waiting = _put(box, b"shared", "2.2", "2.2.1")  # same bytes in a study not yet sent
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    assert box.prune(keep_seconds=3 * 3600, now=later) == 0  # still inside the keep period
    assert box.prune(keep_seconds=3600, now=later) == 1
    assert not sent.path.exists() and shared.path.exists() and waiting.path.read_bytes() == b"shared"
    again = _put(box, b"sent", "1.1", "1.1.1")  # a resend after pruning is still recognised
    assert again.exam_id == sent.exam_id and box.claim_next() is None


def test_a_wfdb_record_is_never_made_ready_by_the_clock_alone(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    _put(box, b"signal", "wfdb:" + "ab" * 32, "rec.dat", role="wfdb_signal", kind="ecg")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    assert box.settle(quiet_s=1, now=later) == 0  # its header has not been taken: not sendable
    box.complete("wfdb:" + "ab" * 32)
    assert box.claim_next() is not None


def test_retries_quiet_periods_and_pruning_follow_the_clock_the_outbox_is_given(tmp_path: Path) -> None:
    from teleread.clock import FakeClock

    clock = FakeClock(NOW)
    box = Outbox(tmp_path, clock=clock, backoff=Backoff(base_s=10.0, cap_s=10.0))
    obj = _put(box, b"x", "1.1", "1.1.1")
    assert box.exam(obj.exam_id).created_at == NOW.isoformat()  # rows are stamped by the clock
    clock.advance(29)
    assert box.settle(quiet_s=30) == 0
    clock.advance(1)
    assert box.settle(quiet_s=30) == 1
    exam = box.claim_next()
    assert exam is not None
    delay = box.failed(exam.id, "UNAVAILABLE", rng=random.Random(1))
    assert 0 < delay <= 10.0
    clock.advance(delay - 0.001)
    assert box.claim_next() is None  # its next try is still ahead on this clock
    clock.advance(0.002)
    again = box.claim_next()
    assert again is not None and again.id == exam.id and again.attempts == 1
    box.committed(exam.id, "hub-1")
    clock.advance(3599)
    assert box.prune(keep_seconds=3600) == 0
    clock.advance(1)
    assert box.prune(keep_seconds=3600) == 1 and not obj.path.exists()


def test_outside_the_routine_window_only_stat_and_urgent_exams_are_claimed(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for study, priority in (("1.1", "routine"), ("1.2", "urgent")):
        _put(box, study.encode(), study, study + ".1", priority=priority)
        box.complete(study)
    first = box.claim_next(routine=False)
    assert first is not None and first.group_key == "1.2"
    box.committed(first.id, "hub-1")
    assert box.claim_next(routine=False) is None  # the routine exam waits for its window
    routine = box.claim_next(routine=True)
    assert routine is not None and routine.group_key == "1.1"
    box.release(routine.id, "UNAVAILABLE: link down")  # the link's failure: ready at once, not counted
    again = box.claim_next()
    assert again is not None and again.id == routine.id and again.attempts == 0
    box.rejected(again.id, "INVALID_ARGUMENT: refused")
    assert box.status().by_state["rejected"] == 1 and box.claim_next() is None


def test_an_interrupted_attempt_is_recovered_without_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    _put(box, b"x", "1.1", "1.1.1")
    box.complete("1.1")
    assert box.claim_next() is not None
    assert box.claim_next() is None  # held by the attempt that died
    assert box.recover() == 1
    assert box.claim_next() is not None


EXPECTED_SCHEMA = {  # the on-disk format of schema version 3: a change here needs a migration
    ("table", "exams"): "CREATE TABLE exams (\n    id TEXT PRIMARY KEY,\n    group_key TEXT NOT NULL,\n"
    "    kind TEXT NOT NULL,\n    priority TEXT NOT NULL,\n    priority_rank INTEGER NOT NULL,\n"
    "    indication TEXT NOT NULL DEFAULT '',\n    state TEXT NOT NULL,\n    created_at TEXT NOT NULL,\n"
    "    last_object_at TEXT NOT NULL,\n    attempts INTEGER NOT NULL DEFAULT 0,\n    next_attempt_at TEXT,\n"
    "    last_error TEXT NOT NULL DEFAULT '',\n    hub_exam_id TEXT NOT NULL DEFAULT '',\n    committed_at TEXT,\n"
    "    follow_up_of TEXT NOT NULL DEFAULT '',\n    refused_count INTEGER NOT NULL DEFAULT 0\n)",
    ("table", "objects"): "CREATE TABLE objects (\n    id TEXT PRIMARY KEY,\n"
    "    exam_id TEXT NOT NULL REFERENCES exams(id),\n    instance_key TEXT NOT NULL,\n    role TEXT NOT NULL,\n"
    "    sha256 TEXT NOT NULL,\n    size INTEGER NOT NULL,\n    received_at TEXT NOT NULL,\n"
    "    UNIQUE (exam_id, instance_key)\n)",
    ("table", "refusals"): "CREATE TABLE refusals (\n    id INTEGER PRIMARY KEY,\n    at TEXT NOT NULL,\n"
    "    source TEXT NOT NULL,\n    reason TEXT NOT NULL,\n    exam_id TEXT NOT NULL DEFAULT ''\n)",
    ("table", "link"): "CREATE TABLE link (\n    id INTEGER PRIMARY KEY CHECK (id = 1),\n    state TEXT NOT NULL,\n"
    "    since TEXT NOT NULL,\n    last_contact_at TEXT\n)",
    ("index", "ix_refusals_at"): "CREATE INDEX ix_refusals_at ON refusals (at)",
    ("index", "ix_exams_queue"): "CREATE INDEX ix_exams_queue ON exams (state, priority_rank, created_at)",
    ("index", "ix_exams_group"): "CREATE INDEX ix_exams_group ON exams (group_key)",
}


def test_the_database_and_folders_on_disk_keep_their_format(tmp_path: Path) -> None:
    import sqlite3

    box = Outbox(tmp_path)
    obj = _put(box, b"bytes", "1.1", "1.1.1")
    box.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    rows = db.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    assert {(t, n): sql for t, n, sql in rows} == EXPECTED_SCHEMA
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("outbox.db")) == [
        "incoming", "objects", "reserve",
    ]  # fmt: skip
    assert obj.path == tmp_path / "objects" / hashlib.sha256(b"bytes").hexdigest()
    assert (tmp_path / "reserve").read_bytes() == bytes(512 * 1024)


def test_a_reserve_write_a_crash_cut_is_removed_at_open_and_the_reserve_put_back(tmp_path: Path) -> None:
    Outbox(tmp_path).close()
    (tmp_path / "reserve").unlink()  # released on a full disk, then the gateway was killed re-writing it
    (tmp_path / ".reserve.abc123.tmp").write_bytes(bytes(4096))
    box = Outbox(tmp_path)
    assert not (tmp_path / ".reserve.abc123.tmp").exists()
    assert (tmp_path / "reserve").stat().st_size == 512 * 1024
    box.close()
    Outbox(tmp_path, maintenance=False).close()  # a receiver process leaves the owner's files alone
    assert (tmp_path / "reserve").exists()


def test_an_object_over_the_size_limit_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(InvalidInput) as err:
        box.receive(io.BytesIO(b"x" * 2048), group_key="1.1", instance_key="1.1.1", max_bytes=1024)
    assert err.value.reason == "OBJECT_TOO_LARGE"
    spooled = box.incoming_dir / "spooled.dcm"
    spooled.write_bytes(b"y" * 2048)
    with pytest.raises(InvalidInput) as err:
        box.adopt(spooled, group_key="1.1", instance_key="1.1.2", max_bytes=1024)  # hashed here: no digest given
    assert err.value.reason == "OBJECT_TOO_LARGE"
    assert not any(box.incoming_dir.iterdir()) and not any(box.objects_dir.iterdir())
    assert sum(box.status().by_state.values()) == 0
