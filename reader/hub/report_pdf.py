"""The printed report of one signed report version: A4 PDF bytes, rendered at the hub.

``report_pdf_bytes(report, font=, zone=)`` lays a :class:`PrintedReport` out: on every page a header
(title, site and exam ids, a red CRITICAL mark for a critical result) and a foot (the report's
content SHA-256 in small print and "page X of Y"); on the first page a boxed red banner for a
critical result, then the header a clinic files (the patient's name as a reader reads it, sex, age
at the exam, the site's patient ID, birth date, patient class; the requesting clinic and clinician;
the exam's and the report's times in the configured zone, the zone named; the reader, the signer
and the report version), an "Amended report" note with its reason when the version replaces an
earlier one, the exam details, Findings and Impression with their line breaks kept, and the
signature. An ECG exam's report also carries the measurements block (rate, RR, PR, QRS, QT,
QTc Bazett and Fridericia, the P/QRS/T axes; "—" where absent), a Statements list when given, and
the 12-lead tracing on an A4 landscape page of its own (``reader/hub/report_ecg.py``), or a line
saying the tracing could not be drawn. :func:`render_report` is what the hub's worker process runs:
it decodes the exam's ECG objects and lays the report out.

Report text is often Chinese and the clinic's viewer or printer may have no Chinese font: every
piece of text is set in one TrueType font with Chinese glyphs (``reader/hub/report_font.py``),
embedded as subsets of the glyphs used. Text is cleaned of control characters and escaped before it
reaches reportlab's paragraph markup, so ``<`` or ``&`` is printed as written. The same report,
font and zone always give the same bytes (``invariant``). Nothing here logs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.platypus import KeepTogether, NextPageTemplate, PageBreak, Paragraph, Spacer, Table, TableStyle

from teleread.ecgio import EcgSignal
from teleread.patient import PatientContext, age_text, person_name
from teleread.reader.hub import report_ecg
from teleread.reader.hub.report_ecg import EcgFiles, NoTracing
from teleread.reader.hub.report_font import find_report_font, register_report_font
from teleread.reader.hub.report_pages import CRITICAL_RED, MARGIN_X, PAGE_SIZE, TITLE, build_pdf

AMENDED_AMBER = colors.HexColor("#B45F06")
SEX = {"M": "Male 男", "F": "Female 女", "O": "Other 其他"}
PATIENT_CLASS = {"outpatient": "Outpatient 门诊", "inpatient": "Inpatient 住院", "emergency": "Emergency 急诊"}
_ACRONYMS = {"ecg": "ECG", "stat": "STAT"}
_SUBSTITUTES = str.maketrans(
    {"\u00b7": "\u30fb", "\u2022": "\u30fb", "\u2027": "\u30fb", "\u2219": "\u30fb", "\u22c5": "\u30fb", "\u00a0": " "}
)
# C0 controls (except tab and newline), DEL and C1 controls: not printable, and some break the markup
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class PrintedReport:
    """What the printed report of one signed version shows (plain values; '' where unknown)."""

    exam_id: str
    site_code: str
    site_name: str
    version: int
    status: str
    text: str
    impression: str
    critical: bool
    sha256: str  # the report's content hash
    reader: str = ""  # who wrote the version
    signer: str = ""
    signed_at: datetime | None = None
    amends_reason: str = ""
    exam_time: datetime | None = None  # when the exam arrived at the hub
    kind: str = ""
    modality: str = ""
    priority: str = ""
    specialty: str = ""
    indication: str = ""
    study_instance_uid: str = ""
    triage_level: str = ""
    patient: PatientContext = field(default_factory=PatientContext)
    patient_age: str = ""  # DICOM AS at the exam (recorded, or from the birth date)


def _clean(text: str) -> str:
    """Newlines normalised, control characters dropped, and the bullets the font lacks (and the
    middle dots that look alike) replaced by the katakana middle dot it has; a no-break space
    becomes a space."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).translate(_SUBSTITUTES)


def _markup(text: str) -> str:
    """User text as safe paragraph markup: printed as written, never read as tags."""
    return escape(_clean(text))


def _when(value: datetime | None, zone: ZoneInfo) -> str:
    """A time in ``zone`` with the zone named ("2025-03-01 16:30 CST (Asia/Shanghai)")."""
    if value is None:
        return "-"
    local = value.astimezone(zone)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()} ({zone.key})"


def _label(value: str) -> str:
    """``imaging`` -> ``Imaging``, ``stat`` -> ``STAT``, '' -> ``-``."""
    if not value:
        return "-"
    return _ACRONYMS.get(value.lower(), value.replace("_", " ").capitalize())


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if re.fullmatch(r"\d{8}", value or "") else (value or "-")


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


def _boxed(rows: list[list[Any]], styles: _Styles, *extra: tuple[Any, ...]) -> Table:
    box = Table(rows, colWidths=[PAGE_SIZE[0] - 2 * MARGIN_X])
    # a table sets its cells' font (Helvetica by default, never embedded)
    box.setStyle(TableStyle([("FONTNAME", (0, 0), (-1, -1), styles.font), *extra]))
    return box


