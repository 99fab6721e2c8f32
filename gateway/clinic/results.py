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
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

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
