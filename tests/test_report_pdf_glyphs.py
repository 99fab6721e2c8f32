"""The hub's printed report's Chinese as a clinic machine without any font installed prints it.

Each PDF is rasterised by poppler (``pdftoppm``) with fontconfig pointed at an empty configuration,
so the renderer has nothing to substitute: what is drawn comes from the fonts embedded in the PDF.
Glyph cells are located with ``pdftotext -bbox`` (positions only) and compared as bitmaps: a cell
with no ink is a missing font, cells alike for different characters are empty boxes, and every
character of the report must look like the same character drawn large on a reference page set
through the report's own font registration.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reportlab.pdfgen.canvas import Canvas

from teleread.patient import PatientContext
from teleread.reader.hub import report_font
from teleread.reader.hub.report_pdf import PrintedReport, report_pdf_bytes

pytestmark = pytest.mark.timeout(120)

POPPLER = ("pdftoppm", "pdftotext", "pdffonts")
DPI = 300
BANNER = "危急值"  # the start of the critical banner's Chinese line
FINDINGS = "窦性停搏"  # one character a line in the report's findings
REFERENCE = BANNER + FINDINGS
NORMAL = 24  # side of the normalised glyph bitmap
WORD = re.compile(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">([^<]*)</word>')


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for poppler with an empty fontconfig: no font directory, a fresh cache."""
    missing = [tool for tool in POPPLER if not shutil.which(tool)]
    assert not missing, f"{missing}: poppler-utils is installed by scripts/test.sh and .ci/run"
    root = tmp_path_factory.mktemp("no-fonts")
    conf = root / "fonts.conf"
    conf.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">\n'
        f"<fontconfig><cachedir>{html.escape(str(root / 'cache'))}</cachedir></fontconfig>\n"
    )
    env = {
        **os.environ,
        "FONTCONFIG_FILE": str(conf),
        "FONTCONFIG_PATH": str(root),
        "XDG_CACHE_HOME": str(root / "xdg-cache"),
        "XDG_DATA_HOME": str(root / "xdg-data"),
        "HOME": str(root),
    }
    if shutil.which("fc-list"):  # the simulation holds: fontconfig sees no font at all
        listed = subprocess.run(["fc-list"], env=env, capture_output=True, text=True, check=True, timeout=30)
        assert listed.stdout.strip() == ""
    return env


def _poppler(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(list(args), env=env, capture_output=True, text=True, check=True, timeout=60)
    _complaints[:] = list(dict.fromkeys(done.stderr.splitlines()))[:3]  # e.g. a missing language pack
    return done.stdout


_complaints: list[str] = []  # what the last poppler command printed on stderr


def _page(env: dict[str, str], pdf: Path, page: int = 1) -> np.ndarray:
    """Page ``page`` of ``pdf`` rasterised in grey at ``DPI``."""
    prefix = pdf.with_name(f"{pdf.stem}-p{page}")
    _poppler(env, "pdftoppm", "-r", str(DPI), "-gray", "-f", str(page), "-l", str(page), "-png", "-singlefile",
             str(pdf), str(prefix))  # fmt: skip
    return np.asarray(Image.open(prefix.with_suffix(".png")).convert("L"), dtype=np.int16)


def _cells(env: dict[str, str], pdf: Path, wanted: str, page: int = 1) -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom) of the characters of ``wanted`` on a page, from the
    text layer's word boxes; a run of Chinese characters is split evenly (they are one em wide)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    scale = DPI / 72
    for x0, y0, x1, y1, word in WORD.findall(_poppler(env, "pdftotext", "-bbox", "-f", str(page), "-l", str(page),
                                                       str(pdf), "-")):  # fmt: skip
        word = html.unescape(word)
        left, top, right, bottom = (float(v) * scale for v in (x0, y0, x1, y1))
        step = (right - left) / len(word)
        for i, char in enumerate(word):
            if char in wanted and char not in out:
                out[char] = (round(left + i * step) + 1, round(top), round(left + (i + 1) * step) - 1, round(bottom))
    return out


