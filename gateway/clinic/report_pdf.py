"""Printable PDF of a signed report, for the clinic that requested the exam.

``render_report_pdf(result, path)`` lays one result out on A4 pages: a header on every page (site
and exam ids, and a red CRITICAL mark for a critical result), a boxed red banner on the first page
for a critical result, an "Amended report" note with its reason when the report replaces an earlier
version, the exam details, Findings and Impression with their line breaks kept, the signer and the
signing time in UTC, and on every page's foot the report's SHA-256 in small print and "page X of Y".

Report text is often Chinese, and the clinic's viewer or printer may have no Chinese font at all:
every piece of text, labels and ids included, is set in one TrueType font with Chinese glyphs that
is embedded in the PDF (only the glyphs used, as subsets), so the PDF prints the same everywhere;
the font has one weight, so titles and headings stand out by size.
The font file is the gateway setting ``report_font`` (``TELEREAD_GATEWAY__REPORT_FONT``, a ``.ttf``
or the first face of a ``.ttc``); unset, Debian's WenQuanYi Zen Hei (package ``fonts-wqy-zenhei``)
is looked for in its usual places, then asked of ``fc-match``. A font is usable when reportlab can
embed it (TrueType outlines: the OpenType/CFF fonts of ``fonts-noto-cjk`` are not) and it has the
report's fixed Chinese labels. With no usable font the renderer raises :class:`ReportFontMissing`,
whose message names the setting and the package. The text is cleaned of control characters and
escaped before it reaches reportlab's paragraph markup, so ``<`` or ``&`` in a report is printed
as written.

The whole document is rendered in memory first and then written atomically (a temporary file in
the same folder, fsync'd, then renamed over the target): a failed rendering leaves no file at all,
and a reader or a printer never sees half a PDF.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import threading
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
from reportlab.pdfbase.ttfonts import TTFError, TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from teleread.client import atomic_write_bytes
from teleread.errors import TelereadError
from teleread.v1 import common_pb2, results_pb2

FONT_SETTING = "TELEREAD_GATEWAY__REPORT_FONT"
FONT_PACKAGE = "fonts-wqy-zenhei"
# where Debian (and a few other distributions) put WenQuanYi Zen Hei, first found wins
FONT_SEARCH = (
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/truetype/wqy-zenhei/wqy-zenhei.ttc"),
    Path("/usr/local/share/fonts/wqy-zenhei.ttc"),
)
FC_MATCH_PATTERN = "WenQuanYi Zen Hei:lang=zh-cn:fontformat=TrueType"
REQUIRED_CHARS = "危急值请立即处理并确认更正报告检查所见诊断意见・"  # the report's fixed Chinese text
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


class ReportFontMissing(TelereadError):
    """No TrueType font with Chinese glyphs to embed in the printable report."""

    code = "FAILED_PRECONDITION"
    default_reason = "REPORT_FONT_MISSING"


_fonts_lock = threading.Lock()
_fonts: dict[Path, str] = {}  # font file -> its registered reportlab name
# font file -> (its size and mtime, why it cannot be used): tried again once the file changes
_unusable: dict[Path, tuple[tuple[int, int] | None, str]] = {}


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def _load(path: Path) -> tuple[str | None, str]:
    """The reportlab name of the font in ``path`` (registered on first use) and "", or None and
    why: reportlab cannot read or embed it (CFF outlines), or it lacks the report's Chinese."""
    path = Path(path).resolve()
    stamp = _file_stamp(path)
    with _fonts_lock:
        if path in _fonts:
            return _fonts[path], ""
        if path in _unusable and _unusable[path][0] == stamp:
            return None, _unusable[path][1]
        name = f"TelereadReport{len(_fonts)}"
        try:
            font = TTFont(name, str(path), subfontIndex=0)
        except (OSError, TTFError) as exc:  # not there, not a font, or CFF outlines
            why = "not found" if stamp is None else f"not an embeddable TrueType font, {type(exc).__name__}"
            _unusable[path] = (stamp, why)
            return None, why
        if any(ord(char) not in font.face.charToGlyph for char in REQUIRED_CHARS):
            _unusable[path] = (stamp, "no Chinese glyphs")
            return None, "no Chinese glyphs"
        pdfmetrics.registerFont(font)
        _fonts[path] = name
        return name, ""


