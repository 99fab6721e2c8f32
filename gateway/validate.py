"""Validation of objects arriving at the hub (DICOM instances, WFDB records) before they are stored.

The hub calls these on a fully received file on disk. This module owns the checks that keep hostile
or broken input out of storage (RELIABILITY R26-R29, F12-F18): DICOM UID syntax, required file meta
and identifying UIDs, bounded parsing (huge or truncated lengths, deflate and pixel bombs decided
before any decode; pixel data is never read), executable preambles, and WFDB header bounds and the
header/signal size pairing. Every rejection is an :class:`~teleread.errors.InvalidInput` with a
stable reason and a message that names the problem, never the offending value or a parser's text.

What an accepted file says of its patient (the DICOM patient module and the requesting clinician, a
WFDB header's age and sex comments) comes back with its identity, cleaned by ``teleread.patient``:
a patient value never refuses a file, an invalid one is dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pydicom.uid
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian

from teleread import ecgio
from teleread.dicom_index import BULK_BYTES, DicomIndex, index_of, instance_url, metadata_json
from teleread.pixels import ensure_decoders
from teleread.errors import InvalidInput
from teleread.patient import PatientContext, cleaned, from_wfdb_comments

log = logging.getLogger("teleread.gateway.validate")

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*", re.ASCII)
_WAVEFORM_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.9."
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data
_WAVEFORM_SEQUENCE = 0x54000100
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_EXECUTABLE_MAGIC = ((b"MZ", "pe"), (b"\x7fELF", "elf"))
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SPECIFIC_CHARACTER_SET = 0x00080005
_NATIVE_LITTLE_ENDIAN = (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian)
_DEFER_BYTES = 64 * 1024  # values above this stay on disk until their extent is checked
_IN_MEMORY_BYTES = 4 * 1024**2  # files up to this size are parsed from memory
_MAX_LOADED_VALUE_BYTES = 64 * 1024**2  # larger deferred values are checked, never loaded
_MAX_ELEMENTS = 200_000
_MAX_DEPTH = 32
_INFLATE_CHUNK = 1024**2

# pydicom's validation mode is process-global: parses under RAISE are serialised by this lock.
_STRICT_READING_LOCK = threading.Lock()

MAX_WFDB_SIGNALS = 64
MAX_WFDB_SAMPLES = 2**31
MAX_WFDB_FS = 20_000.0
MAX_WFDB_GAIN = 1e7
# patient context field -> the DICOM attribute it is read from (the patient class has none: an
# Admission ID is issued for outpatient visits too, so only the upload request says it)
PATIENT_ATTRIBUTES = {
    "id": "PatientID",
    "name": "PatientName",
    "sex": "PatientSex",
    "birth_date": "PatientBirthDate",
    "age": "PatientAge",
    "referring_physician": "ReferringPhysicianName",
}


def check_uid(value: str, *, field: str) -> str:
    """``value`` without one trailing NUL/space pad, if it is a valid DICOM UID (PS3.5 9.1)."""
    text = value[:-1] if isinstance(value, str) and value.endswith(("\x00", " ")) else value
    if not isinstance(text, str) or len(text) > 64 or not _UID.fullmatch(text):
        raise InvalidInput(f"{field} is not a valid DICOM UID", reason="BAD_UID")
    return text


# --- DICOM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomInfo:
    """What the hub needs to know about an arriving DICOM instance; pixel data is never read."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    transfer_syntax_uid: str
    is_waveform: bool
    number_of_frames: int
    rows: int | None
    columns: int | None
    pixel_bytes: int
    preamble_flag: str | None = None
    patient: PatientContext = field(default=PatientContext(), repr=False)
    patient_dropped: tuple[str, ...] = ()  # the patient fields whose value was invalid (names only)
    index: DicomIndex = field(default=DicomIndex(), repr=False)  # study and series values for DICOMweb
    metadata: str = field(default="", repr=False)  # its DICOM JSON for WADO-RS ('' if it could not be built)
    pixel_range: tuple[int, int, str] | None = None  # native pixel data: offset, length and SHA-256 in the file


