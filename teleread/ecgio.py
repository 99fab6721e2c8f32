"""ECG loading adapter: the one module of teleread that imports wfdb, and the DICOM waveform reader.

It owns turning an ECG object as stored by the hub (a WFDB header + signal file pair kept under hash
names, or a DICOM 12-lead / general ECG waveform) into an :class:`EcgSignal` in millivolts with
normalised lead names. wfdb is untyped and raises bare exceptions: every call into it goes through
:func:`_wfdb_call`, which maps any failure to :class:`~teleread.errors.InvalidInput` without the
exception text (it can quote header comments, i.e. patient data).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pydicom

from teleread.errors import InvalidInput

log = logging.getLogger("teleread.ecgio")

T = TypeVar("T")

MAX_HEADER_BYTES = 64 * 1024
# Bits each sample takes in a WFDB signal file, for the formats the hub accepts.
SIGNAL_FORMAT_BITS: dict[str, int] = {"16": 16, "212": 12, "80": 8, "61": 16, "24": 24, "32": 32}
# Upper bound on samples (all leads) decoded from one DICOM waveform group.
MAX_WAVEFORM_SAMPLES = 2**28

_RECORD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}", re.ASCII)
_SIGNAL_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
# The record line as sniffing accepts it: name[/segments] n_sig [fs[/counter[(base)]] [length
# [time [date]]]]; dates in any spelling, so a bad date gets a typed error later, not "unknown".
_RECORD_LINE = re.compile(
    r"[A-Za-z0-9_-]+(?:/\d+)?[ \t]+\d+"
    r"(?:[ \t]+[0-9.]+(?:/[0-9.]+)?(?:\(-?[0-9.]+\))?"
    r"(?:[ \t]+\d+(?:[ \t]+[0-9:.]+(?:[ \t]+[0-9/.-]+)?)?)?)?",
    re.ASCII,
)
_STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_LEAD_BY_KEY = {name.upper(): name for name in _STANDARD_LEADS}
_LEAD_PREFIX = re.compile(r"^(?:lead|ecg)[\s_-]*", re.IGNORECASE)
_PARENTHESISED = re.compile(r"\([^)]*\)")
_MILLIVOLTS_PER_UNIT = {
    "mv": 1.0,
    "millivolt": 1.0,
    "uv": 1e-3,
    "µv": 1e-3,
    "μv": 1e-3,
    "microvolt": 1e-3,
    "v": 1000.0,
    "volt": 1000.0,
}


@dataclass(frozen=True)
class EcgSignal:
    """An ECG in millivolts: ``signal_mv`` is float32 of shape (n_samples, n_leads)."""

    signal_mv: npt.NDArray[np.float32]
    fs: float
    lead_names: list[str]
    units_assumed: bool = False

    def __post_init__(self) -> None:
        if self.signal_mv.ndim != 2 or self.signal_mv.shape[1] != len(self.lead_names):
            raise ValueError("signal_mv must be (n_samples, n_leads) with one name per lead")
        if not (math.isfinite(self.fs) and self.fs > 0):
            raise ValueError("fs must be a positive finite sampling frequency")

    @property
    def duration_s(self) -> float:
        return float(self.signal_mv.shape[0]) / self.fs


def normalise_lead_name(raw: str) -> str:
    """Map a lead label to its standard spelling ("AVR" -> "aVR", "Lead I (Einthoven)" -> "I").

    Labels that are not one of the twelve standard leads come back stripped but otherwise as given.
    """
    text = _PARENTHESISED.sub("", raw).strip()
    key = _LEAD_PREFIX.sub("", text).replace(" ", "").upper()
    return _LEAD_BY_KEY.get(key, text or raw.strip())


def millivolts_per_unit(unit: str | None) -> float | None:
    """Scale from a physical unit to millivolts, or None when the unit is not a voltage we know."""
    if unit is None:
        return None
    return _MILLIVOLTS_PER_UNIT.get(unit.strip().lower())


def expected_signal_bytes(*, fmt: str, n_samples: int, byte_offset: int = 0) -> int:
    """Size of a WFDB signal file holding ``n_samples`` samples (all signals) in format ``fmt``."""
    bits = SIGNAL_FORMAT_BITS.get(fmt)
    if bits is None:
        raise InvalidInput(f"WFDB signal format {fmt[:8]!r} is not supported", reason="WFDB_UNSUPPORTED_FORMAT")
    return byte_offset + math.ceil(n_samples * bits / 8)


# --- WFDB ---------------------------------------------------------------------------------------


def _bad_header(message: str) -> InvalidInput:
    return InvalidInput(message, reason="WFDB_BAD_HEADER")


def _wfdb() -> Any:
    """wfdb, imported on first use (it pulls in pandas and matplotlib; processes that never read a
    WFDB record do not pay for it)."""
    import wfdb

    return wfdb


def _wfdb_call(fn: Callable[[], T], *, message: str, reason: str) -> T:
    """Run one wfdb call; any exception becomes InvalidInput without the exception's text."""
    try:
        return fn()
    except Exception as exc:  # wfdb raises bare, untyped exceptions on malformed input
        log.info("wfdb rejected a record (%s)", type(exc).__name__, extra={"reason": reason})
        raise InvalidInput(message, reason=reason) from None


