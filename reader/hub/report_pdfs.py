"""The printed report of every signed version, made once at the hub and kept in the object store.

After a report is signed or amended (the transaction committed), :meth:`ReportPdfService.submit`
queues that version's rendering on a one-thread executor, 50 ms later (``delay_seconds``), so the
signature never waits for it, is not slowed by it and never fails because of it; the layout itself
(15-25 ms of pure-Python CPU) runs in one of the hub's worker processes (``teleread/cpu.py``), so it
takes no GIL time from the gRPC threads. A rendering loads the version, its exam (the patient
columns, the site, the times) and the names of its reader and signer, lays it out
(``reader/hub/report_pdf.py``; an ECG exam's stored objects, WFDB header and signal else the first
DICOM waveform as the viewer chooses them, are copied out hash-verified and decoded in the worker
for the tracing page, its triage measurements printed beside it), stores the bytes under
``t<site>/reports/<exam>/v<version>.pdf`` (``report_pdf_key``) and records their SHA-256 and size
on the version's row. The same version always renders to the same bytes.

Nothing is lost when the hub stops between the commit and the rendering: a fetch of a version
whose PDF is not recorded, or whose stored bytes are missing or do not verify, renders it there and
then (:meth:`open_for_site`, :meth:`open_for_reader`), and the hub's clean-up pass renders any
signed version still without one (:meth:`render_missing`). Without a usable font the rendering
raises ``ReportFontMissing`` (``FAILED_PRECONDITION`` / ``REPORT_FONT_MISSING``): the background
rendering logs it and the fetch answers it. :meth:`flush` waits for the queued renderings (tests,
shutdown). Logs carry the exam id and a reason, never the patient or the report's text.

Who may fetch: a site its own exams' signed versions (another site's exam looks missing, as
``GetResult`` answers), a reader the exams they may open (``claims.readable``, as
``GetExamDetails``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from zoneinfo import ZoneInfo

from teleread.auth import Principal, require_reader, require_result_reader
from teleread.errors import Conflict, IntegrityError, InvalidInput, NotFound, ObjectNotFound
from teleread.files import sha256_hex
from teleread.patient import PatientContext, age_on
from teleread.reader.hub.claims import ExamRecord, readable
from teleread.reader.hub.directory import Directory
from teleread.cpu import CpuPool
from teleread.reader.hub.report_font import ReportFontMissing, load_report_font
from teleread.reader.hub.report_ecg import EcgFiles, NoTracing
from teleread.reader.hub.report_pdf import PrintedReport, render_report
from teleread.reader.hub.waveform import chosen_objects
from teleread.reader.hub.repository import ReportRecord, Tx, UnitOfWork
from teleread.storage import ObjectStore, report_pdf_key
from teleread.triage_result import EcgSummary
from teleread.vocab import ExamKind

log = logging.getLogger("teleread.report_pdfs")
REPAIR_BATCH = 100  # signed versions without a PDF rendered per clean-up pass


@dataclass(frozen=True)
class StoredPdf:
    """A version's printed report in the object store."""

    exam_id: str
    version: int
    key: str
    sha256: str
    size: int