class _ClampedReader(io.BufferedReader):
    """A file reader that never asks the OS for more bytes than remain in the file.

    A declared length of 0xFFFFFFF0 in a 1 KB file would otherwise make ``read`` allocate 4 GiB.
    """

    def __init__(self, raw: io.FileIO, *, size: int) -> None:
        super().__init__(raw)
        self._size = size

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            return super().read()
        return super().read(min(size, max(0, self._size - self.tell())))


@contextmanager
def _strict_reading() -> Iterator[None]:
    """pydicom raises on invalid values inside the block; the previous mode is restored after."""
    with _STRICT_READING_LOCK:
        previous = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
        try:
            yield
        finally:
            pydicom_config.settings.reading_validation_mode = previous


def _unreadable(message: str = "DICOM file could not be parsed") -> InvalidInput:
    return InvalidInput(message, reason="DICOM_UNREADABLE")


def _read_head(path: Path) -> tuple[bytes, int]:
    """The 128-byte preamble and the file size; the DICM magic must follow the preamble."""
    with path.open("rb") as handle:
        head = handle.read(132)
        size = handle.seek(0, io.SEEK_END)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidInput("file is not DICOM Part 10 (no preamble and DICM prefix)", reason="DICOM_NO_META")
    return head[:128], size


def _preamble_flag(preamble: bytes) -> str | None:
    return next((flag for magic, flag in _EXECUTABLE_MAGIC if preamble.startswith(magic)), None)


def inspect_dicom(
    path: Path, *, max_pixel_bytes: int = 4 * 1024**3, max_inflated_bytes: int = 128 * 1024**2,
    metadata: bool = False,
) -> DicomInfo:  # fmt: skip
    """Check an arriving DICOM file and return its identity; raises InvalidInput when unfit.
    ``metadata``: also build its DICOM JSON (the hub keeps it for WADO-RS)."""
    preamble, file_size = _read_head(path)
    with _strict_reading():
        try:
            top_level, info = _parse_dicom(
                path, file_size=file_size, max_inflated_bytes=max_inflated_bytes, metadata=metadata
            )
        except InvalidInput:
            raise
        except Exception as exc:  # untrusted input: pydicom, struct, zlib, Memory/RecursionError
            log.info("DICOM parse failed (%s)", type(exc).__name__, extra={"reason": "DICOM_UNREADABLE"})
            raise _unreadable() from None
    if info.pixel_bytes > max_pixel_bytes:
        raise InvalidInput(
            f"declared pixel data of {info.pixel_bytes} bytes exceeds {max_pixel_bytes}",
            reason="DICOM_TOO_LARGE",
        )
    if top_level is not None:
        _check_payload(info.sop_class_uid, top_level)
    flag = _preamble_flag(preamble)
    if flag is not None:
        log.warning(
            "DICOM preamble starts with executable magic (%s)",
            flag,
            extra={"reason": "DICOM_PREAMBLE_EXECUTABLE", "event": "preamble_flagged"},
        )
    return replace(info, preamble_flag=flag)


def check_dicom_instance(
    path: Path, *, max_pixel_bytes: int = 4 * 1024**3, max_inflated_bytes: int = 128 * 1024**2,
    metadata: bool = False,
) -> DicomInfo:  # fmt: skip
    """The check every door applies to a DICOM instance before it says "stored": the hub's ingest,
    the gateway's DICOM receiver and its watch folder. :func:`inspect_dicom`, and an executable
    preamble is refused."""
    info = inspect_dicom(
        path, max_pixel_bytes=max_pixel_bytes, max_inflated_bytes=max_inflated_bytes, metadata=metadata
    )
    if info.preamble_flag:
        raise InvalidInput("DICOM preamble holds an executable header", reason="DICOM_EXECUTABLE_PREAMBLE")
    return info