def _ink(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Where a cell differs from its own background (black on white, or white on the red banner)."""
    left, top, right, bottom = box
    cell = image[top:bottom, left:right]
    return np.abs(cell - np.median(cell)) > 64


def _normalised(ink: np.ndarray) -> np.ndarray:
    """The ink's bounding box scaled to a fixed square: comparable across sizes and positions."""
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    tight = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scaled = Image.fromarray((tight * 255).astype(np.uint8)).resize((NORMAL, NORMAL), Image.Resampling.BILINEAR)
    return np.asarray(scaled) > 96


def _glyphs(image: np.ndarray, cells: dict[str, tuple[int, int, int, int]], wanted: str) -> dict[str, np.ndarray]:
    """Each wanted character's normalised bitmap, after checking that it is drawn and that no two
    different characters are drawn alike."""
    lost = "".join(char for char in wanted if char not in cells)
    assert not lost, f"poppler does not lay out {lost!r}; it says: {_complaints}"
    glyphs: dict[str, np.ndarray] = {}
    for char in wanted:
        ink = _ink(image, cells[char])
        assert ink.mean() > 0.04, f"{char!r} is not drawn (ink {ink.mean():.3f} of its cell)"
        glyphs[char] = _normalised(ink)
    for i, a in enumerate(wanted):
        for b in wanted[i + 1 :]:
            differ = float((glyphs[a] != glyphs[b]).mean())
            assert differ > 0.08, f"{a!r} and {b!r} are drawn alike ({differ:.3f}): empty boxes, not glyphs"
    return glyphs


def _critical_pdf(path: Path) -> Path:
    report = PrintedReport(
        exam_id="ex-0042",
        site_code="site_a",
        site_name="Township clinic A",
        version=1,
        status="final",
        text="\n".join(FINDINGS) + "\nSinus arrest 3.5 s, 窦性停搏 3.5 秒。",
        impression="病态窦房结综合征 (sick sinus syndrome)",
        critical=True,
        sha256="0123456789abcdef" * 4,
        signer="dr-heart",
        signed_at=datetime(2025, 3, 1, 8, 30, tzinfo=UTC),
        kind="ecg",
        modality="ECG",
        patient=PatientContext(name="Zhang^San=张^三", sex="M", id="MRN-1"),
    )
    path.write_bytes(report_pdf_bytes(report))
    return path


def _reference_pdf(path: Path) -> Path:
    """One page with the reference characters drawn large, set in the report's Chinese font."""
    font = report_font.register_report_font(report_font.find_report_font())
    canvas = Canvas(str(path), invariant=True)
    canvas.setFont(font, 40)
    for i, char in enumerate(REFERENCE):
        canvas.drawString(60 + 70 * i, 700, char)
    canvas.save()
    return path


def test_reference_characters_are_drawn_from_the_embedded_font(bare: dict[str, str], tmp_path: Path) -> None:
    pdf = _reference_pdf(tmp_path / "reference.pdf")
    _glyphs(_page(bare, pdf), _cells(bare, pdf, REFERENCE), REFERENCE)


def test_the_reports_chinese_is_drawn_without_any_installed_font(bare: dict[str, str], tmp_path: Path) -> None:
    pdf = _critical_pdf(tmp_path / "critical.pdf")
    image = _page(bare, pdf)
    drawn = _glyphs(image, _cells(bare, pdf, REFERENCE), REFERENCE)
    reference_pdf = _reference_pdf(tmp_path / "reference.pdf")
    reference = _glyphs(_page(bare, reference_pdf), _cells(bare, reference_pdf, REFERENCE), REFERENCE)
    for char, glyph in drawn.items():  # each printed character looks most like itself
        nearest = min(REFERENCE, key=lambda other: int((reference[other] != glyph).sum()))
        assert nearest == char, f"{char!r} is printed as something nearer {nearest!r}"


def test_every_font_in_the_report_is_embedded(bare: dict[str, str], tmp_path: Path) -> None:
    pdf = _critical_pdf(tmp_path / "critical.pdf")
    lines = _poppler(bare, "pdffonts", str(pdf)).splitlines()
    # columns as the dashed rule under the header spans them ("Type 1" and "CID TrueType" hold spaces)
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    header = [lines[0][a:b].strip() for a, b in spans]
    assert header[:4] == ["name", "type", "encoding", "emb"], header
    fonts = [{key: line[a:b].strip() for key, (a, b) in zip(header, spans)} for line in lines[2:]]
    assert fonts, "the report has no font at all"
    not_embedded = [f"{font['name']} ({font['type']})" for font in fonts if font["emb"] != "yes"]
    assert not not_embedded, f"fonts not embedded: {not_embedded}"