def _critical_banner(styles: _Styles) -> Table:
    rows = [
        [Paragraph("CRITICAL RESULT \u2014 act now and acknowledge", styles.banner)],
        [Paragraph("危急值 \u2014 请立即处理并确认", styles.banner_cjk)],
    ]
    return _boxed(
        rows, styles, ("BACKGROUND", (0, 0), (-1, -1), CRITICAL_RED), ("BOX", (0, 0), (-1, -1), 2.5, colors.black),
        ("TOPPADDING", (0, 0), (-1, -1), 3 * mm), ("BOTTOMPADDING", (0, 0), (-1, -1), 3 * mm),
    )  # fmt: skip


def _amended_note(report: PrintedReport, styles: _Styles) -> Table:
    reason = _markup(report.amends_reason) if report.amends_reason.strip() else "no reason recorded"
    note = Paragraph(
        f"Amended report 更正报告 (version {report.version}): "
        f"this version replaces an earlier signed report. Reason: {reason}",
        styles.note,
    )
    return _boxed(
        [[note]], styles, ("BOX", (0, 0), (-1, -1), 1.5, AMENDED_AMBER),
        ("TOPPADDING", (0, 0), (-1, -1), 2 * mm), ("BOTTOMPADDING", (0, 0), (-1, -1), 2 * mm),
    )  # fmt: skip


def _pairs_table(pairs: list[tuple[str, str]], styles: _Styles, *, boxed: bool = False) -> Table:
    """Label/value pairs two to a row."""
    cells = [[Paragraph(label, styles.label), Paragraph(_markup(value or "-"), styles.value)] for label, value in pairs]
    rows = [cells[i] + (cells[i + 1] if i + 1 < len(cells) else ["", ""]) for i in range(0, len(cells), 2)]
    width = PAGE_SIZE[0] - 2 * MARGIN_X
    table = Table(rows, colWidths=[width * 0.18, width * 0.32, width * 0.18, width * 0.32])
    style: list[tuple[Any, ...]] = [
        ("FONTNAME", (0, 0), (-1, -1), styles.font),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.lightgrey),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
    ]
    if boxed:
        style.append(("BOX", (0, 0), (-1, -1), 0.8, colors.black))
    table.setStyle(TableStyle(style))
    return table


def _clinic_header(report: PrintedReport, styles: _Styles, zone: ZoneInfo) -> Table:
    """The header a clinic files: who the patient is, who asked, when, who read and signed."""
    patient = report.patient
    clinic = report.site_name if not report.site_code else f"{report.site_name} ({report.site_code})"
    return _pairs_table(
        [
            ("姓名 Name", person_name(patient.name)),
            ("患者编号 Patient ID", patient.id),
            ("性别 Sex", SEX.get(patient.sex, patient.sex)),
            ("年龄 Age", age_text(report.patient_age)),
            ("出生日期 Born", _date(patient.birth_date) if patient.birth_date else ""),
            ("就诊类型 Class", PATIENT_CLASS.get(patient.patient_class, patient.patient_class)),
            ("送检单位 Clinic", clinic.strip()),
            ("送检医生 Clinician", person_name(patient.referring_physician)),
            ("检查时间 Exam", _when(report.exam_time, zone)),
            ("报告时间 Signed", _when(report.signed_at, zone)),
            ("诊断医生 Reader", report.reader),
            ("签发医生 Signer", report.signer),
            ("报告版本 Version", f"{report.version} ({report.status or '-'})"),
        ],
        styles,
        boxed=True,
    )


def _details(report: PrintedReport, styles: _Styles) -> Table:
    pairs = [
        ("Kind", _label(report.kind)),
        ("Modality", report.modality),
        ("Priority", _label(report.priority)),
        ("Specialty", _label(report.specialty)),
        ("Automated triage", _label(report.triage_level)),
    ]
    if report.study_instance_uid:
        pairs.append(("Study UID", report.study_instance_uid))
    return _pairs_table(pairs, styles)


def _signature(report: PrintedReport, styles: _Styles, zone: ZoneInfo) -> list[Any]:
    out: list[Any] = [
        Paragraph("Signed", styles.section),
        Paragraph(f"Signed by {_markup(report.signer or '-')} at {_when(report.signed_at, zone)}", styles.body),
    ]
    if report.reader and report.reader != report.signer:
        out.append(Paragraph(f"Written by {_markup(report.reader)}", styles.body))
    return out


@dataclass(frozen=True)
class _Ecg:
    """The ECG parts of one printed report."""

    tracing: EcgSignal | NoTracing | None
    measurements: Mapping[str, float] | None
    statements: Sequence[tuple[str, str]] | None

    def shown(self, report: PrintedReport) -> bool:
        return report.kind.lower() == "ecg" or self.tracing is not None or bool(self.measurements or self.statements)