def _open_for_parse(path: Path, *, file_size: int) -> BinaryIO:
    """Small files are parsed from memory (bounded by their size; pydicom's many small reads are
    much cheaper there); larger ones through a reader that never over-allocates."""
    if file_size <= _IN_MEMORY_BYTES:
        return io.BytesIO(path.read_bytes())
    return _ClampedReader(io.FileIO(str(path), "r"), size=file_size)  # by name: pydicom reopens deferred values


def _parse_dicom(
    path: Path, *, file_size: int, max_inflated_bytes: int, metadata: bool
) -> tuple[set[int] | None, DicomInfo]:
    """The dataset's top-level tags (None for a deflated one) and what the hub needs to know."""
    with _open_for_parse(path, file_size=file_size) as fp:
        deflated = _check_inflated_size(fp, limit=max_inflated_bytes)
        top_level = None if deflated else _Structure(fp, file_size).walk()  # the whole file, to its last byte
        fp.seek(0)
        ds = pydicom.dcmread(fp, force=False, stop_before_pixels=True, defer_size=None if deflated else _DEFER_BYTES)
        uids = _identifying_uids(ds)
        budget = [_MAX_ELEMENTS]
        _walk(ds.file_meta, file_size=file_size, budget=budget, depth=0)
        _walk(ds, file_size=file_size, budget=budget, depth=0)
        kept, pixel_range = _metadata(fp, uids) if metadata else ("", None)
    rows, columns = _optional_int(ds, "Rows"), _optional_int(ds, "Columns")
    frames = _optional_int(ds, "NumberOfFrames")
    if frames is not None and frames < 1:
        raise InvalidInput("NumberOfFrames is not a positive integer", reason="DICOM_BAD_ATTRIBUTE")
    frames = frames or 1
    pixel_bytes = 0
    if rows is not None and columns is not None:  # declared size: decided before any decode
        samples = _optional_int(ds, "SamplesPerPixel") or 1
        bits = _optional_int(ds, "BitsAllocated") or 16
        pixel_bytes = math.ceil(rows * columns * frames * samples * bits / 8)
    modality = ds.get("Modality")
    modality = modality.strip() if isinstance(modality, str) else None
    patient, dropped = dicom_patient(ds)
    return top_level, DicomInfo(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        modality=modality or None,
        transfer_syntax_uid=uids["TransferSyntaxUID"],
        is_waveform=uids["SOPClassUID"].startswith(_WAVEFORM_SOP_CLASS_PREFIX) or "WaveformSequence" in ds,
        number_of_frames=frames,
        rows=rows,
        columns=columns,
        pixel_bytes=pixel_bytes,
        patient=patient,
        patient_dropped=tuple(dropped),
        index=index_of(ds),
        metadata=kept,
        pixel_range=pixel_range,
    )


