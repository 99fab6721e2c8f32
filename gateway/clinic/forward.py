"""Store-and-forward: drain the gateway's outbox to the hub through the spine's resumable upload.

``Forwarder.drain_once`` takes the most urgent ready exam, uploads it with
:func:`teleread.gateway.uploader.client.upload_exams` (which resumes each object from the hub's confirmed
offset), and records the outcome: committed; rejected for good (the hub refused the content: a
person must look); or failed for now. A failure of the link (or of a hub that does not answer) is
the link's, not the exam's: the exam is ready again at once and the forwarder pauses with a capped,
jittered backoff (the outbox's schedule, :class:`teleread.backoff.Backoff`, on the forwarder's own
clock) before it tries again, so when the link returns the outbox drains in priority order (stat
first). A failure the hub reported for this exam backs off that exam alone (the outbox counts it).
The client key of an exam is its outbox id, so an upload cut by a gateway restart re-opens the same
hub exam and resumes where the hub stopped confirming. Of the patient the gateway knows only what its
settings say (the patient class of the clinic or department it serves): it goes with every exam's
request, and the hub reads the rest from the files.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from teleread.backoff import Backoff
from teleread.gateway.clinic.outbox import Outbox, OutboxExam, Refused
from teleread.gateway.uploader.schedule import TokenBucket, Window, in_windows
from teleread.gateway.uploader.scan import ScanExam, ScanObject
from teleread.vocab import ExamKind, ObjectRole
from teleread.gateway.uploader.client import CHUNK_SIZE, upload_exams
from teleread.client import RetryPolicy
from teleread.patient import PatientContext

log = logging.getLogger("teleread.gateway.clinic.forward")

# Messages of 64 KiB: the hub confirms offsets message by message, so a stream cut mid-way keeps more
# of what crossed, and a stream bounded to IN_FLIGHT_BYTES keeps four messages under way instead of
# waiting a round trip after each (256 KiB messages, one in flight: 7.8 of 10 Mbit/s on the emulated
# rural link).
MESSAGE_BYTES = CHUNK_SIZE // 16
# What a stream may send beyond the hub's confirmed offset. Without a bound, gRPC pulls messages into
# its flow-control windows and socket buffers well ahead of the hub, and a cut that ends the streams
# makes the gateway send all of that again (bench/gateway_link.py measured up to 1.76 MiB per cut
# with 4 streams); one message per stream keeps a cut's re-send within one 1 MiB chunk.
IN_FLIGHT_BYTES = 256 * 1024
# the hub refused the content itself: retrying the same bytes cannot help
PERMANENT = ("INVALID_ARGUMENT", "ALREADY_EXISTS")
# the link or the hub did not answer (anything else came from a hub that is up)
LINK_DOWN = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")
# inside one attempt: a few quick retries; longer outages are the outbox's backoff
ATTEMPT_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0, max_total_seconds=30.0)


class SpreadStub:
    """An Ingest stub over several channels (TCP connections): each upload thread keeps the channel
    it first got. On a long, lossy link one TCP connection is held far below the link rate by its
    congestion control; several connections share the loss and fill the link."""

    def __init__(self, stubs: list[Any]) -> None:
        self._stubs = stubs
        self._local = threading.local()
        self._next = itertools.count()

    def __getattr__(self, name: str) -> Any:
        local = self._local
        if not hasattr(local, "stub"):
            local.stub = self._stubs[next(self._next) % len(self._stubs)]
        return getattr(local.stub, name)


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
        limiter: TokenBucket | None = None,
        compression: str = "off",
        routine_windows: list[Window] | None = None,
        message_bytes: int = MESSAGE_BYTES,
        in_flight_bytes: int = IN_FLIGHT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        patient_class: str = "",
    ) -> None:
        """``clock`` (monotonic seconds) and ``rng`` drive the pause after the link went down;
        ``patient_class`` goes with every exam (outpatient, inpatient, emergency, or '': not said)."""
        self.message_bytes = message_bytes
        self.in_flight_bytes = in_flight_bytes
        self.outbox = outbox
        self.limiter = limiter
        self.compression = compression
        self.routine_windows = routine_windows or []
        self.ingest = ingest
        self.parallel = parallel
        self.retry = retry
        self.sleep = sleep
        self.clock = clock
        self._link_backoff = Backoff(outbox.backoff.policy, rng=rng, clock=clock)
        self._link_wait_until = 0.0
        self.patient = PatientContext.of(patient_class=patient_class) or None

    def _scan_exam(self, exam: OutboxExam) -> ScanExam:
        objects = [ScanObject(o.path, o.size, o.sha256, ObjectRole(o.role)) for o in self.outbox.objects_of(exam.id)]
        kind = ExamKind.ECG if exam.kind == "ecg" else ExamKind.IMAGING
        study = exam.group_key if kind is ExamKind.IMAGING else ""
        earlier = self.outbox.follow_up_of(exam.id)  # a late instance of a study sent: linked at the hub
        follow_up_of = self.outbox.exam(earlier).hub_exam_id if earlier else ""
        return ScanExam(
            client_exam_key=exam.id, kind=kind, modality="", study_instance_uid=study, objects=objects,
            follow_up_of=follow_up_of,
        )  # fmt: skip

    def link_wait(self) -> float:
        """Seconds until the next attempt after the link went down (0 when it is up)."""
        return max(0.0, self._link_wait_until - self.clock())

    def _link_down(self, exam: OutboxExam, detail: str) -> DrainResult:
        self.outbox.link(False)
        self.outbox.release(exam.id, detail)
        delay = self._link_backoff.next_delay()
        if delay is None:  # a schedule with a budget: keep waiting its longest delay
            delay = self._link_backoff.policy.max_backoff
        self._link_wait_until = self.clock() + delay
        log.warning("hub not reachable", extra={"exam_id": exam.id, "delay_s": round(delay, 1)})
        return DrainResult(exam.id, "retry", detail, delay)

    def drain_once(self) -> DrainResult | None:
        """Upload one ready exam; None when nothing is due (or the link is in its backoff)."""
        if self.link_wait() > 0:
            return None
        exam = self.outbox.claim_next(routine=in_windows(self.routine_windows))
        if exam is None:
            return None
        try:
            return self._forward(exam)
        except BaseException:  # e.g. the disk filled while recording the outcome: try again later
            with contextlib.suppress(Exception):
                self.outbox.release(exam.id, "interrupted")
            raise

    def _forward(self, exam: OutboxExam) -> DrainResult:
        try:
            (outcome,) = upload_exams(
                self.ingest,
                [self._scan_exam(exam)],
                priority=exam.priority,
                indication=exam.indication,
                retry=self.retry,
                sleep=self.sleep,
                parallel=self.parallel,
                limiter=self.limiter,
                compression=self.compression,
                chunk_size=self.message_bytes,
                in_flight=self.in_flight_bytes,
                patient=self.patient,
            )
        except Exception as exc:  # anything unexpected: keep the exam, retry later, say what kind
            delay = self.outbox.failed(exam.id, type(exc).__name__)
            log.warning("upload attempt failed", extra={"exam_id": exam.id, "reason": type(exc).__name__})
            return DrainResult(exam.id, "retry", type(exc).__name__, delay)
        detail = "; ".join(outcome.errors)[:300]
        if outcome.codes and all(code in LINK_DOWN for code in outcome.codes):
            return self._link_down(exam, detail)
        self.outbox.link(True)
        self._link_backoff.reset()
        if outcome.ok and outcome.exam_id:
            refused = [Refused(r.sha256, r.reason, r.message) for r in outcome.all_refused()]
            self.outbox.committed(exam.id, outcome.exam_id, refused=refused)
            if refused:  # the valid instances went on; each refused one waits in set-aside/ for a person
                log.error(
                    "exam forwarded incomplete: the hub refused some instances",
                    extra={"exam_id": exam.id, "hub_exam_id": outcome.exam_id, "count": len(refused)},
                )
            else:
                log.info("exam forwarded", extra={"exam_id": exam.id, "hub_exam_id": outcome.exam_id})
            return DrainResult(exam.id, "committed", outcome.exam_id)
        if any(code in PERMANENT for code in outcome.codes):
            self.outbox.rejected(exam.id, detail)
            log.error("exam refused by the hub", extra={"exam_id": exam.id})
            return DrainResult(exam.id, "rejected", detail)
        delay = self.outbox.failed(exam.id, detail)
        log.warning(
            "upload attempt failed",
            extra={"exam_id": exam.id, "codes": sorted(set(outcome.codes)), "delay_s": round(delay, 1)},
        )
        return DrainResult(exam.id, "retry", detail, delay)

    def drain(self) -> list[DrainResult]:
        """Upload every exam that is due now."""
        done = []
        while (result := self.drain_once()) is not None:
            done.append(result)
        return done
