"""JSON logging with request context.

Log records are one JSON object a line, with the request id, site, RPC, status and duration taken
from a context variable set by the gRPC interceptor. Only our own messages and a fixed set of
fields are written: never patient names, IDs, birth dates or a parser's exception text.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, Iterator
from contextlib import contextmanager

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("teleread_log_ctx")

_ALLOWED_EXTRA = (
    "request_id",
    "site",
    "user",
    "rpc",
    "status",
    "duration_ms",
    "exam_id",
    "object_id",
    "upload_id",
    "reason",
    "level",
    "count",
    "bytes",
    "state",
    "event",
    "specialty",
    # the station's access log and sign-in (never a query string, a body or a password)
    "method",
    "route",
    "client",
    "why",
    "known_user",
)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to every log record emitted inside the block (same thread or task)."""
    current = dict(_context.get({}))
    current.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


def context_fields() -> dict[str, Any]:
    return dict(_context.get({}))


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line; exception text is replaced by its type name only."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # Third-party messages can quote parsed data: only our own text is written.
            "msg": record.getMessage() if record.name.startswith("teleread") else "(message withheld)",
        }
        out.update(context_fields())
        for key in _ALLOWED_EXTRA:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send all logs as JSON to ``stream`` (stderr by default); silence chatty libraries."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("pydicom", "pynetdicom", "urllib3", "alembic", "sqlalchemy", "minio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # pynetdicom logs query identifiers (patient names) unless told not to
        from pynetdicom import _config as netdicom_config

        netdicom_config.LOG_REQUEST_IDENTIFIERS = False
        netdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    except ImportError:  # pragma: no cover - pynetdicom is a dependency
        pass