def _metadata(fp: BinaryIO, uids: dict[str, str]) -> tuple[str, tuple[int, int, str] | None]:
    """The instance's DICOM JSON (``dicom_index.metadata_json``), read again whole now that its
    structure is known to be sound, and where its native pixel data lies in the file (so WADO-RS
    reads a frame's bytes alone, verified by their own digest). ('', None) when a value cannot be put
    into JSON (WADO-RS then builds it from the stored file, and says why if it cannot either): the
    metadata never refuses a file."""
    url = instance_url(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
    try:
        fp.seek(0)
        full = pydicom.dcmread(fp, force=False, defer_size=BULK_BYTES)
        pixel_range = _native_pixel_range(full, fp)
        return json.dumps(metadata_json(full, url), separators=(",", ":")), pixel_range
    except Exception as exc:  # noqa: BLE001 - untrusted input: the type is logged, never a value
        log.warning("instance metadata not kept", extra={"reason": type(exc).__name__})
        return "", None


def _native_pixel_range(ds: Dataset, fp: BinaryIO) -> tuple[int, int, str] | None:
    """Offset, length and SHA-256 of the top-level pixel data's value when it is stored natively in
    little endian (encapsulated, deflated or big-endian pixel data is read through pydicom)."""
    if ds.file_meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN or 0x7FE00010 not in ds:
        return None
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF or raw.value_tell is None:
        return None
    fp.seek(raw.value_tell)
    value = fp.read(raw.length)
    if len(value) != raw.length:
        return None
    return raw.value_tell, raw.length, hashlib.sha256(value).hexdigest()


def dicom_patient(ds: Dataset) -> tuple[PatientContext, list[str]]:
    """The patient context a dataset carries, and the fields whose value was invalid. A person name
    keeps its groups as given ("Wang^Xiaoming=王^小明"); of several values the first is taken; a value
    that cannot be read counts as absent, so it never refuses the file."""
    raw: dict[str, str] = {}
    for name, keyword in PATIENT_ATTRIBUTES.items():
        try:
            value: Any = ds.get(keyword)
            if isinstance(value, MultiValue):
                value = value[0] if len(value) else None
            raw[name] = "" if value is None else str(value)
        except Exception:  # noqa: BLE001 - untrusted input; the text may quote the value
            raw[name] = ""
    return cleaned(**raw)


def _check_inflated_size(fp: BinaryIO, *, limit: int) -> bool:
    """True if the dataset is deflated; its inflated size is bounded before pydicom inflates it."""
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)  # pydicom's own reader, so the result matches dcmread's
    raw: Any = meta.get_item(0x00020010, keep_deferred=True)
    value = raw.value if raw is not None else None
    syntax = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    if syntax.rstrip("\x00 ") != DeflatedExplicitVRLittleEndian:
        return False
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while chunk := fp.read(_INFLATE_CHUNK):
            while chunk and total <= limit and not inflater.eof:
                total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                chunk = inflater.unconsumed_tail
            if total > limit:
                raise InvalidInput(f"deflated dataset inflates beyond {limit} bytes", reason="DICOM_TOO_LARGE")
    except zlib.error:
        raise _unreadable("the deflated dataset is corrupt") from None
    if not inflater.eof:
        raise truncated()
    return True


def _uid_value(ds: Dataset, keyword: str, *, required: bool) -> str | None:
    """A UID read from the raw bytes (so a bad UID is BAD_UID, not a pydicom validation error)."""
    raw: Any = ds.get_item(keyword, keep_deferred=True)
    value = raw.value if raw is not None else None
    if raw is not None and value is None and raw.length:
        raise InvalidInput(f"{keyword} is not a valid DICOM UID", reason="BAD_UID")  # deferred
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if value is None or value == "":
        if required:
            raise InvalidInput(f"{keyword} is missing", reason="DICOM_MISSING_ATTRIBUTE")
        return None
    return check_uid(value, field=keyword)


def _identifying_uids(ds: Dataset) -> dict[str, str]:
    meta = getattr(ds, "file_meta", None)
    if meta is None or len(meta) == 0:
        raise InvalidInput("DICOM file has no file meta information", reason="DICOM_NO_META")
    uids = {"TransferSyntaxUID": _uid_value(meta, "TransferSyntaxUID", required=True) or ""}
    for keyword in _REQUIRED_UIDS:
        uids[keyword] = _uid_value(ds, keyword, required=True) or ""
    media_instance = _uid_value(meta, "MediaStorageSOPInstanceUID", required=False)
    if media_instance is not None and media_instance != uids["SOPInstanceUID"]:
        raise InvalidInput("MediaStorageSOPInstanceUID differs from SOPInstanceUID", reason="DICOM_UID_MISMATCH")
    return uids


def _is_sequence(raw: RawDataElement) -> bool:
    if raw.VR is not None:
        return bool(raw.VR == "SQ")
    try:
        return bool(dictionary_VR(raw.tag) == "SQ")
    except KeyError:
        return False


