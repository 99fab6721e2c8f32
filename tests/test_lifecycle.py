"""The life cycles as data: allowed moves, the typed error naming both states, the event written
in the same transaction as the state, the diagrams in ARCHITECTURE.md, and that no other module
assigns a state."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select

from teleread import lifecycle
from teleread.db.engine import make_engine, upgrade, utcnow
from teleread.db.schema import events, exams, principals, reports, sites, uploads
from teleread.lifecycle import EXAM, REPORT, InvalidTransition
from teleread.vocab import ExamState, ReportStatus, UploadStatus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(
            insert(sites).values(
                id=1, code="clinic-a", name="A", lead_hospital="county", result_seq=0, created_at=utcnow()
            )
        )
        conn.execute(
            insert(principals).values(
                id=7, name="dr-li", role="cardiologist", hospital="county", token_sha256="x" * 64, created_at=utcnow()
            )
        )
    return eng


def _open(engine: Engine, exam_id: str = "e" * 32) -> str:
    now = utcnow()
    with engine.begin() as conn:
        lifecycle.open_exam(
            conn,
            values={
                "id": exam_id, "site_id": 1, "client_exam_key": exam_id, "kind": "ecg", "modality": "ECG",
                "study_instance_uid": "", "priority": "routine", "indication": "", "follow_up_of": "",
                "created_at": now, "updated_at": now,
            },
            actor_id=None,
            detail=None,
        )  # fmt: skip
    return exam_id


def _state(engine: Engine, exam_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(exams.c.state).where(exams.c.id == exam_id)).scalar_one())


def _types(engine: Engine, exam_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(events.c.type).where(events.c.exam_id == exam_id).order_by(events.c.id)).scalars()
        )


def test_every_edge_names_states_of_its_track_and_each_track_starts_somewhere() -> None:
    for track in lifecycle.TRACKS:
        names = {str(s) for s in track.states}
        assert any(e.source is None for e in track.edges), track.name
        for e in track.edges:
            assert e.target in names and (e.source is None or e.source in names)
    # the spine the design names, in order
    spine = ["receiving", "received", "triaged", "queued", "in_reading", "reported", "delivered", "acknowledged"]
    for a, b in zip(spine, spine[1:]):
        assert EXAM.sources(b, next(e.event for e in EXAM.edges if e.source == a and e.target == b)), (a, b)
    assert REPORT.edge(ReportStatus.AWAITING_COUNTERSIGNATURE, ReportStatus.FINAL, "countersigned")


def test_a_move_the_table_lacks_raises_naming_both_states(engine: Engine) -> None:
    exam_id = _open(engine)
    with pytest.raises(InvalidTransition) as err, engine.begin() as conn:
        lifecycle.move_exam(conn, exam_id, ExamState.IN_READING, event="claimed")
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "INVALID_TRANSITION"
    assert "receiving" in err.value.message and "in_reading" in err.value.message
    assert err.value.metadata == {"track": "exam", "from": "receiving", "to": "in_reading"}
    assert _state(engine, exam_id) == "receiving" and _types(engine, exam_id) == ["opened"]


def test_a_move_writes_its_event_in_the_same_transaction(engine: Engine) -> None:
    exam_id = _open(engine)
    with engine.begin() as conn:
        row = lifecycle.move_exam(
            conn,
            exam_id,
            ExamState.RECEIVED,
            event="received",
            values={"hospital": "county", "specialty": "cardiology"},
        )
        assert row is not None and row["state"] == "received"
    with engine.connect() as conn:
        ev = conn.execute(select(events).where(events.c.type == "received")).one()
    assert (ev.exam_id, ev.site_id, ev.hospital, ev.specialty) == (exam_id, 1, "county", "cardiology")
    # a transaction that fails after the move leaves neither the state nor the event
    with pytest.raises(RuntimeError), engine.begin() as conn:
        lifecycle.move_exam(conn, exam_id, ExamState.TRIAGED, event="triaged")
        raise RuntimeError("crash before commit")
    assert _state(engine, exam_id) == "received" and _types(engine, exam_id) == ["opened", "received"]


def test_expect_answers_none_when_the_row_moved_on(engine: Engine) -> None:
    exam_id = _open(engine)
    with engine.begin() as conn:
        lifecycle.move_exam(conn, exam_id, ExamState.EXPIRED, event="expired")
    with engine.begin() as conn:  # a late triage worker, say: nothing happens, no error
        assert lifecycle.move_exam(conn, exam_id, ExamState.TRIAGED, event="triaged", expect=ExamState.RECEIVED) is None
    assert _state(engine, exam_id) == "expired" and _types(engine, exam_id) == ["opened", "expired"]
    with pytest.raises(InvalidTransition), engine.begin() as conn:  # expecting a move the table lacks is a bug
        lifecycle.move_exam(conn, exam_id, ExamState.QUEUED, event="queued", expect=ExamState.RECEIVING)


def test_report_track_refuses_a_second_first_draft_and_a_sign_of_a_final(engine: Engine) -> None:
    exam_id = _open(engine)
    with engine.begin() as conn:
        exam = conn.execute(select(exams).where(exams.c.id == exam_id)).one()._mapping
        values = {
            "version": 1,
            "text": "t",
            "impression": "",
            "critical": False,
            "author_id": 7,
            "created_at": utcnow(),
        }
        rid = lifecycle.new_report_version(
            conn, exam, ReportStatus.DRAFT, event="drafted", values=values, actor_id=7, record=True
        )
        lifecycle.move_report(
            conn, exam, rid, ReportStatus.FINAL, event="signed", source=ReportStatus.DRAFT, values={}, actor_id=7,
            record=False,
        )  # fmt: skip
    with pytest.raises(InvalidTransition) as err, engine.begin() as conn:
        lifecycle.move_report(
            conn, exam, rid, ReportStatus.FINAL, event="signed", source=ReportStatus.DRAFT, values={}, actor_id=7,
            record=False,
        )  # fmt: skip
    assert err.value.metadata["from"] == "final" and err.value.metadata["to"] == "final"
    with pytest.raises(InvalidTransition), engine.begin() as conn:
        lifecycle.new_report_version(
            conn, exam, ReportStatus.DRAFT, event="drafted", values={**values, "version": 2}, actor_id=7, record=True
        )
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(reports)).scalar_one() == 1
    assert _types(engine, exam_id) == ["opened", "drafted"]


def test_upload_moves_follow_the_upload_track(engine: Engine) -> None:
    exam_id = _open(engine)
    with engine.begin() as conn:
        lifecycle.open_upload(
            conn,
            values={
                "id": "u" * 32, "exam_id": exam_id, "site_id": 1, "sha256": "0" * 64, "size": 1, "role": "dicom",
                "created_at": utcnow(), "updated_at": utcnow(),
            },
        )  # fmt: skip
        lifecycle.move_upload(conn, "u" * 32, UploadStatus.REJECTED, values={})
    with pytest.raises(InvalidTransition) as err, engine.begin() as conn:
        lifecycle.move_upload(conn, "u" * 32, UploadStatus.STORED, values={})
    assert err.value.metadata == {"track": "upload", "from": "rejected", "to": "stored"}
    with engine.connect() as conn:
        assert conn.execute(select(uploads.c.state)).scalar_one() == "rejected"


def test_architecture_shows_the_diagrams_drawn_from_the_tables() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    begin, end = "<!-- lifecycle diagrams: python -m teleread.lifecycle -->", "<!-- end of lifecycle diagrams -->"
    assert begin in text and end in text
    shown = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == lifecycle.diagrams().strip(), "run `python -m teleread.lifecycle` and paste it into ARCHITECTURE.md"


STATE_COLUMNS = {"state", "status", "critical_state"}
PRODUCT = ("gateway", "reader", "models", "teleread")
MOVERS = {"teleread/lifecycle.py", "teleread/tracks.py"}  # the hub's mover, and the tables with the outbox's
TRACKED = ("exams", "reports", "results", "uploads")  # the tables with a life cycle (the hub's and the outbox's)
# an SQL string that sets a state column of one: UPDATE t SET ... state=..., or INSERT INTO t (..., state, ...)
_COLUMNS, _TABLES = "|".join(STATE_COLUMNS), "|".join(TRACKED)
_SQL_SET = re.compile(rf"\bUPDATE\s+(?:{_TABLES})\b[^;]*?\bSET\b[^;]*?\b(?:{_COLUMNS})\s*=", re.I | re.S)
_SQL_INSERT = re.compile(rf"\bINSERT\s+INTO\s+(?:{_TABLES})\s*\([^)]*\b(?:{_COLUMNS})\b", re.I)


def _assignments(tree: ast.AST) -> list[int]:
    """Lines of ``.values(state=...)`` / ``.values(**{"state": ...})`` / ``insert(...).values({...})``,
    and of SQL strings (or the parts of an implicitly joined one) that set a state column."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
            keys = {k.arg for k in node.keywords if k.arg}
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg is None)]:
                if isinstance(arg, ast.Dict):
                    keys |= {k.value for k in arg.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if keys & STATE_COLUMNS:
                found.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _SQL_SET.search(node.value) or _SQL_INSERT.search(node.value):
                found.append(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if _SQL_SET.search(text) or _SQL_INSERT.search(text):
                found.append(node.lineno)
    return sorted(set(found))


def test_no_module_but_the_lifecycle_assigns_a_state() -> None:
    offenders = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in MOVERS or rel.startswith("teleread/db/migrations/"):
                continue
            offenders += [f"{rel}:{line}" for line in _assignments(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == []


def test_the_static_check_would_catch_an_assignment() -> None:
    tree = ast.parse(
        "update(exams).values(state='queued')\ninsert(t).values(**{'status': 'final'})\n"
        "db.execute(\"UPDATE exams SET last_error=?, state='ready' WHERE id=?\", x)\n"
        "db.execute(\"INSERT INTO exams (id, state) VALUES (?, 'collecting')\")\n"
        "db.execute(f\"UPDATE exams SET attempts=attempts+1, state='{s}' WHERE id=?\")\n"
        "db.execute(\"SELECT state FROM exams WHERE state='ready'\")\n"
        'db.execute("INSERT INTO link (id, state) VALUES (1, ?)")\n'  # the link's up or down: no life cycle
    )
    assert _assignments(tree) == [1, 2, 3, 4, 5]
