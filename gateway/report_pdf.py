"""Printable PDF of a signed report, for the clinic that requested the exam.

``render_report_pdf(result, path)`` lays one result out on A4 pages: a header on every page (site
and exam ids, and a red CRITICAL mark for a critical result), a boxed red banner on the first page
for a critical result, an "Amended report" note with its reason when the report replaces an earlier
version, the exam details, Findings and Impression with their line breaks kept, the signer and the
signing time in UTC, and on every page's foot the report's SHA-256 in small print and "page X of Y".

Report text is often Chinese: every piece of text that comes from the exam or the report is set in
``STSong-Light``, one of the Adobe CID fonts built into reportlab and into PDF viewers, so nothing
has to be installed or embedded. The text is cleaned of control characters and escaped before it
reaches reportlab's paragraph markup, so ``<`` or ``&`` in a report is printed as written.

The whole document is rendered in memory first and then written atomically (a temporary file in
the same folder, fsync'd, then renamed over the target): a failed rendering leaves no file at all,
and a reader or a printer never sees half a PDF.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from google.protobuf.timestamp_pb2 import Timestamp
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from teleread.client import atomic_write_bytes
from teleread.v1 import common_pb2, results_pb2

CJK_FONT = "STSong-Light"  # Adobe-GB1 CID font built into reportlab: no font file needed
LABEL_FONT = "Helvetica-Bold"
HASH_FONT = "Courier"
PAGE_SIZE = A4
MARGIN_X = 18 * mm
MARGIN_TOP = 24 * mm
MARGIN_BOTTOM = 20 * mm
CRITICAL_RED = colors.HexColor("#C00000")
AMENDED_AMBER = colors.HexColor("#B45F06")
TITLE = "teleread \u2014 Signed report"

_ACRONYMS = {"ECG", "STAT"}
_SUBSTITUTES = str.maketrans(
    {"\u00b7": "\u30fb", "\u2022": "\u30fb", "\u2027": "\u30fb", "\u2219": "\u30fb", "\u22c5": "\u30fb", "\u00a0": " "}
)
# C0 controls (except tab and newline), DEL and C1 controls: not printable, and some break the markup
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@functools.cache
def _register_fonts() -> None:
    pdfmetrics.registerFont(UnicodeCIDFont(CJK_FONT))


def _clean(text: str) -> str:
    """Newlines normalised, control characters dropped, and the few common characters the CID
    font's Unicode map lacks (middle dots, bullets, no-break space) replaced by ones it has."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).translate(_SUBSTITUTES)


def _markup(text: str) -> str:
    """User text as safe paragraph markup: printed as written, never read as tags."""
    return escape(_clean(text))


def _utc(stamp: Timestamp, present: bool) -> str:
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M UTC") if present else "-"


def _enum_label(enum: Any, value: int, prefix: str) -> str:
    """``EXAM_KIND_IMAGING`` -> ``Imaging``, ``PRIORITY_STAT`` -> ``STAT``; an unknown value as its number."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    label = name.removeprefix(prefix)
    if label == "UNSPECIFIED":
        return "-"
    return label if label in _ACRONYMS else label.replace("_", " ").capitalize()


class _Styles:
    def __init__(self) -> None:
        _register_fonts()
        self.body = ParagraphStyle("body", fontName=CJK_FONT, fontSize=10.5, leading=15, wordWrap="CJK")
        self.value = ParagraphStyle("value", parent=self.body, fontSize=9.5, leading=13)
        self.label = ParagraphStyle("label", fontName=LABEL_FONT, fontSize=8.5, leading=13, textColor=colors.grey)
        self.title = ParagraphStyle("title", fontName=LABEL_FONT, fontSize=16, leading=20, spaceAfter=2 * mm)
        self.section = ParagraphStyle(
            "section", fontName=LABEL_FONT, fontSize=11.5, leading=15, spaceBefore=5 * mm, spaceAfter=1.5 * mm
        )
        self.banner = ParagraphStyle(
            "banner", fontName=LABEL_FONT, fontSize=14, leading=18, alignment=TA_CENTER, textColor=colors.white
        )
        self.banner_cjk = ParagraphStyle("banner_cjk", parent=self.banner, fontName=CJK_FONT, fontSize=12, leading=16)
        self.note = ParagraphStyle("note", parent=self.body, textColor=AMENDED_AMBER)


def _cjk(text: str) -> str:
    """Inline markup that sets a short fixed Chinese label in the CID font."""
    return f'<font name="{CJK_FONT}">{text}</font>'


def _text_block(text: str, style: ParagraphStyle) -> list[Any]:
    """One paragraph per line, so line breaks are kept and a long text splits across pages; a
    line's leading spaces become an indent (a tab counts as four)."""
    cleaned = _clean(text).expandtabs(4)
    lines = cleaned.split("\n") if cleaned.strip() else ["-"]
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[Any] = []
    for line in lines:
        body = line.lstrip(" ")
        if not body:
            out.append(Spacer(1, style.leading * 0.6))
            continue
        indent = len(line) - len(body)
        out.append(Paragraph(escape(body), _indented(style, indent) if indent else style))
    return out