def _walk(ds: Dataset, *, file_size: int, budget: list[int], depth: int) -> None:
    """Convert every element under RAISE, checking extents before any deferred value is read."""
    if depth > _MAX_DEPTH:
        raise _unreadable("DICOM sequences are nested too deeply")
    for tag in list(ds.keys()):
        budget[0] -= 1
        if budget[0] < 0:
            raise InvalidInput("DICOM file has too many elements", reason="DICOM_TOO_LARGE")
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH:
            if raw.value is None and raw.length:  # deferred: still on disk
                if raw.value_tell + raw.length > file_size:
                    raise _unreadable("a DICOM element runs past the end of the file")
                if raw.length > _MAX_LOADED_VALUE_BYTES:
                    if _is_sequence(raw):
                        raise InvalidInput("a sequence is too large", reason="DICOM_TOO_LARGE")
                    continue
            elif isinstance(raw.value, bytes) and len(raw.value) < raw.length:
                raise _unreadable("a DICOM element runs past the end of the file")
        elem = _converted(ds, tag, raw)
        if elem.VR == "SQ":
            for item in elem.value:
                _walk(item, file_size=file_size, budget=budget, depth=depth + 1)


def _converted(ds: Dataset, tag: Any, raw: Any) -> Any:
    """The element at ``tag`` converted from its raw bytes (under RAISE: invalid values raise).
    A value already read is converted directly and not stored back into the dataset (that is most
    of what ``ds[tag]`` costs); deferred values, ambiguous VRs and the character set element go
    through ``ds[tag]``, which reads and corrects them."""
    vr = getattr(raw, "VR", None)
    if (
        not isinstance(raw, RawDataElement)
        or (raw.value is None and raw.length)
        or vr is None
        or " or " in vr
        or tag == _SPECIFIC_CHARACTER_SET
    ):
        return ds[tag]
    encoding = ds.original_character_set or ds._character_set
    value = raw.value
    if not isinstance(value, bytes) or len(value) > _PASSED_MAX_BYTES or vr in ("SQ", "UN"):
        return convert_raw_data_element(raw, encoding=encoding, ds=ds)  # UN may turn out to be a sequence
    # Most values repeat: the same attributes in every slice of a series, the same codes in every item
    # of an ECG's annotations. pydicom's conversion is a function of these inputs alone, so a value it
    # accepted once is accepted again without converting it.
    key = (int(tag), vr, value, tuple(encoding) if isinstance(encoding, list) else encoding,
           raw.is_implicit_VR, raw.is_little_endian)  # fmt: skip
    if key in _PASSED:
        return raw
    elem = convert_raw_data_element(raw, encoding=encoding, ds=ds)
    if elem.VR != "SQ":  # a sequence's items are checked by the caller, every time
        if len(_PASSED) >= _PASSED_MAX_ENTRIES:
            _PASSED.clear()
        _PASSED[key] = None
    return elem


# raw values pydicom converted without error under RAISE (keys as in _converted)
_PASSED: dict[tuple[Any, ...], None] = {}
_PASSED_MAX_BYTES = 1024
_PASSED_MAX_ENTRIES = 100_000


def truncated() -> InvalidInput:
    return InvalidInput(
        "DICOM file ends before its content is complete (cut short, or a length in it is corrupt)", reason="TRUNCATED"
    )