def read_header_text(path: Path, *, max_bytes: int = MAX_HEADER_BYTES) -> str:
    """Read a WFDB header as text, refusing binary files and headers above ``max_bytes``."""
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError:
        raise InvalidInput("WFDB header could not be read", reason="WFDB_BAD_HEADER") from None
    if len(data) > max_bytes:
        raise InvalidInput(f"WFDB header is larger than {max_bytes} bytes", reason="WFDB_TOO_LARGE")
    if b"\x00" in data:
        raise InvalidInput("WFDB header is not a text file", reason="WFDB_BAD_HEADER")
    # wfdb itself reads headers as ASCII and drops other bytes (comments may be UTF-8).
    return data.decode("ascii", errors="ignore")


def header_record_line(text: str) -> str | None:
    """First non-empty, non-comment line of a header (the record line), as wfdb finds it."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return None


def looks_like_wfdb_header(text: str) -> bool:
    """True when the first non-comment line of ``text`` is a WFDB record line."""
    line = header_record_line(text)
    return line is not None and _RECORD_LINE.fullmatch(line) is not None


def _record_name(text: str) -> str:
    line = header_record_line(text)
    name = line.split(None, 1)[0].split("/", 1)[0] if line else ""
    if not _RECORD_NAME.fullmatch(name):
        raise _bad_header("WFDB record line is malformed")
    return name


@contextmanager
def _staged_header(text: str) -> Iterator[tuple[Path, Any]]:
    """Write the header into a private temp dir under the name wfdb expects and parse it there."""
    record_name = _record_name(text)
    with tempfile.TemporaryDirectory(prefix="teleread-wfdb-") as tmp:
        base = Path(tmp) / record_name
        Path(tmp, f"{record_name}.hea").write_text(text, encoding="ascii")
        record = _wfdb_call(
            lambda: _wfdb().rdheader(str(base)),
            message="WFDB header could not be parsed",
            reason="WFDB_BAD_HEADER",
        )
        if isinstance(record, _wfdb().MultiRecord) or not isinstance(record, _wfdb().Record):
            raise InvalidInput("multi-segment WFDB records are not supported", reason="WFDB_UNSUPPORTED_FORMAT")
        yield base, record


def read_wfdb_header(path: Path, *, max_bytes: int = MAX_HEADER_BYTES) -> Any:
    """Parse a WFDB header file stored under any name; returns the ``_wfdb().Record`` (no signals)."""
    with _staged_header(read_header_text(path, max_bytes=max_bytes)) as (_, record):
        return record


def signal_file_name(record: Any) -> str:
    """The one signal file a record's signal lines name, checked to be a plain file name."""
    names = sorted(set(record.file_name or []))
    if len(names) != 1:
        raise InvalidInput(
            f"WFDB record uses {len(names)} signal files; exactly one is supported",
            reason="WFDB_UNSUPPORTED_FORMAT",
        )
    name = names[0]
    if not isinstance(name, str) or not _SIGNAL_FILE_NAME.fullmatch(name):
        raise _bad_header("WFDB signal file name is not a plain file name")
    if name == f"{record.record_name}.hea":
        raise _bad_header("WFDB signal file name clashes with the header")
    return name


def record_signal_bytes(record: Any) -> int:
    """Expected size of the record's single signal file, from its header fields."""
    formats = set(record.fmt or [])
    offsets = {offset or 0 for offset in (record.byte_offset or [0])}
    if len(formats) != 1 or len(offsets) != 1:
        raise _bad_header("WFDB signals sharing a file must share one format and byte offset")
    frame = sum(int(spf or 1) for spf in (record.samps_per_frame or [1] * int(record.n_sig)))
    n_samples = int(record.sig_len or 0) * frame
    fmt, offset = str(formats.pop()), int(offsets.pop())
    return expected_signal_bytes(fmt=fmt, n_samples=n_samples, byte_offset=offset)


