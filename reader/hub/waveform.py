"""An ECG exam's samples for the readers' viewer, decoded at the hub from the exam's stored objects.

The reader's access is the queue's own check (:meth:`QueueService.ecg_objects`: the same tenancy and
specialty rule as the exam's details); the objects are copied out of the store hash-verified into a
private temporary folder and decoded by the one ECG loader (:mod:`teleread.ecgio`: WFDB header +
signal, or a DICOM 12-lead / general ECG waveform), in millivolts with normalised lead names.
Stored objects never change (their keys are their content), so a few decoded ECGs are kept by
their SHA-256s: a reader going back and forth between an exam and its prior decodes each once.

Errors are typed and say nothing of the patient: ``NOT_AN_ECG`` for an exam of another kind,
``ECG_NO_OBJECT`` when the exam has no ECG object to decode, the loader's reason (for example
``ECG_UNREADABLE``) when the object cannot be decoded, and ``ECG_TOO_LONG`` past
:data:`MAX_SAMPLES` (the answer must fit in one gRPC message).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teleread import ecgio
from teleread.auth import Principal
from teleread.errors import Conflict, InvalidInput
from teleread.reader.hub.queue import QueueService
from teleread.vocab import ObjectRole

log = logging.getLogger("teleread.waveform")

MAX_SAMPLES = 1_200_000  # all leads together: 12 leads x 100 s at 1 kHz, about 2.5 MB on the wire
CACHED = 16  # decoded ECGs kept (about 0.5 MB each for 10 s of 12 leads at 1 kHz)


@dataclass(frozen=True)
class EcgWaveform:
    """What the viewer draws: the signal in mV and which kind of object it came from."""

    signal: ecgio.EcgSignal
    source: str  # "wfdb" or "dicom"


class EcgWaveforms:
    def __init__(self, queue: QueueService, *, cached: int = CACHED) -> None:
        self._queue = queue
        self._cached = cached
        self._cache: OrderedDict[tuple[str, ...], EcgWaveform] = OrderedDict()
        self._lock = threading.Lock()

    def waveform(self, p: Principal, *, exam_id: str) -> EcgWaveform:
        rows = self._queue.ecg_objects(p, exam_id=exam_id)  # the access check, every time
        chosen, source = chosen_objects(rows)
        key = tuple(str(r["sha256"]) for r in chosen)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        found = EcgWaveform(signal=self._decode(chosen, source), source=source)
        with self._lock:
            self._cache[key] = found
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
        return found

    def _decode(self, rows: list[dict[str, Any]], source: str) -> ecgio.EcgSignal:
        with tempfile.TemporaryDirectory(prefix="teleread-waveform-") as tmp:
            paths = [self._copy(row, Path(tmp) / f"{n}.{row['role']}") for n, row in enumerate(rows)]
            try:
                signal = ecgio.load_ecg_wfdb(paths[0], paths[1]) if source == "wfdb" else ecgio.load_ecg_dicom(paths[0])
            except InvalidInput as exc:  # the loader's reason, never its text
                log.warning("ECG object not decodable", extra={"reason": exc.reason})
                raise Conflict("the exam's ECG object cannot be decoded", reason=exc.reason) from None
        if signal.signal_mv.size > MAX_SAMPLES:
            raise Conflict("the ECG is too long for the viewer", reason="ECG_TOO_LONG")
        return signal

    def _copy(self, row: dict[str, Any], dest: Path) -> Path:
        with self._queue.open_stored(row) as src, dest.open("wb") as out:
            while block := src.read(1024 * 1024):
                out.write(block)
        return dest


def chosen_objects(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The objects to decode: the WFDB header and signal, else the first DICOM waveform."""
    by_role: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_role.setdefault(str(row["role"]), row)
    if ObjectRole.WFDB_HEADER in by_role and ObjectRole.WFDB_SIGNAL in by_role:
        return [by_role[ObjectRole.WFDB_HEADER], by_role[ObjectRole.WFDB_SIGNAL]], "wfdb"
    if ObjectRole.DICOM in by_role:
        return [by_role[ObjectRole.DICOM]], "dicom"
    raise Conflict("the exam has no ECG object to decode", reason="ECG_NO_OBJECT")