class _Structure:
    """The element and item structure of a Part 10 file walked by headers alone, values skipped by
    seeking: every element, item and delimiter must lie inside the file and the last must end at its
    last byte. Catches what pydicom reads silently (a file cut inside an element header, or between
    two elements) and never loads a value, pixel data and its fragments included."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp, self.size, self.budget = fp, size, _MAX_ELEMENTS

    def walk(self) -> set[int]:
        """The dataset's top-level tags, after checking the file meta and the dataset to the end."""
        self.fp.seek(132)
        syntax, meta_elements = "", 0
        while True:
            start = self.fp.tell()
            header = self._header(implicit=False, little=True)
            if header is None:
                return set()
            tag, _vr, length = header
            if tag >> 16 != 0x0002:
                self.fp.seek(start)
                break
            meta_elements += 1
            if length == _UNDEFINED_LENGTH:
                raise _unreadable("a file meta element has an undefined length")
            if tag == 0x00020010 and length <= 64:
                syntax = self.fp.read(length).decode("ascii", "replace").rstrip("\x00 ")
            else:
                self._skip(length)
        if not meta_elements:
            raise InvalidInput("DICOM file has no file meta information", reason="DICOM_NO_META")
        if not syntax:
            raise InvalidInput("TransferSyntaxUID is missing", reason="DICOM_MISSING_ATTRIBUTE")
        uid = pydicom.uid.UID(syntax)
        implicit, little = (uid.is_implicit_VR, uid.is_little_endian) if uid.is_transfer_syntax else (False, True)
        return self._elements(implicit, little, depth=0, in_item=False)

    def _header(self, *, implicit: bool, little: bool) -> tuple[int, bytes | None, int] | None:
        if self.fp.tell() >= self.size:
            return None
        head = self.fp.read(8)
        if len(head) < 8:
            raise truncated()
        endian = "<" if little else ">"
        group, element = struct.unpack(f"{endian}HH", head[:4])
        if implicit or group == 0xFFFE:
            return (group << 16) | element, None, struct.unpack(f"{endian}L", head[4:8])[0]
        vr = head[4:6]
        if vr in _LONG_LENGTH_VRS:
            more = self.fp.read(4)
            if len(more) < 4:
                raise truncated()
            return (group << 16) | element, vr, struct.unpack(f"{endian}L", more)[0]
        return (group << 16) | element, vr, struct.unpack(f"{endian}H", head[6:8])[0]

    def _skip(self, length: int) -> None:
        end = self.fp.tell() + length
        if end > self.size:
            raise truncated()
        self.fp.seek(end)

    def _elements(self, implicit: bool, little: bool, *, depth: int, in_item: bool) -> set[int]:
        tags: set[int] = set()
        while True:
            header = self._header(implicit=implicit, little=little)
            if header is None:
                if in_item:  # the file ended inside an item
                    raise truncated()
                return tags
            tag, vr, length = header
            self.budget -= 1
            if self.budget < 0:
                raise InvalidInput("DICOM file has too many elements", reason="DICOM_TOO_LARGE")
            if tag == _ITEM_END and in_item:
                return tags
            if tag >> 16 == 0xFFFE:
                raise _unreadable("an item or delimiter stands where a data element should")
            tags.add(tag)
            if length == _UNDEFINED_LENGTH:  # a sequence, or encapsulated pixel data: items to a delimiter
                self._items(implicit or vr == b"UN", little or vr == b"UN", depth=depth + 1)
            else:
                self._skip(length)

    def _items(self, implicit: bool, little: bool, *, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _unreadable("DICOM sequences are nested too deeply")
        while True:
            header = self._header(implicit=True, little=little)
            if header is None:
                raise truncated()
            tag, _vr, length = header
            self.budget -= 1
            if self.budget < 0:
                raise InvalidInput("DICOM file has too many elements", reason="DICOM_TOO_LARGE")
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise _unreadable("a sequence holds something other than items")
            if length == _UNDEFINED_LENGTH:
                self._elements(implicit, little, depth=depth, in_item=True)
            else:
                self._skip(length)


def _check_payload(sop_class: str, top_level: set[int]) -> None:
    """An image needs its pixel data and an ECG its waveform (a file cut short just before them ends
    at an element boundary)."""
    if sop_class.startswith(_WAVEFORM_SOP_CLASS_PREFIX) and _WAVEFORM_SEQUENCE not in top_level:
        raise InvalidInput("a waveform instance without its waveform (cut short?)", reason="DICOM_NO_WAVEFORM")
    if "Image Storage" in pydicom.uid.UID(sop_class).name and not top_level & _PIXEL_DATA_TAGS:
        raise InvalidInput("an image instance without pixel data (cut short?)", reason="DICOM_NO_PIXEL_DATA")


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    return int(value)


def zero_preamble_in_place(path: Path) -> bool:
    """Zero a non-zero 128-byte preamble of a DICOM file (R26); True when bytes were changed."""
    with path.open("r+b") as handle:
        head = handle.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise InvalidInput("file is not DICOM Part 10", reason="DICOM_NO_META")
        if not any(head[:128]):
            return False
        handle.seek(0)
        handle.write(bytes(128))
        handle.flush()
        os.fsync(handle.fileno())
    return True


# --- The same instance sent again ---------------------------------------------------------------

LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
    }
)
# attributes that change when the same image is encoded again in another transfer syntax
_ENCODING_TAGS = frozenset(
    {
        0x00082111,  # Derivation Description ("Lossless JPEG compression ...", written by compressors)
        0x00089215,  # Derivation Code Sequence
        0x00280004,  # Photometric Interpretation (RGB <-> YBR_FULL_422, YBR_RCT, YBR_ICT)
        0x00280006,  # Planar Configuration
        0x00282110,  # Lossy Image Compression
        0x00282112,  # Lossy Image Compression Ratio
        0x00282114,  # Lossy Image Compression Method
        0x7FE00010,  # Pixel Data (compared decoded)
        0xFFFCFFFC,  # Data Set Trailing Padding
    }
)
SAME_BYTES, LOSSLESS_RESEND, LOSSY_RESEND, DIFFERENT = "same_bytes", "lossless_resend", "lossy_resend", "different"
KEEP_FIRST = frozenset({SAME_BYTES, LOSSLESS_RESEND, LOSSY_RESEND})  # answered as duplicates: the first copy stays