def _place(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def load_ecg_wfdb(header_path: Path, signal_path: Path) -> EcgSignal:
    """Load a WFDB record whose header and signal file are stored under arbitrary names."""
    text = read_header_text(header_path)
    with _staged_header(text) as (base, header):
        name = signal_file_name(header)
        expected = record_signal_bytes(header)
        try:
            actual = signal_path.stat().st_size
        except OSError:
            raise InvalidInput("WFDB signal file is missing", reason="ECG_UNREADABLE") from None
        if actual != expected:
            raise InvalidInput(
                f"signal file has {actual} bytes, header implies {expected}",
                reason="WFDB_SIGNAL_SIZE_MISMATCH",
            )
        _place(signal_path, base.parent / name)
        record = _wfdb_call(
            lambda: _wfdb().rdrecord(str(base), physical=True, return_res=32),
            message="WFDB record could not be read",
            reason="ECG_UNREADABLE",
        )
    columns = record.p_signal
    if not isinstance(columns, np.ndarray) or columns.ndim != 2:
        raise InvalidInput("WFDB record has no signal", reason="ECG_UNREADABLE")
    return _signal_from_columns(
        columns,
        fs=float(record.fs or 0),
        labels=[str(label) for label in (record.sig_name or [])],
        units=list(record.units or [None] * columns.shape[1]),
    )


def _signal_from_columns(
    columns: npt.NDArray[Any], *, fs: float, labels: Sequence[str], units: Sequence[str | None]
) -> EcgSignal:
    """Scale each lead to mV by its unit; unknown units are taken as mV and flagged."""
    if columns.ndim != 2 or columns.shape[1] != len(labels) or len(units) != len(labels):
        raise InvalidInput("ECG leads and their definitions do not match", reason="ECG_UNREADABLE")
    if not (math.isfinite(fs) and fs > 0):
        raise InvalidInput("ECG sampling frequency is not positive", reason="ECG_UNREADABLE")
    scales = [millivolts_per_unit(unit) for unit in units]
    assumed = any(scale is None for scale in scales)
    if assumed:
        log.info("ECG units not recognised; assuming mV", extra={"count": scales.count(None)})
    factors = np.array([1.0 if s is None else s for s in scales], dtype=np.float32)
    return EcgSignal(
        signal_mv=(columns.astype(np.float32) * factors).astype(np.float32),
        fs=fs,
        lead_names=[normalise_lead_name(label) for label in labels],
        units_assumed=assumed,
    )


# --- DICOM waveform -----------------------------------------------------------------------------


def _read_waveform_dataset(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path, force=False, stop_before_pixels=True)
        present = "WaveformSequence" in ds
    except Exception as exc:  # pydicom raises many types on malformed input
        log.info("DICOM waveform unreadable (%s)", type(exc).__name__)
        raise InvalidInput("DICOM file could not be read", reason="ECG_UNREADABLE") from None
    if not present:
        raise InvalidInput("DICOM object has no waveform", reason="ECG_NO_WAVEFORM")
    return ds


def _first_group(ds: pydicom.Dataset) -> tuple[int, pydicom.Dataset]:
    for index, group in enumerate(ds.WaveformSequence):
        channels = int(group.get("NumberOfWaveformChannels") or 0)
        samples = int(group.get("NumberOfWaveformSamples") or 0)
        if channels >= 1 and samples >= 1:
            if channels * samples > MAX_WAVEFORM_SAMPLES:
                raise InvalidInput("DICOM waveform is too large", reason="ECG_TOO_LARGE")
            return index, group
    raise InvalidInput("DICOM waveform has no channel", reason="ECG_NO_WAVEFORM")


def _channel_label(channel: pydicom.Dataset, index: int) -> str:
    sources = channel.get("ChannelSourceSequence") or []
    meaning = sources[0].get("CodeMeaning") if len(sources) else None
    return str(meaning or channel.get("ChannelLabel") or f"channel {index + 1}")


def _channel_unit(channel: pydicom.Dataset) -> str | None:
    """Unit of the values ``waveform_array`` returns for this channel (None: raw ADC counts)."""
    if channel.get("ChannelSensitivity") is None:
        return None
    units = channel.get("ChannelSensitivityUnitsSequence") or []
    code = units[0].get("CodeValue") if len(units) else None
    return str(code) if code else None


def load_ecg_dicom(path: Path) -> EcgSignal:
    """Load the first multiplex group with channels of a DICOM ECG waveform, in mV."""
    ds = _read_waveform_dataset(path)
    try:
        index, group = _first_group(ds)
        fs = float(group.SamplingFrequency)
        channels = list(group.ChannelDefinitionSequence)
        labels = [_channel_label(channel, i) for i, channel in enumerate(channels)]
        units = [_channel_unit(channel) for channel in channels]
        columns = np.asarray(ds.waveform_array(index))
    except InvalidInput:
        raise
    except Exception as exc:  # malformed waveform attributes or data
        log.info("DICOM waveform unreadable (%s)", type(exc).__name__)
        raise InvalidInput("DICOM waveform could not be read", reason="ECG_UNREADABLE") from None
    return _signal_from_columns(columns, fs=fs, labels=labels, units=units)
