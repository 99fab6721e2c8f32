"""Reports: draft -> final (signed) -> amended versions, and publication of results to the site.

A signed report is never changed: an amendment is a new version with a reason. Signing needs a live
claim with the current fencing token, so a reader whose lease lapsed cannot sign. An amendment is
made by the signer of the latest version (no claim needed, unless another reader holds a live claim
for amendment), or by another reader of the exam's specialty who claimed the reported exam for
amendment and presents that claim's fence; the amendment clears the claim. Publishing takes
the next number of the site's result sequence under a row lock, so a site's result cursor has no
gaps and commits in order. Once a signature or an amendment committed, ``on_signed`` is told the
exam and version (the hub renders its printed report then, off the signing call's path).

An ECG report also carries statements from the hub's statement library (``statements.py``) and the
reader's measurements, each version its own: a draft keeps the machine's suggestions the reader has
not confirmed yet, a signed version only the confirmed statements; both are in the signed hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from teleread.auth import Principal
from teleread.errors import Conflict, InvalidInput, PermissionDenied
from teleread.events import EventBus
from teleread.reader.hub.claims import AMENDING, READING, ExamRecord, live_claim
from teleread.reader.hub.queue import QueueService
from teleread.reader.hub.repository import ReportRecord, Tx, UnitOfWork
from teleread.reader.hub.statements import StatementLibrary, checked_measurements, load_library
from teleread.vocab import ExamState, ReportStatus

log = logging.getLogger("teleread.reports")
MAX_TEXT = 20000


def _check_text(text: str, impression: str) -> None:
    if not text.strip():
        raise InvalidInput("report text is empty", reason="EMPTY_REPORT")
    if len(text) > MAX_TEXT or len(impression) > MAX_TEXT:
        raise InvalidInput("report text is too long", reason="REPORT_TOO_LONG")


@dataclass(frozen=True)
class EcgContent:
    """What an ECG report carries beside its text, as the reader sent it (checked by the service)."""

    statements: Sequence[Mapping[str, Any]] = ()
    measurements: Mapping[str, float] = field(default_factory=dict)
    measurements_edited: Sequence[str] = ()


NO_ECG = EcgContent()


def content_hash(
    *,
    exam_id: str,
    version: int,
    text: str,
    impression: str,
    critical: bool,
    signer: str,
    statements_json: str = "",
    measurements_json: str = "",
) -> str:
    content: dict[str, Any] = {
        "exam_id": exam_id,
        "version": version,
        "text": text,
        "impression": impression,
        "critical": critical,
        "signed_by": signer,
    }
    if statements_json:  # a report without them hashes as it always did
        content["statements"] = json.loads(statements_json)
    if measurements_json:
        content["measurements"] = json.loads(measurements_json)
    doc = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(doc.encode()).hexdigest()


class ReportService:
    """Save, sign and amend reports, on the queue's claims, through a unit of work."""

    def __init__(
        self,
        *,
        queue: QueueService,
        bus: EventBus,
        uow: UnitOfWork | None = None,
        on_signed: Callable[[str, int], None] | None = None,
        library: StatementLibrary | None = None,
    ) -> None:
        self.library = library or load_library()
        self._queue = queue
        self._uow = uow or queue.uow
        self._bus = bus
        self._on_signed = on_signed  # (exam id, version) once a signature or amendment committed

    def _signed(self, report: ReportRecord) -> None:
        """After the commit: the printed report is rendered off the signing call's path."""
        if self._on_signed is None:
            return
        try:
            self._on_signed(report.exam_id, report.version)
        except Exception as exc:  # the signature stands; the clean-up pass renders what is missing
            log.error("printed report not queued", extra={"exam_id": report.exam_id, "reason": type(exc).__name__})

    def _ecg(self, ecg: EcgContent, *, signed: bool) -> dict[str, str | None]:
        """The statements and measurements columns of a version (``signed``: confirmed statements only)."""
        statements = self.library.checked(ecg.statements, signed=signed)
        values, edited = checked_measurements(ecg.measurements, ecg.measurements_edited)
        return {
            "statements_json": json.dumps([s.to_dict() for s in statements], ensure_ascii=False)
            if statements
            else None,
            "measurements_json": json.dumps({"values": values, "edited": edited}, sort_keys=True) if values else None,
        }

    def save(
        self,
        p: Principal,
        *,
        exam_id: str,
        fence: int,
        text: str,
        impression: str = "",
        critical: bool = False,
        ecg: EcgContent = NO_ECG,
    ) -> ReportRecord:
        _check_text(text, impression)
        columns = self._ecg(ecg, signed=False)
        with self._uow() as tx:
            exam = self._queue.held(tx.exams, p, exam_id=exam_id, fence=fence, states=READING)
            latest = tx.reports.latest(exam_id)
            content = {"text": text, "impression": impression, "critical": critical, "author_id": p.id, **columns}
            if latest is not None and latest.status == ReportStatus.DRAFT:
                return tx.reports.move(
                    exam, latest.id, ReportStatus.DRAFT, event="draft_saved", source=ReportStatus.DRAFT,
                    values=content, actor_id=p.id, record=True,
                )  # fmt: skip
            if latest is not None:
                raise Conflict("the exam has a signed report; amend it instead", reason="ALREADY_SIGNED")
            return tx.reports.add(
                exam, ReportStatus.DRAFT, event="drafted",
                values={**content, "version": 1, "created_at": self._queue.clock.now()}, actor_id=p.id, record=True,
            )  # fmt: skip

    def sign(self, p: Principal, *, exam_id: str, fence: int) -> ReportRecord:
        with self._uow() as tx:
            exam = self._queue.held(tx.exams, p, exam_id=exam_id, fence=fence, states=READING)
            latest = tx.reports.latest(exam_id)
            if latest is None or latest.status != ReportStatus.DRAFT:
                raise Conflict("there is no draft report to sign", reason="NO_DRAFT")
            now = self._queue.clock.now()
            statements = [s for s in json.loads(latest.statements_json or "[]") if s.get("confirmed")]
            kept = json.dumps(statements, ensure_ascii=False) if statements else ""  # the unconfirmed left out
            digest = content_hash(
                exam_id=exam_id,
                version=latest.version,
                text=latest.text,
                impression=latest.impression,
                critical=latest.critical,
                signer=p.name,
                statements_json=kept,
                measurements_json=latest.measurements_json,
            )
            signed = {"signed_by": p.id, "signed_at": now, "sha256": digest, "statements_json": kept or None}
            report = tx.reports.move(
                exam, latest.id, ReportStatus.FINAL, event="signed", source=ReportStatus.DRAFT,
                values=signed, actor_id=p.id, record=False,
            )  # fmt: skip
            seq = tx.results.publish(
                exam, report_id=report.id, critical=report.critical, now=now, unacknowledged=self._queue.escalation
            )
            tx.exams.drop(
                exam_id,
                ExamState.REPORTED,
                event="critical_result" if report.critical else "reported",
                actor_id=p.id,
                now=now,
                detail={"cursor": seq},
            )
        self._bus.publish()
        log.info("report signed", extra={"exam_id": exam_id})
        self._signed(report)
        return report

    def _check_amender(self, tx: Tx, p: Principal, *, exam_id: str, fence: int) -> tuple[ExamRecord, ReportRecord]:
        """(exam, latest report version) if ``p`` may amend the exam's signed report now.

        With ``fence`` 0 only the signer of the latest version may amend, and not while anyone holds
        a live claim for amendment; with a fence, ``p`` must hold that live claim for amendment."""
        exam = self._queue.reader_exam(tx.exams, p, exam_id=exam_id)
        latest = tx.reports.latest(exam_id)
        if exam.state != ExamState.REPORTED or latest is None or not latest.signed:
            raise Conflict("only a signed report can be amended", reason="NOT_SIGNED")
        if fence:
            self._queue.held(tx.exams, p, exam_id=exam_id, fence=fence, states=AMENDING)
        elif latest.signed_by != p.id:
            raise PermissionDenied(
                "only the signer may amend without a claim; claim the exam for amendment",
                reason="AMENDMENT_NEEDS_CLAIM",
            )
        elif live_claim(exam, self._queue.clock.now()):
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
        ecg: EcgContent = NO_ECG,
    ) -> ReportRecord:
        """A new final version of a signed report, with its reason, published to the site.

        ``fence`` is that of ``p``'s claim for amendment; 0 (no claim) is for the signer only."""
        _check_text(text, impression)
        if not reason.strip():
            raise InvalidInput("an amendment needs a reason", reason="NO_REASON")
        if fence < 0:
            raise InvalidInput("a fence cannot be negative", reason="BAD_FENCE")
        columns = self._ecg(ecg, signed=True)
        with self._uow() as tx:
            exam, latest = self._check_amender(tx, p, exam_id=exam_id, fence=fence)
            now = self._queue.clock.now()
            version = latest.version + 1
            digest = content_hash(
                exam_id=exam_id,
                version=version,
                text=text,
                impression=impression,
                critical=critical,
                signer=p.name,
                statements_json=columns["statements_json"] or "",
                measurements_json=columns["measurements_json"] or "",
            )
            report = tx.reports.add(
                exam,
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
                    **columns,
                },
                actor_id=p.id,
                record=False,  # the exam's "amended" below is the record
            )
            seq = tx.results.publish(
                exam, report_id=report.id, critical=critical, now=now, unacknowledged=self._queue.escalation
            )
            tx.exams.drop(  # the claim for amendment, if any, ends with the amendment
                exam_id,
                ExamState.REPORTED,
                event="amended",
                actor_id=p.id,
                now=now,
                detail={"version": version, "fence": int(fence)},
                also=[("critical_result" if critical else "reported", {"cursor": seq})],
            )
        self._bus.publish()
        log.info("report amended", extra={"exam_id": exam_id})
        self._signed(report)
        return report