def resend_kind(first: Path, second: Path) -> str:
    """How ``second`` relates to ``first``, two checked files with the same SOP Instance UID:
    ``LOSSLESS_RESEND`` when every attribute but those of the encoding is equal and the decoded
    pixels are identical (the same instance in another transfer syntax: a duplicate, not a
    conflict); ``LOSSY_RESEND`` when only the pixels differ and one of the two is lossy-compressed
    (the same image, degraded: the first copy is kept); else ``DIFFERENT`` (a real conflict). A
    file that cannot be decoded counts as different. Both files are parsed whole: call this only
    for instances that passed :func:`check_dicom_instance`."""
    if first.read_bytes() == second.read_bytes():
        return SAME_BYTES
    ensure_decoders()
    try:
        a, b = pydicom.dcmread(first), pydicom.dcmread(second)
        if str(a.SOPInstanceUID) != str(b.SOPInstanceUID) or _attributes(a) != _attributes(b):
            return DIFFERENT
        if ("PixelData" in a) != ("PixelData" in b):
            return DIFFERENT
        if "PixelData" not in a:
            return LOSSLESS_RESEND  # no pixels, every other attribute equal
        pa, pb = a.pixel_array, b.pixel_array
    except Exception:  # noqa: BLE001 - an undecodable copy is not the same instance; the text may quote data
        log.info("instances not compared", extra={"reason": "UNDECODABLE_PIXEL_DATA"})
        return DIFFERENT
    if pa.shape != pb.shape:
        return DIFFERENT
    if (pa == pb).all():
        return LOSSLESS_RESEND
    return LOSSY_RESEND if _lossy(a) or _lossy(b) else DIFFERENT


def _attributes(ds: Dataset) -> Dataset:
    """The dataset without its file meta and the attributes of its pixel encoding; of Image Type,
    all but its first value (a lossy compression may turn ORIGINAL into DERIVED)."""
    kept = Dataset()
    for elem in ds:
        if elem.tag.group == 0x0002 or int(elem.tag) in _ENCODING_TAGS:
            continue
        if elem.keyword == "ImageType":
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            if values[1:]:  # a compressor may add Image Type DERIVED where there was none
                kept.add_new(elem.tag, elem.VR, values[1:])
            continue
        kept.add(elem)
    return kept


def _lossy(ds: Dataset) -> bool:
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
    return syntax in LOSSY_SYNTAXES or str(ds.get("LossyImageCompression", "")).strip() == "01"


