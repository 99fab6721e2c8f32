"""The reading-queue client: the ``teleread read`` command of cardiologists and radiologists.

Owns the sub-subcommands over the Worklist service: ``worklist`` (the queue as a table), ``next``
and ``claim`` (a claim with its fencing token; ``claim --amend`` claims a reported exam for
amendment), ``show`` (triage findings with their evidence, objects, reports), ``report``, ``sign``,
``amend`` (a new version of a signed report, with a reason), ``release``, ``fetch`` (an object's
bytes to a file, SHA-256 checked client-side) and ``watch`` (live queue with loud critical alerts).
Fences of claims are remembered in ``~/.config/teleread/claims.json`` so ``sign EXAM_ID`` and
``amend EXAM_ID`` need no --fence; ``amend`` without a remembered claim amends as the signer.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teleread.client import (
    add_connection_args,
    atomic_write_text,
    ring_alert,
    rpc_command,
    watch_with_reconnect,
    worklist_changes,
)
from teleread.errors import IntegrityError, TelereadError
from teleread.files import HashingWriter, atomic_file
from teleread.v1 import common_pb2, worklist_pb2, worklist_pb2_grpc

log = logging.getLogger("teleread.reader.clients.queue_client")

CLAIMS_FILE = Path(".config") / "teleread" / "claims.json"  # under the user's home
FETCH_TIMEOUT = 3600.0
WATCH_DEADLINE = 3600.0
_LEVEL_STYLE = {"CRITICAL": "bold red", "URGENT": "yellow", "ROUTINE": "green"}
_Event = worklist_pb2.WorklistEvent


def enum_label(enum: Any, value: int, prefix: str) -> str:
    """An enum value's name without its prefix; the number for a value newer than this client."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def level_name(level: int) -> str:
    """``CRITICAL`` / ``URGENT`` / ``ROUTINE``; ``-`` when not triaged."""
    return enum_label(common_pb2.Level, level, "LEVEL_") if level else "-"


def styled_level(level: int) -> str:
    name = level_name(level)
    style = _LEVEL_STYLE.get(name)
    return f"[{style}]{name}[/]" if style else name