class ReportPdfService:
    def __init__(
        self,
        *,
        uow: UnitOfWork,
        store: ObjectStore,
        directory: Directory,
        spool_dir: Path,
        font: Path | None = None,
        zone: ZoneInfo | None = None,
        cpu: CpuPool | None = None,
        delay_seconds: float = 0.05,
        ecg_objects: Callable[[str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self._uow = uow
        self._store = store
        self._names = directory
        self._spool = Path(spool_dir)
        self._font = font
        self._zone = zone or ZoneInfo("Asia/Shanghai")
        # Laying a PDF out is pure Python on the CPU: in a worker process it takes no GIL time from
        # the gRPC threads (the signing call's answer leaves at once); None: in this thread.
        self._cpu = cpu or CpuPool(0)
        # A rendering after a signature starts this long after it, so the signing call's answer
        # (built and sent by the same process) is not slowed by the rendering's own work.
        self._delay = delay_seconds
        # An exam's stored object rows (QueueService.stored_objects): an ECG's tracing is drawn from
        # them; None: no tracing (unit tests of the rest).
        self._ecg_objects = ecg_objects
        self._closing = threading.Event()
        self._executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="report-pdf")
        self._lock = threading.Lock()
        self._pending: set[futures.Future[None]] = set()

    # ---- in the background, after a signature ------------------------------------------------------
    def submit(self, exam_id: str, version: int) -> None:
        """Render the version's PDF soon, on the service's thread (after the signature committed)."""
        self._queue(lambda: self._render_quietly(exam_id, version, after=self._delay))

    def warm(self) -> None:
        """Load the font in the background now (the first rendering is then as fast as the others);
        a missing one is logged at WARNING with the setting and the package to install."""
        self._queue(self._check_font)

    def _queue(self, work: Callable[[], None]) -> None:
        try:
            future = self._executor.submit(work)
        except RuntimeError:  # closing: the clean-up pass or the first fetch renders it
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait for every rendering queued so far; False if ``timeout`` passed first."""
        with self._lock:
            pending = set(self._pending)
        _, not_done = futures.wait(pending, timeout=timeout)
        return not not_done

    def close(self) -> None:
        """Finish the rendering under way; the queued ones are left to the clean-up pass."""
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _check_font(self) -> None:
        try:
            self._cpu.run(load_report_font, self._font)
        except ReportFontMissing as exc:
            log.warning("printed reports cannot be rendered: %s", exc.message, extra={"reason": exc.reason})

    def _render_quietly(self, exam_id: str, version: int, *, after: float) -> None:
        if self._closing.wait(after):
            return  # closing: the clean-up pass or the first fetch renders it
        try:
            self.render(exam_id, version)
        except ReportFontMissing as exc:  # the fetch answers it; the clean-up pass tries again
            log.warning("printed report not rendered", extra={"exam_id": exam_id, "reason": exc.reason})
        except Exception as exc:  # the type only: a library's message can quote the report
            log.error("printed report not rendered", extra={"exam_id": exam_id, "reason": type(exc).__name__})

    # ---- rendering -----------------------------------------------------------------------------
    def render(self, exam_id: str, version: int) -> StoredPdf:
        """Render a signed version's PDF, store it and record it on the version's row."""
        with self._uow.read() as tx:
            exam = tx.exams.get(exam_id)
            report = _signed_version(tx, exam_id, version) if exam is not None else None
        if exam is None or report is None:
            raise NotFound("no signed report of that version", reason="REPORT_NOT_FOUND")
        printed = self._printed(exam, report)
        self._spool.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="report-ecg-", dir=self._spool) as tmp:
            data = self._cpu.run(
                render_report, printed, ecg=self._ecg_files(exam, Path(tmp)),
                measurements=_reader_values(report) or _ecg_values(exam.row),
                statements=_confirmed_statements(report), font=self._font, zone=self._zone,
            )  # fmt: skip
        stored = StoredPdf(
            exam_id=exam_id,
            version=report.version,
            key=report_pdf_key(tenant_id=exam.site_id, exam_id=exam_id, version=report.version),
            sha256=sha256_hex(data),
            size=len(data),
        )
        self._put(stored, data)
        with self._uow() as tx:
            tx.reports.set_pdf(report.id, sha256=stored.sha256, size=stored.size)
        log.info("printed report rendered", extra={"exam_id": exam_id, "bytes": stored.size})
        return stored

    def _ecg_files(self, exam: ExamRecord, folder: Path) -> EcgFiles | NoTracing | None:
        """An ECG exam's objects to draw, copied hash-verified into ``folder``; why not, when they
        cannot be; None for an exam of another kind."""
        if self._ecg_objects is None or exam.row.get("kind") != ExamKind.ECG:
            return None
        try:
            rows, source = chosen_objects(self._ecg_objects(exam.id))
            paths = []
            for n, row in enumerate(rows):
                paths.append(folder / f"{n}.{row['role']}")
                with self._store.open_verified(row["storage_key"], sha256=row["sha256"], size=int(row["size"])) as src:
                    with paths[-1].open("wb") as out:
                        while block := src.read(1024 * 1024):
                            out.write(block)
        except (Conflict, ObjectNotFound, IntegrityError) as exc:
            log.warning("ECG tracing not drawn", extra={"exam_id": exam.id, "reason": exc.reason})
            return NoTracing(exc.reason)
        return EcgFiles(tuple(paths), source)

    def _put(self, stored: StoredPdf, data: bytes) -> None:
        self._spool.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="report-", suffix=".pdf.part", dir=self._spool)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._store.put_file(stored.key, Path(name), sha256=stored.sha256, size=stored.size, consume=True)
        finally:
            Path(name).unlink(missing_ok=True)

    def _printed(self, exam: ExamRecord, report: ReportRecord) -> PrintedReport:
        row = exam.row
        names = self._names.principal_names((report.author_id, report.signed_by or 0))
        patient = PatientContext.from_row(row)
        arrived = _utc(row.get("received_at")) or _utc(row.get("created_at"))
        return PrintedReport(
            exam_id=exam.id,
            site_code=self._names.site_code(exam.site_id),
            site_name=self._names.site_name(exam.site_id),
            version=report.version,
            status="amended" if report.amends_reason else str(report.status),
            text=report.text,
            impression=report.impression,
            critical=report.critical,
            sha256=report.sha256,
            reader=names.get(report.author_id, ""),
            signer=names.get(report.signed_by or 0, ""),
            signed_at=report.signed_at,
            amends_reason=report.amends_reason,
            exam_time=_utc(row.get("received_at")),
            kind=str(row.get("kind") or ""),
            modality=str(row.get("modality") or ""),
            priority=str(row.get("priority") or ""),
            specialty=str(row.get("specialty") or ""),
            indication=str(row.get("indication") or ""),
            study_instance_uid=str(row.get("study_instance_uid") or ""),
            triage_level=str(row.get("level") or ""),
            patient=patient,
            patient_age=age_on(patient, arrived.date() if arrived is not None else None),
        )

    def render_missing(self, *, limit: int = REPAIR_BATCH) -> int:
        """Render signed versions that have no PDF recorded (the hub stopped before rendering, or
        the font was missing then); how many were rendered. Stops at the first missing font."""
        with self._uow.read() as tx:
            missing = tx.reports.without_pdf(limit=limit)
        rendered = 0
        for report in missing:
            try:
                self.render(report.exam_id, report.version)
            except ReportFontMissing as exc:
                log.warning("printed reports not rendered", extra={"reason": exc.reason, "count": len(missing)})
                break
            except NotFound:
                continue
            rendered += 1
        return rendered

    # ---- fetching ------------------------------------------------------------------------------
    @contextmanager
    def open_for_site(self, p: Principal, *, exam_id: str, version: int) -> Iterator[tuple[StoredPdf, BinaryIO]]:
        """The PDF of a signed version of one of the caller's site's exams (version 0: the latest)."""
        site_id = require_result_reader(p)
        with self._uow.read() as tx:
            exam = tx.exams.get(exam_id)
            if exam is None or exam.site_id != site_id:
                raise NotFound("no result for that exam at this site", reason="RESULT_NOT_FOUND")
            report = _requested(tx, exam_id, version)
        with self._open(exam, report) as opened:
            yield opened

    @contextmanager
    def open_for_reader(self, p: Principal, *, exam_id: str, version: int) -> Iterator[tuple[StoredPdf, BinaryIO]]:
        """The PDF of a signed version of an exam the reader may open (version 0: the latest)."""
        hospital, specialty = require_reader(p)
        with self._uow.read() as tx:
            exam = readable(tx.exams.get(exam_id), hospital=hospital, specialty=specialty)
            report = _requested(tx, exam_id, version)
        with self._open(exam, report) as opened:
            yield opened

    @contextmanager
    def _open(self, exam: ExamRecord, report: ReportRecord) -> Iterator[tuple[StoredPdf, BinaryIO]]:
        """The stored PDF, rendered first when it is not recorded, or its bytes are gone or altered."""
        exam_id = exam.id
        with ExitStack() as stack:
            stored = _recorded(exam, report)
            try:
                if stored is None:
                    stored = self.render(exam_id, report.version)
                fh = stack.enter_context(self._store.open_verified(stored.key, sha256=stored.sha256, size=stored.size))
            except (ObjectNotFound, IntegrityError) as exc:
                log.warning("printed report rendered again", extra={"exam_id": exam_id, "reason": exc.reason})
                stored = self.render(exam_id, report.version)
                fh = stack.enter_context(self._store.open_verified(stored.key, sha256=stored.sha256, size=stored.size))
            yield stored, fh


def _utc(value: object) -> datetime | None:
    """A row's time as an aware UTC time (SQLite hands them back naive)."""
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ecg_values(row: Mapping[str, Any]) -> dict[str, float] | None:
    """The hub's measurements of an ECG (the triage result's ``ecg``), None when there are none."""
    raw = row.get("triage_json")
    if not raw:
        return None
    try:
        summary = json.loads(str(raw)).get("ecg")
        return dict(EcgSummary.from_dict(summary).values) if summary else None
    except (ValueError, TypeError, AttributeError):
        return None


def _reader_values(report: ReportRecord) -> dict[str, float] | None:
    """The measurements the reader signed with this version (``measurements_json``), if any: they,
    not the hub's, are what the report says."""
    if not report.measurements_json:
        return None
    try:
        values = json.loads(report.measurements_json).get("values") or {}
        return {str(k): float(v) for k, v in values.items()} or None
    except (ValueError, TypeError, AttributeError):
        return None


def _confirmed_statements(report: ReportRecord) -> list[tuple[str, str]] | None:
    """The version's confirmed statements as (code, text) for the printed list: Chinese first, as
    the report pane writes them, with the English beside it."""
    if not report.statements_json:
        return None
    try:
        raw = json.loads(report.statements_json)
    except ValueError:
        return None
    shown = [
        (str(s.get("code", "")), f"{s['text_zh']}（{s['text']}）" if s.get("text_zh") else str(s.get("text", "")))
        for s in raw
        if isinstance(s, dict) and s.get("confirmed", True)
    ]
    return shown or None


def _recorded(exam: ExamRecord, report: ReportRecord) -> StoredPdf | None:
    """The version's PDF as its row records it; None before it is rendered."""
    if not report.pdf_sha256:
        return None
    key = report_pdf_key(tenant_id=exam.site_id, exam_id=exam.id, version=report.version)
    return StoredPdf(exam_id=exam.id, version=report.version, key=key, sha256=report.pdf_sha256, size=report.pdf_size)


def _signed_version(tx: Tx, exam_id: str, version: int) -> ReportRecord | None:
    """The signed version ``version`` of the exam's report (0: the latest signed one), or None."""
    signed = [r for r in tx.reports.versions(exam_id) if r.signed]
    if version == 0:
        return signed[-1] if signed else None
    return next((r for r in signed if r.version == version), None)


def _requested(tx: Tx, exam_id: str, version: int) -> ReportRecord:
    if version < 0:
        raise InvalidInput("a report version cannot be negative", reason="BAD_VERSION")
    report = _signed_version(tx, exam_id, version)
    if report is None:
        raise NotFound("no signed report of that version", reason="REPORT_NOT_FOUND")
    return report
