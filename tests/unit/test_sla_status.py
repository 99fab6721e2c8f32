"""`teleread read sla`: which exams are past their reading deadline and which past 80 % of it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from teleread.reader.clients.queue_client import sla_status
from teleread.v1 import common_pb2

NOW = datetime(2026, 12, 4, 8, 0, tzinfo=timezone.utc)


def _exam(exam_id: str, *, arrived_min_ago: float, sla_min: float) -> common_pb2.Exam:
    exam = common_pb2.Exam(exam_id=exam_id)
    arrived = NOW - timedelta(minutes=arrived_min_ago)
    exam.received_at.FromDatetime(arrived)
    exam.deadline.FromDatetime(arrived + timedelta(minutes=sla_min))
    return exam


def test_breaches_and_near_breaches_are_told_apart_most_urgent_first() -> None:
    exams = [
        _exam("fresh", arrived_min_ago=1, sla_min=60),  # 2 % gone
        _exam("near", arrived_min_ago=50, sla_min=60),  # 83 %
        _exam("at-80", arrived_min_ago=8, sla_min=10),  # exactly the warning
        _exam("late", arrived_min_ago=12, sla_min=10),  # 2 min over
        _exam("later", arrived_min_ago=100, sla_min=60),  # 40 min over
        _exam("at-deadline", arrived_min_ago=10, sla_min=10),
        common_pb2.Exam(exam_id="no-deadline"),
    ]
    breached, near = sla_status(exams, now=NOW)
    assert [e.exam_id for e in breached] == ["later", "late", "at-deadline"]
    assert [e.exam_id for e in near] == ["at-80", "near"]
