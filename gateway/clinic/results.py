"""Results back to the clinic: the gateway pulls its site's signed reports after a saved cursor,
writes each one where the clinic can read and print it, and raises critical results loudly.

For every result, ``<results dir>/<cursor>-<exam>.json`` (the full result, as ``teleread results
pull`` writes it), ``<cursor>-<exam>.txt`` (a plain-text report) and ``<cursor>-<exam>.pdf`` (the
printed A4 report as the hub rendered it, checked against its size and SHA-256; the gateway renders
nothing and needs no font) are written atomically before the cursor advances, so a crash repeats at
most one page and never skips a result. A PDF the hub cannot give (no font at the hub) is logged at
ERROR with the hub's reason and the JSON and text copies, the critical alert and the cursor go on;
a fetch the link cut, or bytes that do not verify, stop the poll before the cursor moves, and the
next poll fetches it again.

A critical result is logged at ERROR and, when configured, passed to a hook command (e.g. a pager
or a printer script): ``HOOK <report.txt> [<report.pdf>]``, the text report first, then the PDF
when it was written. The hook's failure is logged and never blocks the next result.

A critical result waits for a named person at the clinic: until then ``gateway status`` lists it
and exits non-zero (:func:`pending_critical`), and ``teleread gateway ack CURSOR --name ... --role
... --method phone --read-back ...`` sends the acknowledgement to the hub (``AcknowledgeCritical``)
and writes ``<cursor>-<exam>.ack.json`` beside the result (:func:`acknowledge`): the hub's answer,
so the record of who read it back stays at the clinic too. A result the hub says was acknowledged
already (by another door) gets its file from the hub's copy.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from teleread.client import atomic_write_text
from teleread.reader.clients.results_client import pull_results, read_cursor

log = logging.getLogger("teleread.gateway.clinic.results")


def printable(result: Any) -> str:
    """The report as plain text for the clinic's printer."""
    r = result.report
    signed = r.signed_at.ToDatetime().strftime("%Y-%m-%d %H:%M UTC") if r.HasField("signed_at") else "-"
    lines = []
    if result.critical:
        lines += ["*** CRITICAL RESULT: ACT NOW AND ACKNOWLEDGE ***", ""]
    lines += [
        f"Exam: {result.exam.exam_id}   Modality: {result.exam.modality or '-'}",
        f"Report version {r.version} ({r.status}), signed by {r.signed_by or '-'} at {signed}",
    ]
    if r.amends_reason:
        lines.append(f"Amended: {r.amends_reason}")
    lines += ["", "Findings:", r.text or "-", "", "Impression:", r.impression or "-", ""]
    lines.append(f"Report SHA-256: {r.sha256 or '-'}")
    return "\n".join(lines) + "\n"


class ResultsInbox:
    def __init__(self, folder: Path, *, hook: str = "", hook_timeout: float = 30.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cursor_file = self.folder / ".cursor"
        self.hook = hook
        self.hook_timeout = hook_timeout

    def _on_result(self, result: Any, json_path: Path, pdf_path: Path | None) -> None:
        """Write the text report beside the JSON (and the hub's PDF); raise a critical result."""
        text_path = json_path.with_suffix(".txt")
        atomic_write_text(text_path, printable(result))
        if not result.critical:
            return
        log.error("CRITICAL RESULT received", extra={"exam_id": result.exam.exam_id})
        if self.hook:
            command = [self.hook, str(text_path)] + ([str(pdf_path)] if pdf_path is not None else [])
            try:
                subprocess.run(command, timeout=self.hook_timeout, check=True)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("critical-result hook failed", extra={"reason": type(exc).__name__})

    def poll(self, stub: Any) -> int:
        """Fetch every result after the saved cursor; return how many were written."""
        written, _ = pull_results(
            stub,
            after_cursor=read_cursor(self.cursor_file),
            out_dir=self.folder,
            cursor_file=self.cursor_file,
            on_result=self._on_result,
            pdf=True,
        )
        return written


ACK_SUFFIX = ".ack.json"


@dataclass(frozen=True)
class PendingCritical:
    cursor: int
    exam_id: str
    published_at: str
    path: Path


def pending_critical(folder: Path) -> list[PendingCritical]:
    """The critical results in ``folder`` that no one at the clinic has acknowledged, oldest first."""
    pending = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.name.endswith(ACK_SUFFIX) or path.with_name(path.stem + ACK_SUFFIX).exists():
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not a result file
        if document.get("critical"):
            exam_id = str(document.get("exam", {}).get("examId", ""))
            cursor, published = int(document.get("cursor", 0)), str(document.get("publishedAt", ""))
            pending.append(PendingCritical(cursor, exam_id, published, path))
    return sorted(pending, key=lambda p: p.cursor)


def acknowledge(stub: Any, folder: Path, *, cursor: int, name: str, role: str, method: str, read_back: str) -> Path:
    """Send a named person's acknowledgement of critical result ``cursor`` to the hub and keep the
    hub's answer beside the result; the path of that record."""
    from teleread.v1 import results_pb2

    result_file = next((p for p in pending_critical(folder) if p.cursor == cursor), None)
    if result_file is None:
        raise LookupError(f"no unacknowledged critical result with cursor {cursor} in {folder}")
    request = results_pb2.AcknowledgeCriticalRequest(cursor=cursor, name=name, role=role, method=method,
                                                     read_back=read_back)  # fmt: skip
    try:
        answer = stub.AcknowledgeCritical(request, timeout=30)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        answer = stub.GetResult(results_pb2.GetResultRequest(exam_id=result_file.exam_id), timeout=30)
        if answer.cursor != cursor or not answer.HasField("acknowledgement"):
            raise
    record = result_file.path.with_name(result_file.path.stem + ACK_SUFFIX)
    atomic_write_text(record, json.dumps(json_format.MessageToDict(answer.acknowledgement), indent=2))
    log.info("critical result acknowledged", extra={"exam_id": result_file.exam_id})
    return record