def _fc_match() -> Path | None:
    fc_match = shutil.which("fc-match")
    if fc_match is None:
        return None
    try:
        found = subprocess.run(
            [fc_match, "--format=%{file}", FC_MATCH_PATTERN], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(found) if found else None


def _unusable_font(path: Path, why: str) -> ReportFontMissing:
    return ReportFontMissing(
        f"the report font {path} cannot be used ({why}): set {FONT_SETTING} to a TrueType .ttf/.ttc "
        f"with Chinese glyphs, or unset it and install the Debian package {FONT_PACKAGE}",
        metadata={"setting": FONT_SETTING, "package": FONT_PACKAGE},
    )


def find_report_font(configured: Path | None = None) -> Path:
    """The font file the report is set in: ``configured`` (the ``report_font`` setting) when set,
    else the first usable WenQuanYi Zen Hei of ``FONT_SEARCH``, else what ``fc-match`` names if
    usable. Raises :class:`ReportFontMissing` when there is none."""
    if configured is not None:
        name, why = _load(Path(configured))
        if name is None:
            raise _unusable_font(Path(configured), why)
        return Path(configured)
    for candidate in FONT_SEARCH:
        if candidate.is_file() and _load(candidate)[0] is not None:
            return candidate
    matched = _fc_match()
    if matched is not None and matched.is_file() and _load(matched)[0] is not None:
        return matched
    raise ReportFontMissing(
        f"no TrueType font with Chinese glyphs for the printable report: install the Debian package "
        f"{FONT_PACKAGE}, or set {FONT_SETTING} to such a .ttf/.ttc file",
        metadata={"setting": FONT_SETTING, "package": FONT_PACKAGE},
    )


def register_report_font(path: Path) -> str:
    """The reportlab font name of the font file ``path`` (one :func:`find_report_font` returned),
    registered with reportlab on first use."""
    name, why = _load(Path(path))
    if name is None:
        raise _unusable_font(Path(path), why)
    return name


def _clean(text: str) -> str:
    """Newlines normalised, control characters dropped, and the bullets the font lacks (and the
    middle dots that look alike) replaced by the katakana middle dot it has; a no-break space
    becomes a space."""
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
    def __init__(self, font: str) -> None:
        self.font = font
        self.body = ParagraphStyle("body", fontName=font, fontSize=10.5, leading=15, wordWrap="CJK")
        self.value = ParagraphStyle("value", parent=self.body, fontSize=9.5, leading=13)
        self.label = ParagraphStyle("label", parent=self.body, fontSize=8.5, leading=13, textColor=colors.grey)
        self.title = ParagraphStyle("title", parent=self.body, fontSize=16, leading=20, spaceAfter=2 * mm)
        self.section = ParagraphStyle(
            "section", parent=self.body, fontSize=11.5, leading=15, spaceBefore=5 * mm, spaceAfter=1.5 * mm
        )
        self.banner = ParagraphStyle(
            "banner", parent=self.body, fontSize=14, leading=18, alignment=TA_CENTER, textColor=colors.white
        )
        self.banner_cjk = ParagraphStyle("banner_cjk", parent=self.banner, fontSize=12, leading=16)
        self.note = ParagraphStyle("note", parent=self.body, textColor=AMENDED_AMBER)


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
    shift = min(spaces, 40) * pdfmetrics.stringWidth(" ", style.fontName, style.fontSize)
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
                ("FONTNAME", (0, 0), (-1, -1), styles.font),  # a table sets its cells' font, Helvetica by default
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
        f"Amended report 更正报告 (version {report.version}): "
        f"this version replaces an earlier signed report. Reason: {reason}",
        styles.note,
    )
    box = Table([[note]], colWidths=[PAGE_SIZE[0] - 2 * MARGIN_X])
    box.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, -1), styles.font),
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
                ("FONTNAME", (0, 0), (-1, -1), styles.font),
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
    story += [Paragraph("Findings 检查所见", styles.section), *_text_block(report.text, styles.body)]
    story += [Paragraph("Impression 诊断意见", styles.section), *_text_block(report.impression, styles.body)]
    story += _signature(report, styles)
    return story


