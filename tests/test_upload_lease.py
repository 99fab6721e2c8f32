"""Which stream may write an upload is a lease in the database, not a lock in one process: two hub
processes sharing the database and the staging volume never write one upload at once, the second
resumes where the first stopped, a dead hub's lease lapses on the clock, and a restarted hub frees
its own dead streams' leases at once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert, select, update

from teleread.auth import Principal
from teleread.clock import FakeClock, SystemClock
from teleread.db.engine import make_engine, upgrade, utcnow
from teleread.db.schema import sites, uploads
from teleread.errors import Conflict, Unavailable
from teleread.events import EventBus
from teleread.gateway.hub.ingest import IngestService
from teleread.reader.hub.routing import load_routing
from teleread.storage.local import LocalObjectStore
from teleread.vocab import Role

SITE = Principal(id=1, name="clinic-a", role=Role.SITE, site_id=1, site_code="clinic-a", hospital=None, specialty=None)
DATA = bytes(range(256)) * 4096  # 1 MiB of header-less bytes: a WFDB signal needs no parse until commit


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(insert(sites).values(id=1, code="clinic-a", name="A", lead_hospital="county", created_at=utcnow()))
    return eng


def _hub(engine: Engine, tmp_path: Path, name: str, **kw: object) -> IngestService:
    return IngestService(
        engine=engine, store=LocalObjectStore(tmp_path / "objects"), staging_dir=tmp_path / "staging",
        routing=load_routing(), bus=EventBus(), on_committed=lambda _: None, max_object_bytes=1 << 30,
        instance=name, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _upload(hub: IngestService) -> str:
    exam = hub.open_exam(SITE, client_exam_key="rec-1", kind="ecg", priority="routine", indication="",
                         study_instance_uid="")  # fmt: skip
    state = hub.begin_upload(
        SITE, exam_id=exam["id"], size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(), role="wfdb_signal"
    )
    return state.upload_id


def _writer(engine: Engine, upload_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(uploads.c.writer).where(uploads.c.id == upload_id)).scalar()


def test_a_second_hub_waits_for_the_writer_then_resumes_where_it_stopped(engine: Engine, tmp_path: Path) -> None:
    a = _hub(engine, tmp_path, "hub-a")
    b = _hub(engine, tmp_path, "hub-b", writer_wait_seconds=0.2)
    upload_id = _upload(a)
    first_sent, cut = threading.Event(), threading.Event()

    def stalled() -> Iterator[bytes]:
        yield DATA[:300_000]
        first_sent.set()
        cut.wait(10)
        raise ConnectionResetError("the link dropped")  # what a cancelled stream's iterator does

    failures: list[BaseException] = []

    def run() -> None:
        try:
            a.receive(SITE, upload_id=upload_id, offset=0, chunks=stalled())
        except BaseException as exc:  # noqa: BLE001 - the cut is the point
            failures.append(exc)

    writer = threading.Thread(target=run)
    writer.start()
    assert first_sent.wait(10)
    assert (_writer(engine, upload_id) or "").startswith("hub-a:")
    with pytest.raises(Conflict) as busy:  # the cut stream's handler still holds it
        b.receive(SITE, upload_id=upload_id, offset=300_000, chunks=iter([DATA[300_000:]]))
    assert busy.value.reason == "UPLOAD_BUSY"
    cut.set()
    writer.join(10)
    assert [type(f) for f in failures] == [ConnectionResetError]
    assert _writer(engine, upload_id) is None  # let go as the handler ended
    status = b.upload_status(SITE, upload_id=upload_id)
    assert status.committed_offset == 300_000
    done = b.receive(SITE, upload_id=upload_id, offset=300_000, chunks=iter([DATA[300_000:]]))
    assert (done.state, done.committed_offset) == ("stored", len(DATA))
    assert _writer(engine, upload_id) is None


def test_a_dead_hubs_lease_lapses_on_the_clock(engine: Engine, tmp_path: Path) -> None:
    clock = FakeClock(SystemClock().now())
    a = _hub(engine, tmp_path, "hub-a")
    upload_id = _upload(a)
    with engine.begin() as conn:  # hub A died mid-stream: its lease stays behind
        conn.execute(
            update(uploads)
            .where(uploads.c.id == upload_id)
            .values(writer="hub-a:dead", writer_until=clock.now() + timedelta(seconds=30))
        )
    b = _hub(engine, tmp_path, "hub-b", clock=clock, writer_wait_seconds=0.0)
    with pytest.raises(Conflict):
        b.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA]))
    clock.advance(31)
    done = b.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA]))
    assert done.state == "stored"


def test_a_restarted_hub_frees_its_own_dead_streams_at_once(engine: Engine, tmp_path: Path) -> None:
    a = _hub(engine, tmp_path, "hub-a")
    upload_id = _upload(a)
    with engine.begin() as conn:
        conn.execute(
            update(uploads)
            .where(uploads.c.id == upload_id)
            .values(writer="hub-a:dead", writer_until=utcnow() + timedelta(hours=1))
        )
    _hub(engine, tmp_path, "hub-b")  # another hub starting leaves hub A's lease alone
    assert _writer(engine, upload_id) == "hub-a:dead"
    again = _hub(engine, tmp_path, "hub-a", writer_wait_seconds=0.0)  # hub A restarts
    assert _writer(engine, upload_id) is None
    assert again.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA])).state == "stored"


def test_a_stream_keeps_its_lease_between_runs_of_messages_until_it_ends(engine: Engine, tmp_path: Path) -> None:
    a = _hub(engine, tmp_path, "hub-a")
    b = _hub(engine, tmp_path, "hub-b", writer_wait_seconds=0.0)
    upload_id = _upload(a)
    stream = a.new_writer()
    first = a.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA[:100_000]]), writer=stream)
    assert first.committed_offset == 100_000 and _writer(engine, upload_id) == stream  # held between runs
    with pytest.raises(Conflict) as busy:  # the stream is quiet, not gone: nobody else writes meanwhile
        b.receive(SITE, upload_id=upload_id, offset=100_000, chunks=iter([DATA[100_000:]]))
    assert busy.value.reason == "UPLOAD_BUSY"
    second = a.receive(SITE, upload_id=upload_id, offset=100_000, chunks=iter([DATA[100_000:200_000]]), writer=stream)
    assert second.committed_offset == 200_000 and _writer(engine, upload_id) == stream
    a.release_writer(upload_id, stream)  # the stream ended
    assert _writer(engine, upload_id) is None
    done = b.receive(SITE, upload_id=upload_id, offset=200_000, chunks=iter([DATA[200_000:]]))
    assert done.state == "stored"


def test_a_call_of_a_stream_that_already_ended_frees_the_lease_it_takes(engine: Engine, tmp_path: Path) -> None:
    a = _hub(engine, tmp_path, "hub-a")
    b = _hub(engine, tmp_path, "hub-b", writer_wait_seconds=0.0)
    upload_id = _upload(a)
    stream = a.new_writer()
    a.release_writer(upload_id, stream)  # the client left before the stream's call reached its thread
    with pytest.raises(Unavailable) as ended:
        a.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA[:1000]]), writer=stream)
    assert ended.value.reason == "STREAM_ENDED" and _writer(engine, upload_id) is None
    assert b.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA])).state == "stored"


def test_a_whole_object_in_one_run_costs_two_write_transactions_and_no_read_of_its_row(
    engine: Engine, tmp_path: Path
) -> None:
    a = _hub(engine, tmp_path, "hub-a")
    upload_id = _upload(a)
    seen: list[str] = []
    commits = [0]

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        seen.append(" ".join(sql.split()))

    def commit(conn: Any) -> None:
        commits[0] += 1

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        done = a.receive(SITE, upload_id=upload_id, offset=0, chunks=iter([DATA]), writer=a.new_writer())
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
    assert done.state == "stored" and _writer(engine, upload_id) is None
    # The lease is taken by the statement that returns the row, and freed by the row's last move.
    assert commits[0] == 2, seen
    assert not [s for s in seen if s.startswith("SELECT") and "FROM uploads" in s], seen