def _indented(style: ParagraphStyle, spaces: int) -> ParagraphStyle:
    shift = min(spaces, 40) * style.fontSize * 0.5  # half an em: the width of a Latin space in the CJK font
    return ParagraphStyle(f"{style.name}+{spaces}", parent=style, leftIndent=shift)


def _critical_banner(styles: _Styles) -> Table:
    rows = [
        [Paragraph("CRITICAL RESULT \u2014 act now and acknowledge", styles.banner)],
        [Paragraph("危急值 \u2014 请立即处理并确认", styles.banner_cjk)],
    ]
    banner = Table(rows, colWidths=[PAGE_SIZE[0] - 2 * MARGIN_X])
    banner.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), CRITICAL_RED),
                ("BOX", (0, 0), (-1, -1), 2.5, colors.black),
                ("TOPPADDING", (0, 0), (-1, -1), 3 * mm),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 3 * mm),
            ]
        )
    )
    return banner


def _amended_note(report: common_pb2.Report, styles: _Styles) -> Table:
    reason = _markup(report.amends_reason) if report.amends_reason.strip() else "no reason recorded"
    note = Paragraph(
        f'<font name="{LABEL_FONT}">Amended report</font> {_cjk("更正报告")} (version {report.version}): '
        f"this version replaces an earlier signed report. Reason: {reason}",
        styles.note,
    )
    box = Table([[note]], colWidths=[PAGE_SIZE[0] - 2 * MARGIN_X])
    box.setStyle(
        TableStyle(
            [
                ("BOX", (0, 0), (-1, -1), 1.5, AMENDED_AMBER),
                ("TOPPADDING", (0, 0), (-1, -1), 2 * mm),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2 * mm),
            ]
        )
    )
    return box


def _details(result: results_pb2.Result, styles: _Styles) -> Table:
    exam, report = result.exam, result.report
    triage = "-"
    if exam.HasField("triage"):
        triage = _enum_label(common_pb2.Level, exam.triage.level, "LEVEL_")
    pairs = [
        ("Site", exam.site or "-"),
        ("Exam", exam.exam_id or "-"),
        ("Kind", _enum_label(common_pb2.ExamKind, exam.kind, "EXAM_KIND_")),
        ("Modality", exam.modality or "-"),
        ("Priority", _enum_label(common_pb2.Priority, exam.priority, "PRIORITY_")),
        ("Specialty", exam.specialty or "-"),
        ("Received", _utc(exam.received_at, exam.HasField("received_at"))),
        ("Published", _utc(result.published_at, result.HasField("published_at"))),
        ("Report", f"version {report.version} ({report.status or '-'})"),
        ("Automated triage", triage),
    ]
    if exam.study_instance_uid:
        pairs.append(("Study UID", exam.study_instance_uid))
    cells = [[Paragraph(label, styles.label), Paragraph(_markup(value), styles.value)] for label, value in pairs]
    rows = [cells[i] + (cells[i + 1] if i + 1 < len(cells) else ["", ""]) for i in range(0, len(cells), 2)]
    width = PAGE_SIZE[0] - 2 * MARGIN_X
    table = Table(rows, colWidths=[width * 0.16, width * 0.34, width * 0.16, width * 0.34])
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.lightgrey),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
            ]
        )
    )
    return table


def _signature(report: common_pb2.Report, styles: _Styles) -> list[Any]:
    signed = _utc(report.signed_at, report.HasField("signed_at"))
    out: list[Any] = [
        Paragraph("Signed", styles.section),
        Paragraph(f"Signed by {_markup(report.signed_by or '-')} at {signed}", styles.body),
    ]
    if report.author and report.author != report.signed_by:
        out.append(Paragraph(f"Written by {_markup(report.author)}", styles.body))
    return [KeepTogether(out)]