def format_time(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def time_left(deadline: Timestamp, *, now: datetime | None = None) -> str:
    """Time to a deadline as ``1h05m`` / ``12m`` / ``45s``, or ``overdue 12m``."""
    if not deadline.seconds:
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = int((deadline.ToDatetime(tzinfo=timezone.utc) - now).total_seconds())
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m" if minutes else f"{secs}s")
    return f"[bold red]overdue {text}[/]" if seconds < 0 else text


def exam_table(exams: Iterable[common_pb2.Exam], *, title: str) -> Table:
    table = Table(title=title)
    columns = ("level", "left", "modality", "site", "state", "score", "exam id", "summary")
    for column in columns:
        table.add_column(column, overflow="fold")
    for exam in exams:
        table.add_row(
            styled_level(exam.triage.level),
            time_left(exam.deadline),
            exam.modality or "-",
            escape(exam.site),
            exam.state,
            f"{exam.triage.score:.2f}",
            exam.exam_id,
            escape(exam.triage.summary),
        )
    return table


class ClaimStore:
    """Fences of this reader's claims, keyed by exam id, in a small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def fence(self, exam_id: str) -> int | None:
        return self._load().get(exam_id)

    def remember(self, exam_id: str, fence: int) -> None:
        claims = self._load()
        claims[exam_id] = fence
        atomic_write_text(self.path, json.dumps(claims, indent=2), mode=0o600)

    def forget(self, exam_id: str) -> None:
        claims = self._load()
        if claims.pop(exam_id, None) is not None:
            atomic_write_text(self.path, json.dumps(claims, indent=2), mode=0o600)


def _claims(args: argparse.Namespace) -> ClaimStore:
    return ClaimStore(args.claims_file or Path.home() / CLAIMS_FILE)


def _fence(args: argparse.Namespace) -> int:
    fence = args.fence if args.fence is not None else _claims(args).fence(args.exam_id)
    if fence is None:
        raise TelereadError("no fence for this exam: pass --fence N", reason="NO_FENCE")
    return int(fence)


def _stub(channel: grpc.Channel) -> worklist_pb2_grpc.WorklistStub:
    return worklist_pb2_grpc.WorklistStub(channel)


@rpc_command
def worklist_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.ListWorklistRequest(limit=args.limit, include_claimed=args.all)
    response = _stub(channel).ListWorklist(request, timeout=args.timeout)
    Console().print(exam_table(response.exams, title=f"Worklist ({len(response.exams)})"))
    return 0


NEAR_SHARE = 0.8  # the hub's warning: 80 % of an exam's reading time gone (reader/hub/sla.py)


def sla_status(
    exams: Iterable[common_pb2.Exam], *, now: datetime
) -> tuple[list[common_pb2.Exam], list[common_pb2.Exam]]:
    """The exams past their reading deadline, and those past 80 % of their reading time, each most
    overdue (or nearest) first."""
    breached, near = [], []
    for exam in exams:
        if not exam.deadline.seconds or not exam.received_at.seconds:
            continue
        deadline = exam.deadline.ToDatetime(tzinfo=timezone.utc)
        arrived = exam.received_at.ToDatetime(tzinfo=timezone.utc)
        if now >= deadline:
            breached.append(exam)
        elif now >= arrived + (deadline - arrived) * NEAR_SHARE:
            near.append(exam)

    def by_deadline(e: common_pb2.Exam) -> int:
        return int(e.deadline.seconds)

    return sorted(breached, key=by_deadline), sorted(near, key=by_deadline)


@rpc_command
def sla_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.ListWorklistRequest(limit=args.limit, include_claimed=True)
    response = _stub(channel).ListWorklist(request, timeout=args.timeout)
    breached, near = sla_status(response.exams, now=datetime.now(timezone.utc))
    console = Console()
    console.print(exam_table(breached, title=f"Past the reading deadline ({len(breached)})"))
    console.print(exam_table(near, title=f"Past 80 % of the reading time ({len(near)})"))
    return 1 if breached else 0


def _print_claim(args: argparse.Namespace, claim: worklist_pb2.Claim) -> int:
    _claims(args).remember(claim.exam.exam_id, claim.fence)
    console = Console()
    console.print(exam_table([claim.exam], title="Claimed"))
    console.print(f"fence {claim.fence}, lease until {format_time(claim.lease_expires_at)}")
    return 0


@rpc_command
def next_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.ClaimNextRequest(lease_seconds=args.lease)
    return _print_claim(args, _stub(channel).ClaimNext(request, timeout=args.timeout))


@rpc_command
def claim_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.ClaimExamRequest(exam_id=args.exam_id, lease_seconds=args.lease, for_amendment=args.amend)
    return _print_claim(args, _stub(channel).ClaimExam(request, timeout=args.timeout))


def _print_triage(console: Console, triage: common_pb2.Triage) -> None:
    console.print(
        f"triage: {styled_level(triage.level)} score {triage.score:.2f} "
        f"(rules {escape(triage.rules_version or '-')}, at {format_time(triage.triaged_at)})"
    )
    if triage.models:
        console.print(f"models: {escape(', '.join(triage.models))}")
    if triage.summary:
        console.print(f"summary: {escape(triage.summary)}")
    for finding in triage.findings:
        console.print(f"  {styled_level(finding.level)} {finding.code}: {escape(finding.title)}")
        for ev in finding.evidence:
            lead = f" lead {ev.lead}" if ev.lead else ""
            console.print(f"      {ev.name} = {ev.value:g} {ev.unit}{lead} (threshold {ev.threshold:g})")


def _print_details(console: Console, details: worklist_pb2.ExamDetails) -> None:
    exam = details.exam
    console.print(
        f"[bold]exam {exam.exam_id}[/] site {escape(exam.site)} {exam.modality} "
        f"state {exam.state} specialty {exam.specialty or '-'}"
    )
    priority = enum_label(common_pb2.Priority, exam.priority, "PRIORITY_").lower()
    console.print(
        f"priority {priority}, received "
        f"{format_time(exam.received_at)}, deadline {format_time(exam.deadline)} "
        f"({time_left(exam.deadline)}), claimed by {escape(exam.claimed_by or '-')}"
    )
    if exam.indication:
        console.print(f"indication: {escape(exam.indication)}")
    if exam.incomplete:
        console.print(
            f"[bold yellow]INCOMPLETE[/]: the hub refused {exam.refused_count} instance(s) of this exam at upload;"
            " the clinic has been told"
        )
    for other in details.related:
        how = "follows this exam" if other.follow_up_of == exam.exam_id else "same study"
        if exam.follow_up_of == other.exam_id:
            how = "this exam follows it"
        console.print(f"related exam {other.exam_id} ({how}): {other.object_count} object(s), state {other.state}")
    _print_triage(console, exam.triage)
    objects = Table(title="Objects")
    for column in ("object id", "role", "modality", "size", "sha256"):
        objects.add_column(column)
    for obj in details.objects:
        objects.add_row(obj.object_id, obj.role, obj.modality or "-", str(obj.size), obj.sha256[:16])
    console.print(objects)
    for report in details.reports:
        flag = " [bold red]CRITICAL[/]" if report.critical else ""
        console.print(
            f"[bold]report v{report.version} {report.status}[/]{flag} by "
            f"{escape(report.author)} signed by {escape(report.signed_by or '-')} "
            f"{format_time(report.signed_at)}"
        )
        console.print(escape(report.text))
        if report.impression:
            console.print(f"impression: {escape(report.impression)}")


@rpc_command
def show_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.GetExamDetailsRequest(exam_id=args.exam_id)
    _print_details(Console(), _stub(channel).GetExamDetails(request, timeout=args.timeout))
    return 0


@rpc_command
def report_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.SaveReportRequest(
        exam_id=args.exam_id,
        fence=_fence(args),
        text=args.text,
        impression=args.impression,
        critical=args.critical,
    )
    report = _stub(channel).SaveReport(request, timeout=args.timeout)
    Console().print(f"draft v{report.version} saved ({report.status})")
    return 0


@rpc_command
def sign_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.SignReportRequest(exam_id=args.exam_id, fence=_fence(args))
    report = _stub(channel).SignReport(request, timeout=args.timeout)
    _claims(args).forget(args.exam_id)
    Console().print(
        f"report v{report.version} {report.status}, signed by {escape(report.signed_by)}, sha256 {report.sha256}"
    )
    return 0


@rpc_command
def amend_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    """Amend a signed report: with the remembered (or given) fence of a claim for amendment, or as
    the signer without a claim (no remembered fence, or ``--fence 0``)."""
    fence = args.fence if args.fence is not None else (_claims(args).fence(args.exam_id) or 0)
    request = worklist_pb2.AmendReportRequest(
        exam_id=args.exam_id,
        fence=fence,
        reason=args.reason,
        text=args.text,
        impression=args.impression,
        critical=args.critical,
    )
    report = _stub(channel).AmendReport(request, timeout=args.timeout)
    _claims(args).forget(args.exam_id)
    Console().print(
        f"report v{report.version} {report.status} by {escape(report.signed_by)} "
        f"({escape(report.amends_reason)}), sha256 {report.sha256}"
    )
    return 0


@rpc_command
def release_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    request = worklist_pb2.ReleaseClaimRequest(exam_id=args.exam_id, fence=_fence(args))
    _stub(channel).ReleaseClaim(request, timeout=args.timeout)
    _claims(args).forget(args.exam_id)
    Console().print(f"released {args.exam_id}")
    return 0


def _expected_sha256(stub: worklist_pb2_grpc.WorklistStub, args: argparse.Namespace) -> str:
    request = worklist_pb2.GetExamDetailsRequest(exam_id=args.exam_id)
    details = stub.GetExamDetails(request, timeout=args.timeout)
    for obj in details.objects:
        if obj.object_id == args.object_id:
            return str(obj.sha256)
    raise TelereadError("object not listed in the exam", reason="OBJECT_NOT_FOUND")


def _stream_to(chunks: Iterable[worklist_pb2.ObjectChunk], out: BinaryIO) -> tuple[str, str, int]:
    """Write chunks in order; (announced sha256, computed sha256, bytes written)."""
    writer, announced = HashingWriter(out), ""
    for chunk in chunks:
        if chunk.offset and chunk.offset != writer.size:
            raise IntegrityError("object chunks out of order", reason="CHUNK_OFFSET")
        announced = announced or chunk.sha256
        writer.write(chunk.data)
    actual = writer.digest()
    return announced, actual.sha256, actual.size


@rpc_command
def fetch_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub = _stub(channel)
    out: Path = args.out
    request = worklist_pb2.StreamObjectRequest(exam_id=args.exam_id, object_id=args.object_id)
    with atomic_file(out) as part:  # only verified bytes replace the file
        chunks = stub.StreamObject(request, timeout=FETCH_TIMEOUT)
        announced, actual, size = _stream_to(chunks, part)
        expected = announced or _expected_sha256(stub, args)
        if actual != expected.lower():
            raise IntegrityError("fetched bytes do not match the object's SHA-256")
    Console().print(f"wrote {size} bytes to {escape(str(out))} (sha256 verified)")
    return 0


def _event_line(console: Console, event: worklist_pb2.WorklistEvent) -> None:
    exam = event.exam
    kind = enum_label(_Event.Type, event.type, "TYPE_")
    console.print(
        f"{format_time(event.at)} {kind:<9} {styled_level(exam.triage.level)} {exam.exam_id} "
        f"{exam.modality or '-'} {escape(exam.site)} {exam.state} {escape(exam.triage.summary)}"
    )
    if event.type == _Event.TYPE_CRITICAL:
        ring_alert(
            console,
            f"Critical exam {exam.exam_id} ({exam.modality}, site {exam.site}): {exam.triage.summary or 'see triage'}",
        )


def _follow(
    stream: Any, console: Console, *, args: argparse.Namespace, seen: list[int], progressed: Callable[[], None]
) -> bool:
    """Print one Watch stream; True once the requested output is complete."""
    snapshot: list[common_pb2.Exam] = []
    for event in (change for message in stream for change in worklist_changes(message)):
        if event.type == _Event.TYPE_SNAPSHOT:
            snapshot.append(event.exam)
        elif event.type == _Event.TYPE_SNAPSHOT_END:
            console.print(exam_table(snapshot, title=f"Queue ({len(snapshot)})"))
            if args.once_snapshot:
                return True
        else:
            _event_line(console, event)
            seen[0] += 1
            if args.max_events is not None and seen[0] >= args.max_events:
                return True
    progressed()  # the stream ended, not cut: the next cut starts the backoff again
    return False


@rpc_command
def watch_command(args: argparse.Namespace, channel: grpc.Channel) -> int:
    """Follow the queue; reconnects (new snapshot) after a cut with capped backoff."""
    console, seen = Console(), [0]
    return watch_with_reconnect(
        lambda: _stub(channel).Watch(worklist_pb2.WatchWorklistRequest(change_batches=True), timeout=args.deadline),
        lambda stream, progressed: _follow(stream, console, args=args, seen=seen, progressed=progressed),
        console=console,
        what="watch",
    )


def _add(sub: Any, name: str, handler: Any, *, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    add_connection_args(parser)
    parser.add_argument(
        "--claims-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="claim fences file (default ~/.config/teleread/claims.json)",
    )
    parser.set_defaults(func=handler)
    return parser


def _add_claim_commands(sub: Any) -> None:
    for name, handler, help_text in (
        ("next", next_command, "claim the most urgent exam of your specialty"),
        ("claim", claim_command, "claim one exam"),
    ):
        parser = _add(sub, name, handler, help_text=help_text)
        if name == "claim":
            parser.add_argument("exam_id", metavar="EXAM_ID")
            parser.add_argument("--amend", action="store_true", help="claim a reported exam to amend its report")
        parser.add_argument("--lease", type=int, default=0, help="lease seconds (server default)")
    for name, handler, help_text in (
        ("report", report_command, "save a draft report"),
        ("sign", sign_command, "sign the current draft"),
        ("amend", amend_command, "amend a signed report (the signer, or with a claim --amend)"),
        ("release", release_command, "give the exam back to the queue (or drop a claim for amendment)"),
    ):
        parser = _add(sub, name, handler, help_text=help_text)
        parser.add_argument("exam_id", metavar="EXAM_ID")
        fence_help = "default: the remembered one" + ("; 0 or none: as the signer, no claim" if name == "amend" else "")
        parser.add_argument("--fence", type=int, default=None, help=fence_help)
        if name == "amend":
            parser.add_argument("--reason", required=True, help="why the signed report is amended (shown to the site)")
        if name in ("report", "amend"):
            parser.add_argument("--text", required=True)
            parser.add_argument("--impression", default="")
            parser.add_argument("--critical", action="store_true", help="a critical result")


def add_read_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``teleread read <worklist|sla|next|claim|show|report|sign|amend|release|fetch|watch>``."""
    parser: argparse.ArgumentParser = subparsers.add_parser("read", help="the reading queue")
    sub = parser.add_subparsers(dest="read_command", required=True, metavar="COMMAND")
    worklist = _add(sub, "worklist", worklist_command, help_text="your queue, most urgent first")
    worklist.add_argument("--limit", type=int, default=50)
    worklist.add_argument("--all", action="store_true", help="include claimed exams")
    _add_claim_commands(sub)
    sla = _add(
        sub, "sla", sla_command, help_text="breaches and near-breaches of the reading deadline; exit 1 on a breach"
    )
    sla.add_argument("--limit", type=int, default=1000, help="the most urgent exams looked at")
    show = _add(sub, "show", show_command, help_text="exam details, triage evidence, reports")
    show.add_argument("exam_id", metavar="EXAM_ID")
    fetch = _add(sub, "fetch", fetch_command, help_text="download an object, SHA-256 verified")
    fetch.add_argument("exam_id", metavar="EXAM_ID")
    fetch.add_argument("object_id", metavar="OBJECT_ID")
    fetch.add_argument("--out", type=Path, required=True, metavar="FILE")
    watch = _add(sub, "watch", watch_command, help_text="live queue with critical alerts")
    watch.add_argument("--once-snapshot", action="store_true", help="stop after the snapshot")
    watch.add_argument("--max-events", type=int, default=None, metavar="N")
    watch.add_argument("--deadline", type=float, default=WATCH_DEADLINE, help=argparse.SUPPRESS)
    return parser
