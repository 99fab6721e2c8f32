"""The results client of requesting sites: the ``teleread results`` command.

Owns ``results pull`` (ListResults page by page after a cursor; each result written as JSON to
``DIR/<cursor>-<exam_id>.json`` and its printed report, fetched from the hub with GetReportPdf and
checked against its size and SHA-256, to ``<cursor>-<exam_id>.pdf`` before the cursor file moves on,
all atomically, so a re-run resumes without gaps or duplicates; ``--no-pdf`` skips the PDF) and
``results watch`` (WatchResults, printed as they come, critical results loudly; reconnects after a
cut from the last cursor seen).

A PDF the hub cannot give (no font at the hub, say) is logged at ERROR and the pull goes on with
the JSON: a result, a critical one above all, never waits for its printout. A fetch cut by the link,
or bytes that do not verify, stop the pull before the cursor moves, so the next pull fetches it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape

from teleread.client import (
    add_connection_args,
    atomic_write_bytes,
    atomic_write_text,
    error_reason,
    ring_alert,
    rpc_code,
    rpc_command,
    watch_with_reconnect,
)
from teleread.errors import IntegrityError, InvalidInput, TelereadError
from teleread.files import sha256_hex
from teleread.v1 import common_pb2, results_pb2, results_pb2_grpc

log = logging.getLogger("teleread.reader.clients.results_client")

DEFAULT_PAGE = 100
WATCH_DEADLINE = 3600.0
MAX_PDF_BYTES = 64 * 1024 * 1024
# a PDF fetch that failed for one of these is tried again at the next pull (the cursor stays)
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
     grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN}
)  # fmt: skip
OnResult = Callable[[results_pb2.Result, Path, "Path | None"], None]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def result_file_name(result: results_pb2.Result) -> str:
    """``<cursor>-<exam_id>.json`` (the exam id reduced to safe file-name characters)."""
    exam_id = _UNSAFE.sub("_", result.exam.exam_id) or "exam"
    return f"{result.cursor}-{exam_id}.json"


def read_cursor(path: Path) -> int:
    """The cursor saved in ``path``; 0 when the file does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise InvalidInput("cursor file does not hold a cursor number", reason="BAD_CURSOR_FILE")
    return int(text)


def _start_cursor(args: argparse.Namespace) -> int:
    if args.cursor is not None:
        return int(args.cursor)
    return read_cursor(args.cursor_file) if args.cursor_file else 0


def print_result(console: Console, result: results_pb2.Result) -> None:
    exam, report = result.exam, result.report
    console.print(
        f"#{result.cursor} exam {exam.exam_id} {exam.modality or '-'} report v{report.version} "
        f"{report.status}: {escape(report.impression or report.text[:80])}"
    )
    if result.critical:
        ring_alert(
            console, f"Critical result for exam {exam.exam_id} ({exam.modality}): {report.impression or 'see report'}"
        )


def fetch_report_pdf(
    stub: Any,
    *,
    exam_id: str,
    version: int = 0,
    path: Path,
    expected_sha256: str = "",
    timeout: float = 60.0,
) -> common_pb2.ReportPdf:
    """Fetch a report version's PDF (``stub``: a Results or Worklist stub; version 0: the latest)
    into ``path`` atomically, after checking its size and SHA-256 (and ``expected_sha256``, the
    result's, when given); the PDF's SHA-256 and size. IntegrityError when the bytes do not verify."""
    data = bytearray()
    sha256, size = "", -1
    for chunk in stub.GetReportPdf(common_pb2.GetReportPdfRequest(exam_id=exam_id, version=version), timeout=timeout):
        if size < 0:
            sha256, size = chunk.sha256, int(chunk.size)
        if chunk.offset != len(data) or len(data) + len(chunk.data) > min(size, MAX_PDF_BYTES):
            raise IntegrityError("the printed report arrived out of order or too long", reason="PDF_MISMATCH")
        data += chunk.data
    if size < 0 or len(data) != size or sha256_hex(bytes(data)) != sha256:
        raise IntegrityError("the printed report does not match its size and SHA-256", reason="PDF_MISMATCH")
    if expected_sha256 and sha256 != expected_sha256:
        raise IntegrityError("the printed report is not the one the result names", reason="PDF_MISMATCH")
    atomic_write_bytes(path, bytes(data))
    return common_pb2.ReportPdf(sha256=sha256, size=size)


def _pull_pdf(stub: Any, result: results_pb2.Result, path: Path, *, timeout: float) -> Path | None:
    """The result's PDF written to ``path``, or None when the hub cannot give it (logged); a cut
    link or bytes that do not verify raise, so the cursor stays and the next pull tries again."""
    try:
        fetch_report_pdf(
            stub,
            exam_id=result.exam.exam_id,
            version=result.report.version,
            path=path,
            expected_sha256=result.pdf.sha256 if result.HasField("pdf") else "",
            timeout=timeout,
        )
    except grpc.RpcError as err:
        if rpc_code(err) in TRANSIENT:
            raise
        log.error(
            "PDF report not written; the JSON report is kept",
            extra={"exam_id": result.exam.exam_id, "reason": error_reason(err) or rpc_code(err).name},
        )
        return None
    return path


