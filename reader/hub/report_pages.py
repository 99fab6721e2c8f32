"""The printed report's pages: A4 portrait for the report, A4 landscape for an ECG's tracing, each
with its header (title, site and exam ids, a red CRITICAL mark for a critical result) and foot (the
report's content SHA-256, "page X of Y"), and :func:`build_pdf` that lays a story out on them.

The story moves to the tracing page with ``NextPageTemplate("tracing")``; the tracing page's frame
is the grid's width (``report_ecg.GRID_WIDTH_MM``) centred, with no padding, so the grid is drawn at
true scale. The same story always gives the same bytes (``invariant``); streams are deflated
without ASCII85 (``rl_config.useA85``, set when this module is imported). Nothing here logs.
"""

from __future__ import annotations

import functools
import io
from typing import Any

from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import BaseDocTemplate, Frame, PageTemplate

from teleread.reader.hub.report_ecg import GRID_WIDTH_MM

PAGE_SIZE = A4
MARGIN_X = 18 * mm
MARGIN_TOP = 24 * mm
MARGIN_BOTTOM = 20 * mm
TRACING_PAGE = landscape(A4)
TRACING_MARGIN_TOP = 14 * mm
TRACING_MARGIN_BOTTOM = 12 * mm
CRITICAL_RED = colors.HexColor("#C00000")
TITLE = "teleread \u2014 Signed report"

# Streams (the pages, the font subsets) deflated only: reportlab's default ASCII85 wrapping makes
# them a quarter bigger and, without its C accelerator, takes most of a tracing page's render time.
rl_config.useA85 = 0


def _margins(page: tuple[float, float]) -> tuple[float, float]:
    """(top, bottom) of the header's and the foot's band on a page of this size."""
    if page == PAGE_SIZE:
        return MARGIN_TOP, MARGIN_BOTTOM
    return TRACING_MARGIN_TOP + 2 * mm, TRACING_MARGIN_BOTTOM + 3 * mm


class _Decorations:
    """Header and foot of every page; the page count is drawn by ``_NumberedCanvas``."""

    def __init__(self, *, font: str, head: str, foot: str, critical: bool, page: tuple[float, float]) -> None:
        self.font = font
        self.ids = head
        self.sha256 = foot
        self.critical = critical
        self.page = page

    def __call__(self, canvas: Any, doc: Any) -> None:
        width, height = self.page
        top_margin, bottom_margin = _margins(self.page)
        top = height - top_margin + 8 * mm
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
        bottom = bottom_margin - 10 * mm
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
            page = tuple(self._pagesize)  # this page's (the tracing page is landscape)
            bottom = _margins(PAGE_SIZE if page == tuple(PAGE_SIZE) else TRACING_PAGE)[1]
            self.drawRightString(page[0] - MARGIN_X, bottom - 10 * mm, f"page {number} of {total}")
            super().showPage()
        super().save()


def build_pdf(story: list[Any], *, font: str, title: str, head: str, foot: str, critical: bool) -> bytes:
    """The story laid out as PDF bytes in the registered font ``font``: ``head`` (the site and exam
    ids) and ``foot`` (the content hash) on every page, already cleaned of control characters."""
    buffer = io.BytesIO()
    doc = BaseDocTemplate(
        buffer,
        pagesize=PAGE_SIZE,
        title=title,
        author="teleread",
        creator="teleread",
        invariant=True,  # the same report always gives the same bytes
        initialFontName=font,  # else every page names a Helvetica that is never embedded
    )
    width, height = PAGE_SIZE
    body = Frame(MARGIN_X, MARGIN_BOTTOM, width - 2 * MARGIN_X, height - MARGIN_TOP - MARGIN_BOTTOM, id="body")
    wide, low = TRACING_PAGE
    left = (wide - GRID_WIDTH_MM * mm) / 2
    sheet = Frame(
        left, TRACING_MARGIN_BOTTOM, wide - 2 * left, low - TRACING_MARGIN_TOP - TRACING_MARGIN_BOTTOM,
        leftPadding=0, rightPadding=0, topPadding=0, bottomPadding=0, id="sheet",
    )  # fmt: skip
    decorate = functools.partial(_Decorations, font=font, head=head, foot=foot, critical=critical)
    doc.addPageTemplates(
        [
            PageTemplate(
                "report", [body], onPage=decorate(page=PAGE_SIZE), pagesize=PAGE_SIZE, autoNextPageTemplate="report"
            ),
            PageTemplate("tracing", [sheet], onPage=decorate(page=TRACING_PAGE), pagesize=TRACING_PAGE),
        ]
    )
    doc.build(story, canvasmaker=functools.partial(_NumberedCanvas, font=font))
    return buffer.getvalue()
