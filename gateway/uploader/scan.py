"""Clinic-side scanning: find exams in files and folders.

Owns: DICOM files found by the "DICM" magic (never by extension) and grouped by StudyInstanceUID
into exams (split by kind when a study holds both ECG waveforms and images); WFDB records as a
.hea plus the signal file it names, one exam each; streaming SHA-256; and the list of skipped
files with the reason. Files are read in chunks, never whole.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pydicom

from teleread.files import hash_file, sha256_hex
from teleread.vocab import ExamKind, ObjectRole, is_ecg

MAX_WFDB_HEADER_BYTES = 1024 * 1024
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
_DICOM_TAGS = ["StudyInstanceUID", "Modality", "SOPClassUID"]


@dataclass(frozen=True)
class ScanObject:
    """One file to upload as one object of an exam."""

    path: Path
    size: int
    sha256: str
    role: ObjectRole

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ScanExam:
    """Files that make one exam: a DICOM study of one kind, or one WFDB record."""

    client_exam_key: str
    kind: ExamKind
    modality: str
    study_instance_uid: str = ""
    objects: list[ScanObject] = field(default_factory=list)
    follow_up_of: str = ""  # the hub exam id of the earlier exam of the same study, when known

    @property
    def total_bytes(self) -> int:
        return sum(obj.size for obj in self.objects)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class ScanResult:
    exams: list[ScanExam] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(exam.total_bytes for exam in self.exams)


class _Skip(Exception):
    """A file cannot be part of an exam; the message is our own reason."""


def file_sha256(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read 1 MiB at a time."""
    return hash_file(path).sha256


def _scan_object(path: Path, role: ObjectRole) -> ScanObject:
    try:
        return ScanObject(path, path.stat().st_size, file_sha256(path), role)
    except OSError as err:
        raise _Skip(f"cannot read file ({type(err).__name__})") from None


def _collect_files(paths: Sequence[Path], skipped: list[SkippedFile]) -> list[Path]:
    seen: set[Path] = set()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [Path(d) / n for d, _, names in os.walk(path) for n in names]
        elif path.is_file():
            found = [path]
        else:
            skipped.append(SkippedFile(path, "no such file or folder"))
            continue
        for file in sorted(found):
            if file.is_file() and file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    return files


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as stream:
        head = stream.read(132)
    return head[128:132] == b"DICM"


def _dicom_exam_fields(path: Path) -> tuple[str, ExamKind, str]:
    """(StudyInstanceUID, kind, modality) from the header; the pixel data is never read."""
    try:
        with warnings.catch_warnings():  # pydicom's warnings can quote element values
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except Exception as err:  # pydicom raises many types; its text can quote the data
        raise _Skip(f"unreadable DICOM header ({type(err).__name__})") from None
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if sop_class == MEDIA_DIRECTORY_SOP_CLASS:
        raise _Skip("DICOMDIR media directory, not an instance")
    study_uid = str(ds.get("StudyInstanceUID") or "").strip()
    if not study_uid:
        raise _Skip("DICOM file has no StudyInstanceUID")
    modality = str(ds.get("Modality") or "").strip().upper()
    ecg = is_ecg(sop_class_uid=sop_class, modality=modality)
    return study_uid, ExamKind.ECG if ecg else ExamKind.IMAGING, modality


def _dicom_exams(files: list[Path], skipped: list[SkippedFile]) -> list[ScanExam]:
    groups: dict[tuple[str, ExamKind], list[tuple[ScanObject, str]]] = {}
    for path in files:
        try:
            study_uid, kind, modality = _dicom_exam_fields(path)
            obj = _scan_object(path, ObjectRole.DICOM)
        except _Skip as skip:
            skipped.append(SkippedFile(path, str(skip)))
            continue
        groups.setdefault((study_uid, kind), []).append((obj, modality))
    kinds_per_study = Counter(study_uid for study_uid, _ in groups)
    exams = []
    for (study_uid, kind), members in groups.items():
        mixed = kinds_per_study[study_uid] > 1
        common = Counter(m for _, m in members if m).most_common(1)
        exam = ScanExam(
            client_exam_key=f"{study_uid}:{kind.value}" if mixed else study_uid,  # the hub allows [A-Za-z0-9._:-]
            kind=kind,
            modality=common[0][0] if common else "",
            study_instance_uid=study_uid,
        )
        _add_unique(exam, [obj for obj, _ in members], skipped)
        exams.append(exam)
    return exams