def pull_results(
    stub: results_pb2_grpc.ResultsStub,
    *,
    after_cursor: int,
    out_dir: Path,
    cursor_file: Path | None = None,
    limit: int = DEFAULT_PAGE,
    timeout: float = 30.0,
    console: Console | None = None,
    on_result: OnResult | None = None,
    pdf: bool = True,
) -> tuple[int, int]:
    """Pull every result after ``after_cursor`` into ``out_dir``; (results written, last cursor).
    With ``pdf`` each result's printed report is fetched beside its JSON (see the module's note).
    ``on_result(result, json_path, pdf_path or None)`` runs after each result's files are written
    (e.g. a printable text copy, an alert). The cursor file is saved after each page's files are on disk."""
    cursor, written = after_cursor, 0
    while True:
        request = results_pb2.ListResultsRequest(after_cursor=cursor, limit=limit)
        page = stub.ListResults(request, timeout=timeout)
        if not page.results:
            return written, cursor
        for result in page.results:
            document = json_format.MessageToDict(result)
            json_path = out_dir / result_file_name(result)
            atomic_write_text(json_path, json.dumps(document, indent=2))
            pdf_path = _pull_pdf(stub, result, json_path.with_suffix(".pdf"), timeout=timeout) if pdf else None
            if on_result is not None:
                on_result(result, json_path, pdf_path)
            if console is not None:
                print_result(console, result)
        last = max(result.cursor for result in page.results)
        if last <= cursor:
            raise TelereadError("the hub returned results at or before the cursor", reason="CURSOR_NOT_ADVANCING")
        cursor, written = last, written + len(page.results)
        if cursor_file is not None:
            atomic_write_text(cursor_file, f"{cursor}\n")
        log.info("results page saved", extra={"count": len(page.results)})


@rpc_command
def pull_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    console = Console()
    written, cursor = pull_results(
        results_pb2_grpc.ResultsStub(channel),
        after_cursor=_start_cursor(args),
        out_dir=args.out,
        cursor_file=args.cursor_file,
        limit=args.limit,
        timeout=args.timeout,
        console=console,
        pdf=not args.no_pdf,
    )
    console.print(f"{written} result(s) written to {escape(str(args.out))}; cursor {cursor}")
    return 0


def _follow(
    stream: Any, console: Console, state: dict[str, int], *, limit: int | None, progressed: Callable[[], None]
) -> bool:
    """Print one WatchResults stream; True once ``limit`` results were printed."""
    for result in stream:
        if result.cursor <= state["cursor"]:
            continue  # already printed before a reconnect
        print_result(console, result)
        state["cursor"], state["seen"] = result.cursor, state["seen"] + 1
        progressed()
        if limit is not None and state["seen"] >= limit:
            return True
    return False


@rpc_command
def watch_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    """Follow results; after a cut, reconnect from the last cursor printed."""
    stub, console = results_pb2_grpc.ResultsStub(channel), Console()
    state = {"cursor": int(args.cursor), "seen": 0}
    return watch_with_reconnect(
        lambda: stub.WatchResults(results_pb2.WatchResultsRequest(after_cursor=state["cursor"]), timeout=args.deadline),
        lambda stream, progressed: _follow(stream, console, state, limit=args.max, progressed=progressed),
        console=console,
        what="results watch",
    )


def add_results_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``teleread results <pull|watch>`` on an argparse subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser("results", help="signed results")
    sub = parser.add_subparsers(dest="results_command", required=True, metavar="COMMAND")
    pull = sub.add_parser("pull", help="pull results after a cursor into JSON files")
    where = pull.add_mutually_exclusive_group()
    where.add_argument("--cursor", type=int, default=None, help="start after this cursor")
    where.add_argument(
        "--cursor-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="read the start cursor from FILE and save progress there",
    )
    pull.add_argument("--limit", type=int, default=DEFAULT_PAGE, help="page size")
    pull.add_argument("--out", type=Path, default=Path("."), metavar="DIR")
    pull.add_argument("--no-pdf", action="store_true", help="do not fetch the printed reports (PDF)")
    add_connection_args(pull)
    pull.set_defaults(func=pull_command)
    watch = sub.add_parser("watch", help="print results as they are signed")
    watch.add_argument("--cursor", type=int, default=0, help="start after this cursor")
    watch.add_argument("--max", type=int, default=None, metavar="N", help="stop after N results")
    watch.add_argument("--deadline", type=float, default=WATCH_DEADLINE, help=argparse.SUPPRESS)
    add_connection_args(watch)
    watch.set_defaults(func=watch_command)
    return parser
