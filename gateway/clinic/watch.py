"""The clinic gateway's watch folder: an ECG cart (or staff) drops files into a folder, and every
complete exam in it is moved into the durable outbox.

A file is taken only when it is complete twice over: it has kept the same size, mtime and inode for
``settle_seconds`` across scans (so a copy in progress is never taken), and it is structurally
whole. A DICOM file must pass the check every door applies (:func:`check_dicom_instance`: meta, UIDs,
bounded parsing, its structure to the last byte, the pixel data or waveform its class needs); a WFDB
record needs its ``.hea`` and the signal file the header names, with the size the header implies
(:func:`check_wfdb_pair`); a header waits for its signal file (and a lone ``.dat`` for its header) for
``wait_seconds`` after it stopped changing (30 minutes by default), then it is refused
(``WFDB_SIGNAL_MISSING`` / ``WFDB_HEADER_MISSING``) so a person sees it. Hidden and temporary
names (``.x``, ``~x``, ``*.part``, ``*.tmp``...) and the watcher's own ``rejected/`` are never touched.

DICOM files are grouped by StudyInstanceUID exactly as the DICOM receiver groups them and are left
to the outbox's quiet period (study stability): a study copied over several minutes stays one exam.
A WFDB record is a whole exam, so it is marked complete at once; its group key is derived from the
bytes of both files (``wfdb:`` + SHA-256), so two carts' records with the same name never merge and
the same record dropped twice is the same exam. Once the outbox holds a fsync'd copy the source file
is deleted (a crash before the delete only means the next scan offers the same bytes again, which
the outbox acknowledges without a second copy). A refused file is moved to ``rejected/`` (same
relative path; a numbered subfolder when the name is taken) next to ``<name>.reason.txt`` and is
never retried until someone moves it back. When the disk is full the file stays where it is and the
scan says so. Log lines carry reason codes and counts only, never file names or patient data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


from teleread import ecgio
from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.files import sha256_hex
from teleread.gateway.clinic.outbox import PRIORITY_RANK, REASON_SUFFIX, Outbox, OutboxObject
from teleread.gateway.uploader.scan import file_sha256
from teleread.gateway.clinic.scp import instance_kind
from teleread.gateway.validate import check_dicom_instance, check_wfdb_pair, inspect_wfdb_header
from teleread.vocab import ObjectRole

log = logging.getLogger("teleread.gateway.clinic.watch")

REJECTED_DIR = "rejected"
HEADER_SUFFIX = ".hea"
SIGNAL_SUFFIX = ".dat"  # a signal file whose header has not arrived yet waits for it
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})

# reasons a file is still in the folder
SETTLING = "SETTLING"
WFDB_SIGNAL_MISSING = "WFDB_SIGNAL_MISSING"
WFDB_HEADER_MISSING = "WFDB_HEADER_MISSING"
GATEWAY_DISK_FULL = "GATEWAY_DISK_FULL"
CHANGED_WHILE_TAKEN = "CHANGED_WHILE_TAKEN"
CANNOT_READ = "CANNOT_READ"


_Signature = tuple[int, int, int]  # size, mtime_ns, inode


@dataclass(frozen=True)
class TakenFile:
    """A file the outbox now holds (the source has been removed from the folder)."""

    name: str  # path relative to the watch folder
    exam_id: str
    group_key: str
    instance_key: str
    role: str
    kind: str
    sha256: str
    size: int


@dataclass(frozen=True)
class WaitingFile:
    """A file left in place for now; a later scan looks at it again."""

    name: str
    reason: str  # SETTLING, WFDB_SIGNAL_MISSING, WFDB_HEADER_MISSING, GATEWAY_DISK_FULL, ...
    message: str


@dataclass(frozen=True)
class RefusedFile:
    """A file moved to ``rejected/`` with a reason file beside it."""

    name: str
    reason: str
    message: str
    moved_to: str  # relative to the watch folder; "" when the move itself failed


@dataclass
class WatchReport:
    """What one scan did. File names are the clinic's own and may name a patient: show them to the
    technician, never write them to a log."""

    taken: list[TakenFile] = field(default_factory=list)
    waiting: list[WaitingFile] = field(default_factory=list)
    refused: list[RefusedFile] = field(default_factory=list)

    @property
    def disk_full(self) -> bool:
        return any(w.reason == GATEWAY_DISK_FULL for w in self.waiting)

    @property
    def group_keys(self) -> list[str]:
        """The outbox group keys that received files in this scan, in order."""
        return list(dict.fromkeys(t.group_key for t in self.taken))


class WatchFolder:
    """Scan ``folder`` and move every complete exam into ``outbox``; one loop calls ``scan_once``."""

    def __init__(
        self,
        outbox: Outbox,
        folder: Path,
        *,
        settle_seconds: float = 2.0,
        priority: str = "routine",
        wait_seconds: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if priority not in PRIORITY_RANK:
            raise InvalidInput(f"unknown priority {priority!r}", reason="BAD_PRIORITY")
        self.outbox = outbox
        self.folder = Path(folder)
        self.rejected_dir = self.folder / REJECTED_DIR
        self.settle_seconds = settle_seconds
        self.wait_seconds = wait_seconds  # how long one file of a WFDB record waits for the other
        self.priority = priority
        self.clock = clock
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seen: dict[Path, tuple[_Signature, float]] = {}  # relative path -> (signature, since)
        self._disk_full = False  # within one scan: once the disk is full, nothing more is tried

    # ------------------------------------------------------------------ the scan

    def scan_once(self) -> WatchReport:
        report = WatchReport()
        try:
            files, specials = self._list()
        except OSError as exc:  # the folder is gone (an unmounted share): nothing to do this time
            log.warning("watch folder unreadable", extra={"reason": type(exc).__name__})
            return report
        now = self.clock()
        self._seen = {rel: seen for rel, seen in self._seen.items() if rel in files}
        stable = {rel for rel, sig in files.items() if self._settled(rel, sig, now)}
        self._disk_full = False
        for rel in specials:
            self._refuse([rel], "NOT_A_REGULAR_FILE", "links and special files are not taken", report)
        claimed: set[Path] = set()
        for rel in sorted(r for r in files if r.suffix.lower() == HEADER_SUFFIX):
            with self._guard(rel, report):
                self._scan_record(rel, files, stable, claimed, report)
        for rel in sorted(files):
            if rel in claimed or rel.suffix.lower() == HEADER_SUFFIX:
                continue
            with self._guard(rel, report):
                self._scan_file(rel, files, stable, report)
        if report.taken or report.refused or report.disk_full:
            log.info(
                f"watch folder scanned: {len(report.taken)} taken, {len(report.refused)} refused,"
                f" {len(report.waiting)} waiting",
                extra={"event": "watch_scanned", "count": len(report.taken)},
            )
        return report

    @contextlib.contextmanager
    def _guard(self, rel: Path, report: WatchReport) -> Iterator[None]:
        """One odd file must not stop the scan: it waits, and the log says what kind of error."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - bad input or a flaky share; never crash the loop
            log.error("watch folder file not handled", extra={"reason": type(exc).__name__})
            report.waiting.append(WaitingFile(rel.as_posix(), CANNOT_READ, "the file could not be handled"))

    def _list(self) -> tuple[dict[Path, _Signature], list[Path]]:
        """Regular files to consider (relative path -> signature), and links/special files."""
        files: dict[Path, _Signature] = {}
        specials: list[Path] = []
        self.folder.stat()  # os.walk is silent about a folder that is gone: say so
        for top, dirs, names in os.walk(self.folder):
            here = Path(top)
            dirs[:] = sorted(
                d
                for d in dirs
                if not _ignored(d) and not (here == self.folder and d == REJECTED_DIR) and not (here / d).is_symlink()
            )
            for name in names:
                if _ignored(name):
                    continue
                path = here / name
                try:
                    st = path.lstat()
                except FileNotFoundError:  # gone between the listing and now
                    continue
                rel = path.relative_to(self.folder)
                if stat.S_ISREG(st.st_mode):
                    files[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
                else:
                    specials.append(rel)
        return files, specials

    def _waited_too_long(self, rel: Path) -> bool:
        """True when ``rel`` has not changed for ``wait_seconds``: its partner is not coming."""
        seen = self._seen.get(rel)
        return seen is not None and self.clock() - seen[1] >= self.wait_seconds

    def _wait_for_partner(self, rel: Path, reason: str, report: WatchReport, *, late: str, waiting: str) -> None:
        """``rel`` is half of a WFDB record whose other file is missing: it waits (``waiting``), or
        is refused with ``reason`` once it has waited ``wait_seconds`` (``late``: what did not come)."""
        if self._waited_too_long(rel):
            minutes = round(self.wait_seconds / 60)
            self._refuse([rel], reason, f"{late} within {minutes} min", report)
        else:
            report.waiting.append(WaitingFile(rel.as_posix(), reason, waiting))

    def _settled(self, rel: Path, sig: _Signature, now: float) -> bool:
        """True once the file has looked the same for ``settle_seconds``."""
        seen = self._seen.get(rel)
        if seen is None or seen[0] != sig:
            self._seen[rel] = (sig, now)
            return self.settle_seconds <= 0
        return now - seen[1] >= self.settle_seconds

    # ------------------------------------------------------------------ WFDB records

    def _scan_record(
        self, header: Path, files: dict[Path, _Signature], stable: set[Path], claimed: set[Path], report: WatchReport
    ) -> None:
        if header not in stable:
            record_files = self._record_files(header, files)
            claimed.update(record_files)
            self._wait([header, *(p for p in record_files if p in files)], SETTLING, report)
            return
        try:
            info = inspect_wfdb_header(self.folder / header)
        except InvalidInput as exc:
            record_files = self._record_files(header, files)
            claimed.update(record_files)
            self._refuse_record(header, record_files, files, stable, exc, report)
            return
        signal = header.parent / info.signal_file_names[0]
        claimed.add(signal)
        if signal not in files:
            self._wait_for_partner(
                header,
                WFDB_SIGNAL_MISSING,
                report,
                late="the signal file the header names did not arrive",
                waiting="waiting for the signal file the header names",
            )
            return
        if signal not in stable:
            self._wait([header, signal], SETTLING, report)
            return
        try:
            check_wfdb_pair(info, self.folder / signal)
        except InvalidInput as exc:
            short = files[signal][0] < info.expected_signal_bytes
            self._refuse([header, signal], "WFDB_SHORT_SIGNAL" if short else exc.reason, exc.message, report)
            return
        except OSError:
            self._wait([header, signal], CANNOT_READ, report)
            return
        self._take_record(header, signal, files, report)

    def _record_files(self, header: Path, files: dict[Path, _Signature]) -> list[Path]:
        """Files that belong with ``header``: the signal files it names (when it parses) and files of
        the same stem beside it, so a half-copied record's signal is never judged on its own."""
        names: list[str] = []
        try:
            names = [str(n) for n in ecgio.read_wfdb_header(self.folder / header).file_name or []]
        except (InvalidInput, OSError):
            pass
        named = {header.parent / n for n in names if n and Path(n).name == n and n not in (".", "..")}
        same_stem = {p for p in files if p.parent == header.parent and p.stem == header.stem}
        return sorted((named | same_stem) - {header})

    def _refuse_record(
        self,
        header: Path,
        record_files: list[Path],
        files: dict[Path, _Signature],
        stable: set[Path],
        exc: InvalidInput,
        report: WatchReport,
    ) -> None:
        """Refuse a header and those of its files that have stopped changing (the others wait and,
        with no header left beside them, are then judged on their own)."""
        self._refuse([header, *(p for p in record_files if p in stable)], exc.reason, exc.message, report)
        self._wait([p for p in record_files if p in files and p not in stable], SETTLING, report)

    def _take_record(self, header: Path, signal: Path, files: dict[Path, _Signature], report: WatchReport) -> None:
        if self._disk_full:
            self._wait([header, signal], GATEWAY_DISK_FULL, report)
            return
        try:
            header_sha = file_sha256(self.folder / header)
            signal_sha = file_sha256(self.folder / signal)
        except OSError:
            self._wait([header, signal], CANNOT_READ, report)
            return
        # from the bytes of both files: same record, same exam; same name from two carts, two exams
        group_key = "wfdb:" + sha256_hex(f"{header_sha}:{signal_sha}")
        taken: list[tuple[Path, OutboxObject]] = []
        # the signal first: the large file is the one a full disk stops, before the exam has a header
        for rel, role in ((signal, ObjectRole.WFDB_SIGNAL), (header, ObjectRole.WFDB_HEADER)):
            try:
                obj = self._receive(rel, group_key=group_key, instance_key=role.value, role=role.value, kind="ecg")
            except (InvalidInput, Conflict) as exc:
                self._refuse([header, signal], exc.reason, exc.message, report)
                return
            if isinstance(obj, str):
                self._wait([header, signal], obj, report)
                return
            taken.append((rel, obj))
        self.outbox.complete(group_key)  # a WFDB record is a whole exam
        self._remove_taken(taken, files, group_key, "ecg", report)

    # ------------------------------------------------------------------ single files (DICOM)

    def _scan_file(self, rel: Path, files: dict[Path, _Signature], stable: set[Path], report: WatchReport) -> None:
        if rel not in stable:
            self._wait([rel], SETTLING, report)
            return
        path = self.folder / rel
        with path.open("rb") as handle:
            head = handle.read(132)
        if head[128:132] != b"DICM":
            if rel.suffix.lower() == SIGNAL_SUFFIX:
                self._wait_for_partner(
                    rel,
                    WFDB_HEADER_MISSING,
                    report,
                    late="no WFDB header naming this signal file arrived",
                    waiting="waiting for the WFDB header of this signal file",
                )
                return
            message = "neither a DICOM file (no DICM preamble) nor part of a WFDB record"
            self._refuse([rel], "NOT_DICOM", message, report)
            return
        try:
            study, sop, kind = _check_dicom(path)
        except InvalidInput as exc:
            self._refuse([rel], exc.reason, exc.message, report)
            return
        if self._disk_full:
            self._wait([rel], GATEWAY_DISK_FULL, report)
            return
        try:
            obj = self._receive(rel, group_key=study, instance_key=sop, role=ObjectRole.DICOM.value, kind=kind)
        except (InvalidInput, Conflict) as exc:  # e.g. the same SOP Instance UID with other bytes
            self._refuse([rel], exc.reason, exc.message, report)
            return
        if isinstance(obj, str):
            self._wait([rel], obj, report)
            return
        # DICOM studies are left to the outbox's quiet period: more instances of the study may follow
        self._remove_taken([(rel, obj)], files, study, kind, report)

    # ------------------------------------------------------------------ into the outbox, out of the folder

    def _receive(self, rel: Path, *, group_key: str, instance_key: str, role: str, kind: str) -> OutboxObject | str:
        """The durable outbox object, or the reason the file waits; the outbox's refusals
        (InvalidInput, Conflict) are raised."""
        try:
            with (self.folder / rel).open("rb") as source:
                return self.outbox.receive(
                    source,
                    group_key=group_key,
                    instance_key=instance_key,
                    role=role,
                    kind=kind,
                    priority=self.priority,
                )
        except ResourceExhausted as exc:
            if exc.reason == GATEWAY_DISK_FULL:
                self._disk_full = True
                log.error("watch folder file not taken", extra={"reason": exc.reason})
            return exc.reason
        except OSError as exc:
            log.warning("watch folder file not taken", extra={"reason": type(exc).__name__})
            return CANNOT_READ

    def _remove_taken(
        self,
        taken: list[tuple[Path, OutboxObject]],
        before: dict[Path, _Signature],
        group_key: str,
        kind: str,
        report: WatchReport,
    ) -> None:
        for rel, obj in taken:
            path = self.folder / rel
            try:
                if _signature(path) != before.get(rel):
                    # rewritten since it was judged complete: keep it; the outbox holds the earlier copy
                    report.waiting.append(
                        WaitingFile(rel.as_posix(), CHANGED_WHILE_TAKEN, "file changed while it was being taken")
                    )
                    continue
                path.unlink()
            except OSError as exc:
                log.warning("taken file not removed", extra={"reason": type(exc).__name__})
            self._seen.pop(rel, None)
            report.taken.append(
                TakenFile(
                    rel.as_posix(), obj.exam_id, group_key, obj.instance_key, obj.role, kind, obj.sha256, obj.size
                )
            )
            log.info("watch folder file taken", extra={"exam_id": obj.exam_id, "event": "watch_taken"})

    def _wait(self, rels: list[Path], reason: str, report: WatchReport) -> None:
        messages = {
            SETTLING: "still being written, or not yet unchanged for the settle time",
            GATEWAY_DISK_FULL: "the gateway's disk is full; the file stays here and is tried again",
            CANNOT_READ: "the file could not be read; it is tried again",
        }
        for rel in rels:
            report.waiting.append(WaitingFile(rel.as_posix(), reason, messages.get(reason, "tried again later")))

    def _refuse(self, rels: list[Path], reason: str, message: str, report: WatchReport) -> None:
        """Move ``rels`` (one file, or a record's files kept together) to ``rejected/`` with reason files."""
        target_dir = self._free_dir(rels)
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        text = (
            f"{reason}\n{message}\nrefused by the gateway's watch folder at {stamp}\n"
            "Fix the file and move it back into the watch folder to try again.\n"
        )
        for rel in rels:
            self._seen.pop(rel, None)
            moved = ""
            try:
                target_dir.mkdir(parents=True, exist_ok=True)
                target = target_dir / rel.name
                os.replace(self.folder / rel, target)
                moved = target.relative_to(self.folder).as_posix()
                target.with_name(target.name + REASON_SUFFIX).write_text(text, encoding="utf-8")
            except OSError as exc:  # the refusal stands; the report still names it
                log.error("refused file not fully moved", extra={"reason": type(exc).__name__})
            report.refused.append(RefusedFile(rel.as_posix(), reason, message, moved))
        log.warning("watch folder file refused", extra={"reason": reason, "count": len(rels), "event": "watch_refused"})

    def _free_dir(self, rels: list[Path]) -> Path:
        """``rejected/<relative folder>``, or its first numbered subfolder where no name is taken."""
        base = self.rejected_dir / rels[0].parent
        candidate, n = base, 1
        while any((candidate / r.name).exists() or (candidate / (r.name + REASON_SUFFIX)).exists() for r in rels):
            n += 1
            candidate = base / str(n)
        return candidate


# ---------------------------------------------------------------------- helpers


def _ignored(name: str) -> bool:
    lower = name.lower()
    return name.startswith((".", "~")) or lower.endswith(TEMP_SUFFIXES) or lower in IGNORED_NAMES


def _signature(path: Path) -> _Signature:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _check_dicom(path: Path) -> tuple[str, str, str]:
    """(StudyInstanceUID, SOPInstanceUID, kind) of a complete DICOM file, by the check every door
    applies (:func:`check_dicom_instance`); InvalidInput otherwise."""
    info = check_dicom_instance(path)
    return info.study_instance_uid, info.sop_instance_uid, instance_kind(info.sop_class_uid)
