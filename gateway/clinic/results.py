"""Results back to the clinic: the gateway pulls its site's signed reports after a saved cursor,
writes each one where the clinic can read and print it, and raises critical results loudly.

For every result, ``<results dir>/<cursor>-<exam>.json`` (the full result, as ``teleread results
pull`` writes it), ``<cursor>-<exam>.txt`` (a plain-text report) and ``<cursor>-<exam>.pdf`` (the
printable A4 report, see ``gateway/clinic/report_pdf.py``) are written atomically before the cursor
advances, so a crash repeats at most one page and never skips a result. The PDF is a convenience
copy: when it cannot be rendered the failure is logged at ERROR (its type only) and the JSON and
text copies, the critical alert and the cursor go on as before. The PDF's font (the ``report_font``
setting, or Debian's fonts-wqy-zenhei when unset) is looked for once when the inbox is made, and a
missing one is logged at WARNING then, with the setting and the package to install; it is looked
for again at every report, so installing the package later needs no restart.

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
from teleread.gateway.clinic.report_pdf import ReportFontMissing, find_report_font, render_report_pdf
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
    def __init__(
        self, folder: Path, *, hook: str = "", hook_timeout: float = 30.0, report_font: Path | None = None
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cursor_file = self.folder / ".cursor"
        self.hook = hook
        self.hook_timeout = hook_timeout
        self.report_font = report_font
        try:
            find_report_font(report_font)
        except ReportFontMissing as exc:  # the JSON and text reports still work: warn, do not stop
            log.warning("PDF reports will not be written: %s", exc.message, extra={"reason": exc.reason})

    def _on_result(self, result: Any, json_path: Path) -> None:
        """Write the text and PDF reports beside the JSON; raise a critical result."""
        text_path = json_path.with_suffix(".txt")
        atomic_write_text(text_path, printable(result))
        pdf_path: Path | None = json_path.with_suffix(".pdf")
        try:
            render_report_pdf(result, pdf_path, font=self.report_font)
        except Exception as exc:  # any rendering failure: the JSON and text copies stand
            # the type only: a library's message can quote the report
            log.error(
                "PDF report not written; the JSON and text reports are kept",
                extra={"exam_id": result.exam.exam_id, "reason": type(exc).__name__},
            )
            pdf_path = None
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
        )
        return written