def _add_unique(exam: ScanExam, objects: list[ScanObject], skipped: list[SkippedFile]) -> None:
    """Add objects, skipping byte-identical copies (the hub would store them once)."""
    by_hash: dict[str, ScanObject] = {}
    for obj in objects:
        if obj.sha256 in by_hash:
            skipped.append(SkippedFile(obj.path, f"identical to {by_hash[obj.sha256].name}"))
            continue
        by_hash[obj.sha256] = obj
        exam.objects.append(obj)


def wfdb_signal_files(header: Path) -> list[str]:
    """The distinct signal file names a WFDB header's signal lines name, in order."""
    if header.stat().st_size > MAX_WFDB_HEADER_BYTES:
        raise _Skip("too large for a WFDB header")
    text = header.read_bytes().decode("latin-1")
    lines = [ln.split("#", 1)[0].split() for ln in text.splitlines()]
    lines = [tokens for tokens in lines if tokens]
    if not lines or len(lines[0]) < 2 or not lines[0][1].isdigit():
        raise _Skip("not a WFDB header (bad record line)")
    if "/" in lines[0][0]:
        raise _Skip("multi-segment WFDB records are not supported")
    count = int(lines[0][1])
    if count == 0 or len(lines) < 1 + count:
        raise _Skip("WFDB header names no signal files or too few signal lines")
    names = list(dict.fromkeys(tokens[0] for tokens in lines[1 : 1 + count]))
    if any(Path(name).name != name or name in ("-", "..", ".") for name in names):
        raise _Skip("WFDB signal file outside the header's folder")
    return names


def _wfdb_exams(headers: list[Path], skipped: list[SkippedFile]) -> tuple[list[ScanExam], set[Path]]:
    """One exam per readable record, and the signal files claimed by the headers."""
    exams: list[ScanExam] = []
    claimed: set[Path] = set()
    for header in headers:
        try:
            signals = [header.parent / name for name in wfdb_signal_files(header)]
            claimed.update(p.resolve() for p in signals)
            if len(signals) > 1:  # the hub takes exactly one .hea and one signal file
                raise _Skip("WFDB record with more than one signal file is not supported")
            missing = [p.name for p in signals if not p.is_file()]
            if missing:
                raise _Skip(f"WFDB signal file missing: {', '.join(missing)}")
            objects = [_scan_object(header, ObjectRole.WFDB_HEADER)]
            objects += [_scan_object(p, ObjectRole.WFDB_SIGNAL) for p in signals]
        except _Skip as skip:
            skipped.append(SkippedFile(header, str(skip)))
            continue
        except OSError as err:
            skipped.append(SkippedFile(header, f"cannot read file ({type(err).__name__})"))
            continue
        key = sha256_hex("".join(obj.sha256 for obj in objects))
        exam = ScanExam(key, ExamKind.ECG, modality="ECG")
        _add_unique(exam, objects, skipped)
        exams.append(exam)
    return exams, claimed


def scan_paths(paths: Sequence[Path]) -> ScanResult:
    """Walk files and folders into exams; everything else is listed as skipped with a reason."""
    result = ScanResult()
    dicom: list[Path] = []
    headers: list[Path] = []
    others: list[Path] = []
    for path in _collect_files(paths, result.skipped):
        try:
            is_dicom = _is_dicom(path)
        except OSError as err:
            result.skipped.append(SkippedFile(path, f"cannot read file ({type(err).__name__})"))
            continue
        if is_dicom:
            dicom.append(path)
        else:
            (headers if path.suffix.lower() == ".hea" else others).append(path)
    result.exams.extend(_dicom_exams(dicom, result.skipped))
    wfdb_exams, claimed = _wfdb_exams(headers, result.skipped)
    result.exams.extend(wfdb_exams)
    for path in others:
        if path.resolve() not in claimed:
            reason = "not DICOM (no DICM preamble) nor part of a WFDB record"
            result.skipped.append(SkippedFile(path, reason))
    return result
