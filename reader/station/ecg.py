"""The ECG viewer's data route: an ECG exam's samples, fetched from the hub as the signed-in reader.

``GET /api/exams/{exam_id}/ecg`` calls the hub's ``GetEcgWaveform`` with the person's session token
(the hub applies the exam's tenancy and specialty rule) and answers compactly, in one binary body
the page reads with no parsing of numbers: a little-endian ``uint32`` header length, a JSON header
(``fs``, ``duration_s``, ``source``, ``leads``: their names, ``samples``: per lead, ``clipped``:
samples beyond the ±32.767 mV an ``Int16`` holds), zero padding to a multiple of 8 bytes, then each
lead's samples in µV as little-endian ``Int16``, lead after lead. 10 s of 12 leads at 500 Hz is
120 KB (the same as JSON with integer arrays would be about 3.5 times larger, and slower to read).
Errors are the station's usual JSON errors (the hub's reason: ``NOT_AN_ECG``, ``ECG_UNREADABLE``...).
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from teleread.v1 import worklist_pb2

if TYPE_CHECKING:
    from teleread.reader.station.app import Station
    from teleread.reader.station.sessions import BrowserSession

MEDIA_TYPE = "application/vnd.teleread.ecg"
INT16_MAX = 32767


def pack(waveform: worklist_pb2.EcgWaveform) -> bytes:
    """The hub's waveform as the page's binary answer (see the module's docstring)."""
    columns = [np.asarray(lead.microvolts, dtype=np.int32) for lead in waveform.leads]
    clipped = sum(int(np.count_nonzero(np.abs(c) > INT16_MAX)) for c in columns)
    header = json.dumps(
        {
            "fs": waveform.fs,
            "duration_s": waveform.duration_s,
            "source": waveform.source,
            "leads": [lead.name for lead in waveform.leads],
            "samples": [int(c.size) for c in columns],
            "clipped": clipped,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    start = 4 + len(header)
    padding = b" " * (-start % 8)  # JSON allows trailing blanks; the samples start 8-aligned
    body = b"".join(np.clip(c, -INT16_MAX, INT16_MAX).astype("<i2").tobytes() for c in columns)
    return struct.pack("<I", len(header) + len(padding)) + header + padding + body


async def waveform(request: Request, station: Station, session: BrowserSession) -> Response:
    found = await station.hub.ecg_waveform(session.hub_token, request.path_params["exam_id"])
    return Response(pack(found), media_type=MEDIA_TYPE)