def _ecg_block(ecg: _Ecg, styles: _Styles) -> list[Any]:
    """The measurements, the statements when given, and the note when the tracing is not drawn."""
    out: list[Any] = [Paragraph("ECG measurements 心电图测量", styles.section)]
    out.append(_pairs_table(report_ecg.measurement_pairs(ecg.measurements), styles))
    if ecg.statements:
        out.append(Paragraph("Statements 心电图诊断", styles.section))
        out += [Paragraph(_markup(line), styles.body) for line in report_ecg.statement_lines(ecg.statements)]
    if isinstance(ecg.tracing, NoTracing):
        out.append(Spacer(1, 2 * mm))
        note = f"The ECG tracing could not be drawn ({ecg.tracing.reason}); see the original record."
        out.append(Paragraph(_markup(note) + " 心电图波形无法绘制。", styles.note))
    elif isinstance(ecg.tracing, EcgSignal):
        out.append(Paragraph("The tracing is printed on the last page. 心电图波形见末页。", styles.label))
    return out


def _tracing_page(signal: EcgSignal, ecg: _Ecg, styles: _Styles) -> list[Any]:
    head = ParagraphStyle("tracing", parent=styles.value, fontSize=9, leading=12)
    return [
        NextPageTemplate("tracing"),
        PageBreak(),
        Paragraph(_markup("ECG 心电图   " + report_ecg.scale_line(signal)), head),
        Paragraph(_markup(report_ecg.measurement_line(ecg.measurements)), head),
        Spacer(1, 2 * mm),
        report_ecg.Tracing(signal, font=styles.font),
    ]


def _story(report: PrintedReport, styles: _Styles, zone: ZoneInfo, ecg: _Ecg) -> list[Any]:
    story: list[Any] = []
    if report.critical:
        story += [_critical_banner(styles), Spacer(1, 4 * mm)]
    story.append(Paragraph(TITLE, styles.title))
    story += [_clinic_header(report, styles, zone), Spacer(1, 3 * mm)]
    if report.amends_reason or report.status == "amended" or report.version > 1:
        story += [_amended_note(report, styles), Spacer(1, 3 * mm)]
    story.append(_details(report, styles))
    if ecg.shown(report):
        story += _ecg_block(ecg, styles)
    if report.indication.strip():
        story += [Paragraph("Clinical indication", styles.section), *_text_block(report.indication, styles.body)]
    story += [Paragraph("Findings 检查所见", styles.section), *_text_block(report.text, styles.body)]
    impression = [Paragraph("Impression 诊断意见", styles.section), *_text_block(report.impression, styles.body)]
    story += [*impression[:-1], KeepTogether([impression[-1], *_signature(report, styles, zone)])]  # never alone
    if isinstance(ecg.tracing, EcgSignal):
        story += _tracing_page(ecg.tracing, ecg, styles)
    return story


def render_report(
    report: PrintedReport,
    *,
    ecg: EcgFiles | NoTracing | None = None,
    measurements: Mapping[str, float] | None = None,
    statements: Sequence[tuple[str, str]] | None = None,
    font: Path | None = None,
    zone: ZoneInfo | None = None,
) -> bytes:
    """What the hub's worker process runs: decode the exam's ECG objects (``ecg``; a
    :class:`NoTracing` when they could not be copied out, None for an imaging exam) and lay the
    report out (:func:`report_pdf_bytes`)."""
    tracing = report_ecg.decode_ecg(ecg, exam_id=report.exam_id) if isinstance(ecg, EcgFiles) else ecg
    return report_pdf_bytes(
        report, tracing=tracing, measurements=measurements, statements=statements, font=font, zone=zone
    )


def report_pdf_bytes(
    report: PrintedReport,
    *,
    tracing: EcgSignal | NoTracing | None = None,
    measurements: Mapping[str, float] | None = None,
    statements: Sequence[tuple[str, str]] | None = None,
    font: Path | None = None,
    zone: ZoneInfo | None = None,
) -> bytes:
    """The printed report as PDF bytes, set in the font file ``font`` (the ``report.font``
    setting; None: the one :func:`find_report_font` finds), times in ``zone`` (UTC when None).
    An ECG's ``tracing`` is drawn on a landscape page of its own (a :class:`NoTracing` prints a
    note instead); ``measurements`` (``EcgSummary.values`` keys: the triage's, or the reader's
    confirmed ones) and ``statements`` ((code, text) pairs) fill the ECG block. Raises
    ``ReportFontMissing`` without a usable font."""
    name = register_report_font(find_report_font(font))
    zone = zone or ZoneInfo("UTC")
    styles = _Styles(name)
    return build_pdf(
        _story(report, styles, zone, _Ecg(tracing, measurements, statements)),
        font=name,
        title=f"teleread signed report, exam {_clean(report.exam_id)}, version {report.version}",
        head=_clean(f"Site {report.site_code or '-'}   Exam {report.exam_id or '-'}"),
        foot=_clean(f"Report SHA-256: {report.sha256 or '-'}"),
        critical=report.critical,
    )
