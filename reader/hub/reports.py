"""Reports: draft -> final (signed) -> amended versions, and publication of results to the site.

A signed report is never changed: an amendment is a new version with a reason. Signing needs a live
claim with the current fencing token, so a reader whose lease lapsed cannot sign. An amendment is
made by the signer of the latest version (no claim needed, unless another reader holds a live claim
for amendment), or by another reader of the exam's specialty who claimed the reported exam for
amendment and presents that claim's fence; the amendment clears the claim. Publishing takes
the next number of the site's result sequence under a row lock, so a site's result cursor has no
gaps and commits in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from teleread.auth import Principal
from teleread.db.schema import reports, sites
from teleread.errors import Conflict, InvalidInput, PermissionDenied
from teleread import lifecycle
from teleread.events import EventBus
from teleread.reader.hub.queue import QueueService
from teleread.vocab import ExamState, ReportStatus

log = logging.getLogger("teleread.reports")
MAX_TEXT = 20000


def _check_text(text: str, impression: str) -> None:
    if not text.strip():
        raise InvalidInput("report text is empty", reason="EMPTY_REPORT")
    if len(text) > MAX_TEXT or len(impression) > MAX_TEXT:
        raise InvalidInput("report text is too long", reason="REPORT_TOO_LONG")


def content_hash(*, exam_id: str, version: int, text: str, impression: str, critical: bool, signer: str) -> str:
    doc = json.dumps(
        {
            "exam_id": exam_id,
            "version": version,
            "text": text,
            "impression": impression,
            "critical": critical,
            "signed_by": signer,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(doc.encode()).hexdigest()


class ReportService:
    def __init__(self, *, engine: Engine, queue: QueueService, bus: EventBus) -> None:
        self._engine = engine
        self._queue = queue
        self._bus = bus

    @staticmethod
    def _latest(conn: Connection, exam_id: str) -> Any:
        return conn.execute(
            select(reports).where(reports.c.exam_id == exam_id).order_by(reports.c.version.desc()).limit(1)
        ).first()

    def save(
        self, p: Principal, *, exam_id: str, fence: int, text: str, impression: str = "", critical: bool = False
    ) -> dict[str, Any]:
        _check_text(text, impression)
        with self._engine.begin() as conn:
            exam = self._queue.check_lease(conn, p, exam_id=exam_id, fence=fence)
            latest = self._latest(conn, exam_id)
            now = self._queue.clock.now()
            content = {"text": text, "impression": impression, "critical": critical, "author_id": p.id}
            if latest is not None and latest.status == ReportStatus.DRAFT:
                lifecycle.move_report(
                    conn, exam._mapping, latest.id, ReportStatus.DRAFT, event="draft_saved", source=ReportStatus.DRAFT,
                    values=content, actor_id=p.id, record=True,
                )  # fmt: skip
                report_id = latest.id
            elif latest is not None:
                raise Conflict("the exam has a signed report; amend it instead", reason="ALREADY_SIGNED")
            else:
                report_id = lifecycle.new_report_version(
                    conn, exam._mapping, ReportStatus.DRAFT, event="drafted",
                    values={**content, "version": 1, "created_at": now}, actor_id=p.id, record=True,
                )  # fmt: skip
            return dict(conn.execute(select(reports).where(reports.c.id == report_id)).one()._mapping)

    def sign(self, p: Principal, *, exam_id: str, fence: int) -> dict[str, Any]:
        with self._engine.begin() as conn:
            exam = self._queue.check_lease(conn, p, exam_id=exam_id, fence=fence)
            latest = self._latest(conn, exam_id)
            if latest is None or latest.status != ReportStatus.DRAFT:
                raise Conflict("there is no draft report to sign", reason="NO_DRAFT")
            now = self._queue.clock.now()
            digest = content_hash(
                exam_id=exam_id,
                version=latest.version,
                text=latest.text,
                impression=latest.impression,
                critical=latest.critical,
                signer=p.name,
            )
            lifecycle.move_report(
                conn, exam._mapping, latest.id, ReportStatus.FINAL, event="signed", source=ReportStatus.DRAFT,
                values={"signed_by": p.id, "signed_at": now, "sha256": digest}, actor_id=p.id, record=False,
            )  # fmt: skip
            critical = bool(latest.critical)
            seq = self._publish(conn, exam=exam, report_id=latest.id, critical=critical, now=now)
            lifecycle.move_exam(
                conn,
                exam_id,
                ExamState.REPORTED,
                event="critical_result" if critical else "reported",
                values={"claimed_by": None, "lease_expires_at": None, "updated_at": now},
                actor_id=p.id,
                detail={"cursor": seq},
            )
            report = dict(conn.execute(select(reports).where(reports.c.id == latest.id)).one()._mapping)
        self._bus.publish()
        log.info("report signed", extra={"exam_id": exam_id})
        return report

    def _check_amender(self, conn: Connection, p: Principal, *, exam_id: str, fence: int) -> tuple[Any, Any]:
        """(exam row, latest report) if ``p`` may amend the exam's signed report now.

        With ``fence`` 0 only the signer of the latest version may amend, and not while anyone holds
        a live claim for amendment; with a fence, ``p`` must hold that live claim for amendment."""
        exam = self._queue.locked_exam(conn, p, exam_id=exam_id)
        latest = self._latest(conn, exam_id)
        if (
            exam.state != ExamState.REPORTED
            or latest is None
            or latest.status not in (ReportStatus.FINAL, ReportStatus.AMENDED)
        ):
            raise Conflict("only a signed report can be amended", reason="NOT_SIGNED")
        if fence:
            self._queue.check_lease(conn, p, exam_id=exam_id, fence=fence, states=(ExamState.REPORTED,))
        elif latest.signed_by != p.id:
            raise PermissionDenied(
                "only the signer may amend without a claim; claim the exam for amendment",
                reason="AMENDMENT_NEEDS_CLAIM",
            )
        elif self._queue.live_claim(exam, now=self._queue.clock.now()):
            raise Conflict("the exam is claimed for amendment; amend with that claim", reason="AMENDMENT_CLAIMED")
        return exam, latest

    def amend(
        self,
        p: Principal,
        *,
        exam_id: str,
        reason: str,
        text: str,
        impression: str = "",
        critical: bool = False,
        fence: int = 0,
    ) -> dict[str, Any]:
        """A new final version of a signed report, with its reason, published to the site.

        ``fence`` is that of ``p``'s claim for amendment; 0 (no claim) is for the signer only."""
        _check_text(text, impression)
        if not reason.strip():
            raise InvalidInput("an amendment needs a reason", reason="NO_REASON")
        if fence < 0:
            raise InvalidInput("a fence cannot be negative", reason="BAD_FENCE")
        with self._engine.begin() as conn:
            exam, latest = self._check_amender(conn, p, exam_id=exam_id, fence=fence)
            now = self._queue.clock.now()
            version = int(latest.version) + 1
            digest = content_hash(
                exam_id=exam_id, version=version, text=text, impression=impression, critical=critical, signer=p.name
            )
            report_id = lifecycle.new_report_version(
                conn,
                exam._mapping,
                ReportStatus.AMENDED,
                event="amended",
                values={
                    "version": version,
                    "text": text,
                    "impression": impression,
                    "critical": critical,
                    "author_id": p.id,
                    "signed_by": p.id,
                    "signed_at": now,
                    "amends_reason": reason,
                    "sha256": digest,
                    "created_at": now,
                },
                actor_id=p.id,
                record=False,  # the exam's "amended" below is the record
            )
            seq = self._publish(conn, exam=exam, report_id=report_id, critical=critical, now=now)
            lifecycle.move_exam(  # the claim for amendment, if any, ends with the amendment
                conn,
                exam_id,
                ExamState.REPORTED,
                event="amended",
                values={"claimed_by": None, "lease_expires_at": None, "updated_at": now},
                actor_id=p.id,
                detail={"version": version, "fence": int(fence)},
                also=[("critical_result" if critical else "reported", {"cursor": seq})],
            )
            report = dict(conn.execute(select(reports).where(reports.c.id == report_id)).one()._mapping)
        self._bus.publish()
        log.info("report amended", extra={"exam_id": exam_id})
        return report

    @staticmethod
    def _publish(conn: Connection, *, exam: Any, report_id: int, critical: bool, now: datetime) -> int:
        """Publish the report version as the site's next result; returns its cursor. The caller's
        exam move writes the event that announces it."""
        seq = conn.execute(
            update(sites)
            .where(sites.c.id == exam.site_id)
            .values(result_seq=sites.c.result_seq + 1)
            .returning(sites.c.result_seq)
        ).scalar_one()
        lifecycle.new_result(
            conn,
            values={
                "site_id": exam.site_id,
                "seq": seq,
                "exam_id": exam.id,
                "report_id": report_id,
                "published_at": now,
            },
            critical=critical,
        )
        return int(seq)
