"""Store-and-forward: drain the gateway's outbox to the hub through the spine's resumable upload.

``Forwarder.drain_once`` takes the most urgent ready exam, uploads it with
:func:`teleread.gateway.upload.upload_exams` (which resumes each object from the hub's confirmed
offset), and records the outcome: committed; rejected for good (the hub refused the content: a
person must look); or failed for now (link or hub down), retried after a capped, jittered backoff.
The client key of an exam is its outbox id, so an upload cut by a gateway restart re-opens the same
hub exam and resumes where the hub stopped confirming.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from teleread.gateway.outbox import Outbox, OutboxExam
from teleread.gateway.scan import ExamKind, Role, ScanExam, ScanObject
from teleread.gateway.upload import upload_exams
from teleread.client import RetryPolicy

log = logging.getLogger("teleread.gateway.forward")

# the hub refused the content itself: retrying the same bytes cannot help
PERMANENT = ("INVALID_ARGUMENT", "ALREADY_EXISTS")
# the link or the hub did not answer (anything else came from a hub that is up)
LINK_DOWN = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")
# inside one attempt: a few quick retries; longer outages are the outbox's backoff
ATTEMPT_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0, max_total_seconds=30.0)


@dataclass
class DrainResult:
    exam_id: str
    outcome: str  # "committed" | "rejected" | "retry"
    detail: str = ""
    delay_s: float = 0.0


class Forwarder:
    def __init__(
        self,
        outbox: Outbox,
        ingest: Any,
        *,
        parallel: int = 4,
        retry: RetryPolicy = ATTEMPT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.outbox = outbox
        self.ingest = ingest
        self.parallel = parallel
        self.retry = retry
        self.sleep = sleep

    def _scan_exam(self, exam: OutboxExam) -> ScanExam:
        objects = [ScanObject(o.path, o.size, o.sha256, Role(o.role)) for o in self.outbox.objects_of(exam.id)]
        kind = ExamKind.ECG if exam.kind == "ecg" else ExamKind.IMAGING
        study = exam.group_key if kind is ExamKind.IMAGING else ""
        return ScanExam(client_exam_key=exam.id, kind=kind, modality="", study_instance_uid=study, objects=objects)

    def drain_once(self) -> DrainResult | None:
        """Upload one ready exam; None when nothing is due."""
        exam = self.outbox.claim_next()
        if exam is None:
            return None
        try:
            (outcome,) = upload_exams(
                self.ingest,
                [self._scan_exam(exam)],
                priority=exam.priority,
                indication=exam.indication,
                retry=self.retry,
                sleep=self.sleep,
                parallel=self.parallel,
            )
        except Exception as exc:  # anything unexpected: keep the exam, retry later, say what kind
            self.outbox.link(False)
            delay = self.outbox.failed(exam.id, type(exc).__name__)
            log.warning("upload attempt failed", extra={"exam_id": exam.id, "reason": type(exc).__name__})
            return DrainResult(exam.id, "retry", type(exc).__name__, delay)
        self.outbox.link(not outcome.codes or not all(code in LINK_DOWN for code in outcome.codes))
        if outcome.ok and outcome.exam_id:
            self.outbox.committed(exam.id, outcome.exam_id)
            log.info("exam forwarded", extra={"exam_id": exam.id, "hub_exam_id": outcome.exam_id})
            return DrainResult(exam.id, "committed", outcome.exam_id)
        detail = "; ".join(outcome.errors)[:300]
        if any(code in PERMANENT for code in outcome.codes):
            self.outbox.rejected(exam.id, detail)
            log.error("exam refused by the hub", extra={"exam_id": exam.id})
            return DrainResult(exam.id, "rejected", detail)
        delay = self.outbox.failed(exam.id, detail)
        log.warning("upload attempt failed", extra={"exam_id": exam.id, "delay_s": round(delay, 1)})
        return DrainResult(exam.id, "retry", detail, delay)

    def drain(self) -> list[DrainResult]:
        """Upload every exam that is due now."""
        done = []
        while (result := self.drain_once()) is not None:
            done.append(result)
        return done