class _Decorations:
    """Header and foot of every page; the page count is drawn by ``_NumberedCanvas``."""

    def __init__(self, result: results_pb2.Result, font: str) -> None:
        self.font = font
        self.ids = _clean(f"Site {result.exam.site or '-'}   Exam {result.exam.exam_id or '-'}")
        self.sha256 = _clean(f"Report SHA-256: {result.report.sha256 or '-'}")
        self.critical = result.critical

    def __call__(self, canvas: Any, doc: Any) -> None:
        width, height = PAGE_SIZE
        top = height - MARGIN_TOP + 8 * mm
        canvas.saveState()
        canvas.setFont(self.font, 9)
        canvas.drawString(MARGIN_X, top, TITLE)
        if self.critical:
            canvas.setFillColor(CRITICAL_RED)
            canvas.drawString(MARGIN_X + pdfmetrics.stringWidth(TITLE, self.font, 9) + 4 * mm, top, "CRITICAL RESULT")
            canvas.setFillColor(colors.black)
        canvas.drawRightString(width - MARGIN_X, top, self.ids)
        canvas.setStrokeColor(colors.grey)
        canvas.setLineWidth(0.5)
        canvas.line(MARGIN_X, top - 2 * mm, width - MARGIN_X, top - 2 * mm)
        bottom = MARGIN_BOTTOM - 10 * mm
        canvas.line(MARGIN_X, bottom + 4 * mm, width - MARGIN_X, bottom + 4 * mm)
        canvas.setFont(self.font, 6.5)
        canvas.setFillColor(colors.grey)
        canvas.drawString(MARGIN_X, bottom, self.sha256)
        canvas.restoreState()


class _NumberedCanvas(Canvas):
    """Keeps every page until the document ends, so each one can say "page X of Y"."""

    def __init__(self, *args: Any, font: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._font = font
        self._held_pages: list[dict[str, Any]] = []

    def showPage(self) -> None:  # noqa: N802 (reportlab's name)
        self._held_pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        total = len(self._held_pages)
        for number, state in enumerate(self._held_pages, start=1):
            self.__dict__.update(state)
            self.setFont(self._font, 7.5)
            self.setFillColor(colors.grey)
            self.drawRightString(PAGE_SIZE[0] - MARGIN_X, MARGIN_BOTTOM - 10 * mm, f"page {number} of {total}")
            super().showPage()
        super().save()


def report_pdf_bytes(result: results_pb2.Result, *, font: Path | None = None) -> bytes:
    """The printable report of one result as PDF bytes, set in the font file ``font`` (the
    ``report_font`` setting; None: the one :func:`find_report_font` finds)."""
    name = register_report_font(find_report_font(font))
    styles = _Styles(name)
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
        initialFontName=name,  # else every page names a Helvetica that is never embedded
    )
    decorate = _Decorations(result, name)
    canvas = functools.partial(_NumberedCanvas, font=name)
    doc.build(_story(result, styles), onFirstPage=decorate, onLaterPages=decorate, canvasmaker=canvas)
    return buffer.getvalue()


def render_report_pdf(result: results_pb2.Result, path: Path, *, font: Path | None = None) -> None:
    """Write the printable PDF report of ``result`` to ``path`` atomically (``font``: see
    :func:`report_pdf_bytes`)."""
    atomic_write_bytes(Path(path), report_pdf_bytes(result, font=font))
