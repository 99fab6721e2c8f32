"""The results client of requesting sites: the ``teleread results`` command.

Owns ``results pull`` (ListResults page by page after a cursor; each result written as JSON to
``DIR/<cursor>-<exam_id>.json`` before the cursor file moves on, both atomically, so a re-run
resumes without gaps or duplicates) and ``results watch`` (WatchResults, printed as they come,
critical results loudly; reconnects after a cut from the last cursor seen).
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

from teleread.client import add_connection_args, atomic_write_text, ring_alert, rpc_command, watch_with_reconnect
from teleread.errors import InvalidInput, TelereadError
from teleread.v1 import results_pb2, results_pb2_grpc

log = logging.getLogger("teleread.reader.clients.results_client")

DEFAULT_PAGE = 100
WATCH_DEADLINE = 3600.0
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


def pull_results(
    stub: results_pb2_grpc.ResultsStub,
    *,
    after_cursor: int,
    out_dir: Path,
    cursor_file: Path | None = None,
    limit: int = DEFAULT_PAGE,
    timeout: float = 30.0,
    console: Console | None = None,
    on_result: Callable[[results_pb2.Result, Path], None] | None = None,
) -> tuple[int, int]:
    """Pull every result after ``after_cursor`` into ``out_dir``; (results written, last cursor).
    ``on_result`` runs after each result's JSON file is written (e.g. a printable copy, an alert).
    The cursor file is saved after each page's files are on disk."""
    cursor, written = after_cursor, 0
    while True:
        request = results_pb2.ListResultsRequest(after_cursor=cursor, limit=limit)
        page = stub.ListResults(request, timeout=timeout)
        if not page.results:
            return written, cursor
        for result in page.results:
            document = json_format.MessageToDict(result)
            atomic_write_text(out_dir / result_file_name(result), json.dumps(document, indent=2))
            if on_result is not None:
                on_result(result, out_dir / result_file_name(result))
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
    add_connection_args(pull)
    pull.set_defaults(func=pull_command)
    watch = sub.add_parser("watch", help="print results as they are signed")
    watch.add_argument("--cursor", type=int, default=0, help="start after this cursor")
    watch.add_argument("--max", type=int, default=None, metavar="N", help="stop after N results")
    watch.add_argument("--deadline", type=float, default=WATCH_DEADLINE, help=argparse.SUPPRESS)
    add_connection_args(watch)
    watch.set_defaults(func=watch_command)
    return parser