# --- WFDB ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WfdbHeaderInfo:
    """A checked WFDB header: one signal file of ``expected_signal_bytes`` bytes."""

    record_name: str
    fs: float
    n_sig: int
    sig_len: int
    lead_names: tuple[str, ...]
    signal_file_names: tuple[str, ...]
    fmt: tuple[str, ...]
    gains: tuple[float, ...]
    expected_signal_bytes: int
    patient: PatientContext = field(default=PatientContext(), repr=False)  # age and sex from the comments


def _bad_header(message: str) -> InvalidInput:
    return InvalidInput(message, reason="WFDB_BAD_HEADER")


def inspect_wfdb_header(path: Path) -> WfdbHeaderInfo:
    """Parse and bound-check a WFDB header (stored under any name)."""
    record = ecgio.read_wfdb_header(path)
    n_sig = int(record.n_sig or 0)
    if n_sig < 1:
        raise _bad_header("WFDB record declares no signals")
    if n_sig > MAX_WFDB_SIGNALS:
        raise InvalidInput(
            f"WFDB record declares {n_sig} signals; at most {MAX_WFDB_SIGNALS} are accepted",
            reason="WFDB_TOO_LARGE",
        )
    n_lines = len(record.file_name or [])
    if n_lines != n_sig:
        raise _bad_header(f"WFDB header declares {n_sig} signals but has {n_lines} signal lines")
    fs = float(record.fs)
    if not (math.isfinite(fs) and 0 < fs <= MAX_WFDB_FS):
        raise _bad_header("WFDB sampling frequency is out of range")
    sig_len = int(record.sig_len or 0)
    if sig_len < 1:
        raise _bad_header("WFDB record declares no samples")
    frame = sum(int(spf or 1) for spf in record.samps_per_frame or [1] * n_sig)
    if sig_len * frame >= MAX_WFDB_SAMPLES:
        raise InvalidInput("WFDB record declares too many samples", reason="WFDB_TOO_LARGE")
    gains = tuple(float(gain) for gain in record.adc_gain or [])
    if len(gains) != n_sig or not all(math.isfinite(g) and 0 < g < MAX_WFDB_GAIN for g in gains):
        raise _bad_header("WFDB ADC gain is out of range")
    signal_file = ecgio.signal_file_name(record)
    expected_bytes = ecgio.record_signal_bytes(record)  # also refuses unsupported formats
    return WfdbHeaderInfo(
        record_name=str(record.record_name),
        fs=fs,
        n_sig=n_sig,
        sig_len=sig_len,
        lead_names=tuple(ecgio.normalise_lead_name(str(n or "")) for n in record.sig_name or []),
        signal_file_names=(signal_file,),
        fmt=tuple(str(fmt) for fmt in record.fmt),
        gains=gains,
        expected_signal_bytes=expected_bytes,
        patient=_wfdb_patient(record),
    )


def _wfdb_patient(record: Any) -> PatientContext:
    """Age and sex from a parsed header's comment lines; none when they cannot be read."""
    try:
        return from_wfdb_comments([str(c) for c in record.comments or []])
    except Exception:  # noqa: BLE001 - wfdb's record is untyped; a comment never refuses a header
        return PatientContext()


def check_wfdb_pair(header: WfdbHeaderInfo, signal_path: Path) -> None:
    """The signal file must have exactly the size the header implies."""
    actual = signal_path.stat().st_size
    if actual != header.expected_signal_bytes:
        raise InvalidInput(
            f"signal file has {actual} bytes, header implies {header.expected_signal_bytes}",
            reason="WFDB_SIGNAL_SIZE_MISMATCH",
        )


# --- Sniffing ------------------------------------------------------------------------------------


def sniff_kind(path: Path) -> str:
    """ "dicom" (DICM magic at 128), "wfdb_header" (text with a WFDB record line), or "unknown"."""
    with path.open("rb") as handle:
        head = handle.read(ecgio.MAX_HEADER_BYTES)
    if head[128:132] == b"DICM":
        return "dicom"
    if head and b"\x00" not in head:
        if ecgio.looks_like_wfdb_header(head.decode("ascii", errors="ignore")):
            return "wfdb_header"
    return "unknown"
