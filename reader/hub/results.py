"""Results for requesting sites: list after a cursor, get one exam's latest result, and wait for new
ones. Each site sees only its own results; the cursor is the site's gapless result sequence."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from teleread.auth import Principal, require_result_reader
from teleread.db.engine import reading
from teleread.db.schema import exams, principals, reports, results
from teleread.errors import InvalidInput, NotFound
from teleread.events import EventBus


class ResultsService:
    def __init__(self, *, engine: Engine, bus: EventBus) -> None:
        self._engine = engine
        self._bus = bus

    @property
    def bus(self) -> EventBus:
        return self._bus

    @staticmethod
    def _query(site_id: int) -> Any:
        signer = principals.alias("signer")
        return (
            select(
                results.c.seq,
                results.c.critical.label("result_critical"),
                results.c.published_at,
                exams,
                reports.c.version,
                reports.c.status.label("report_status"),
                reports.c.text,
                reports.c.impression,
                reports.c.critical.label("report_critical"),
                reports.c.signed_at,
                reports.c.amends_reason,
                reports.c.sha256.label("report_sha256"),
                signer.c.name.label("signed_by_name"),
            )
            .select_from(
                results.join(exams, results.c.exam_id == exams.c.id)
                .join(reports, results.c.report_id == reports.c.id)
                .outerjoin(signer, reports.c.signed_by == signer.c.id)
            )
            .where(results.c.site_id == site_id)
        )

    def list_after(self, p: Principal, *, after: int, limit: int = 100) -> list[dict[str, Any]]:
        site_id = require_result_reader(p)
        if after < 0:
            raise InvalidInput("cursor cannot be negative", reason="BAD_CURSOR")
        limit = max(1, min(limit or 100, 500))
        query = self._query(site_id).where(results.c.seq > after).order_by(results.c.seq).limit(limit)
        with reading(self._engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def get(self, p: Principal, *, exam_id: str) -> dict[str, Any]:
        site_id = require_result_reader(p)
        query = self._query(site_id).where(results.c.exam_id == exam_id).order_by(results.c.seq.desc()).limit(1)
        with reading(self._engine) as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound("no result for that exam at this site", reason="RESULT_NOT_FOUND")
        return dict(row._mapping)