def _story(result: results_pb2.Result, styles: _Styles) -> list[Any]:
    exam, report = result.exam, result.report
    story: list[Any] = []
    if result.critical:
        story += [_critical_banner(styles), Spacer(1, 4 * mm)]
    story.append(Paragraph(TITLE, styles.title))
    if report.amends_reason or report.status == "amended" or report.version > 1:
        story += [_amended_note(report, styles), Spacer(1, 3 * mm)]
    story.append(_details(result, styles))
    if exam.indication.strip():
        story += [Paragraph("Clinical indication", styles.section), *_text_block(exam.indication, styles.body)]
    story += [Paragraph(f"Findings {_cjk('检查所见')}", styles.section), *_text_block(report.text, styles.body)]
    story += [Paragraph(f"Impression {_cjk('诊断意见')}", styles.section), *_text_block(report.impression, styles.body)]
    story += _signature(report, styles)
    return story


def _font_for(text: str, latin: str) -> str:
    """``latin`` for plain ASCII (ids, hashes), the CID font for anything else."""
    return latin if text.isascii() else CJK_FONT


class _Decorations:
    """Header and foot of every page; the page count is drawn by ``_NumberedCanvas``."""

    def __init__(self, result: results_pb2.Result) -> None:
        self.ids = _clean(f"Site {result.exam.site or '-'}   Exam {result.exam.exam_id or '-'}")
        self.sha256 = _clean(f"Report SHA-256: {result.report.sha256 or '-'}")
        self.critical = result.critical

    def __call__(self, canvas: Any, doc: Any) -> None:
        width, height = PAGE_SIZE
        top = height - MARGIN_TOP + 8 * mm
        canvas.saveState()
        canvas.setFont(LABEL_FONT, 9)
        canvas.drawString(MARGIN_X, top, TITLE)
        if self.critical:
            canvas.setFillColor(CRITICAL_RED)
            canvas.drawString(MARGIN_X + pdfmetrics.stringWidth(TITLE, LABEL_FONT, 9) + 4 * mm, top, "CRITICAL RESULT")
            canvas.setFillColor(colors.black)
        canvas.setFont(_font_for(self.ids, "Helvetica"), 9)
        canvas.drawRightString(width - MARGIN_X, top, self.ids)
        canvas.setStrokeColor(colors.grey)
        canvas.setLineWidth(0.5)
        canvas.line(MARGIN_X, top - 2 * mm, width - MARGIN_X, top - 2 * mm)
        bottom = MARGIN_BOTTOM - 10 * mm
        canvas.line(MARGIN_X, bottom + 4 * mm, width - MARGIN_X, bottom + 4 * mm)
        canvas.setFont(_font_for(self.sha256, HASH_FONT), 6.5)
        canvas.setFillColor(colors.grey)
        canvas.drawString(MARGIN_X, bottom, self.sha256)
        canvas.restoreState()


class _NumberedCanvas(Canvas):
    """Keeps every page until the document ends, so each one can say "page X of Y"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held_pages: list[dict[str, Any]] = []

    def showPage(self) -> None:  # noqa: N802 (reportlab's name)
        self._held_pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        total = len(self._held_pages)
        for number, state in enumerate(self._held_pages, start=1):
            self.__dict__.update(state)
            self.setFont(LABEL_FONT, 7.5)
            self.setFillColor(colors.grey)
            self.drawRightString(PAGE_SIZE[0] - MARGIN_X, MARGIN_BOTTOM - 10 * mm, f"page {number} of {total}")
            super().showPage()
        super().save()


def report_pdf_bytes(result: results_pb2.Result) -> bytes:
    """The printable report of one result as PDF bytes."""
    styles = _Styles()
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=PAGE_SIZE,
        leftMargin=MARGIN_X,
        rightMargin=MARGIN_X,
        topMargin=MARGIN_TOP,
        bottomMargin=MARGIN_BOTTOM,
        title=f"teleread signed report, exam {_clean(result.exam.exam_id)}",
        author="teleread",
        creator="teleread",
        invariant=True,  # the same result always gives the same bytes
    )
    decorate = _Decorations(result)
    doc.build(_story(result, styles), onFirstPage=decorate, onLaterPages=decorate, canvasmaker=_NumberedCanvas)
    return buffer.getvalue()


def render_report_pdf(result: results_pb2.Result, path: Path) -> None:
    """Write the printable PDF report of ``result`` to ``path`` atomically."""
    atomic_write_bytes(Path(path), report_pdf_bytes(result))
