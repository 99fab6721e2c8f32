"""The report pane's ECG statements and measurements: the hub's statement library for the page, and
what the page sends with a report (statements, the reader's measurements) as the hub's fields.

``GET /api/statements`` is the hub's ``Worklist.ListStatements`` (groups, statements in English and
Chinese, the triage findings that suggest each), fetched with the person's session token. The page's
report body may carry ``statements`` (``[{code, source, confirmed}]``, in order), ``measurements``
(``{name: number}``, the names of ``teleread.v1.EcgMeasurements``) and ``measurements_edited``
(the names the reader changed); :func:`report_fields` turns them into the fields of
``SaveReportRequest`` / ``AmendReportRequest``. The hub checks them (an unknown code, a value out
of range); here only their shape is kept, and anything else is dropped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from teleread.reader.station.hubclient import as_dict
from teleread.v1 import common_pb2

if TYPE_CHECKING:
    from teleread.reader.station.app import Station
    from teleread.reader.station.sessions import BrowserSession

MAX_STATEMENTS = 100
MEASUREMENTS = tuple(
    f.name for f in common_pb2.EcgMeasurements.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE and f.has_presence
)


async def library(request: Request, station: Station, session: BrowserSession) -> Response:
    found = await station.hub.statements(session.hub_token)
    return JSONResponse(as_dict(found))


def report_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The statements and measurements of a report body as request fields ({} when it has none)."""
    out: dict[str, Any] = {}
    raw = body.get("statements")
    if isinstance(raw, list):
        out["statements"] = [
            common_pb2.ReportStatement(
                code=str(s.get("code", ""))[:100],
                source="machine" if s.get("source") == "machine" else "reader",
                confirmed=bool(s.get("confirmed")),
            )
            for s in raw[:MAX_STATEMENTS]
            if isinstance(s, dict)
        ]
    values = body.get("measurements")
    if isinstance(values, dict):
        numbers: dict[str, float] = {}
        for name in MEASUREMENTS:
            value = values.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                numbers[name] = float(value)
        if numbers:
            out["measurements"] = common_pb2.EcgMeasurements(**numbers)
            edited = body.get("measurements_edited")
            if isinstance(edited, list):
                out["measurements_edited"] = [str(n) for n in edited if n in numbers]
    return out
