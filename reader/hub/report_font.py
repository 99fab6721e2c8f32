"""The report font: a TrueType font with Chinese glyphs that reportlab can embed in the printed report.

The font file is the setting ``report.font`` (``TELEREAD_REPORT__FONT``, a ``.ttf`` or the first
face of a ``.ttc``); unset, Debian's WenQuanYi Zen Hei (package ``fonts-wqy-zenhei``) is looked for
in its usual places, then asked of ``fc-match``. A font is usable when reportlab can embed it
(TrueType outlines: the OpenType/CFF fonts of ``fonts-noto-cjk`` are not) and it has the report's
fixed Chinese labels. Without a usable font :class:`ReportFontMissing` is raised
(``FAILED_PRECONDITION`` / ``REPORT_FONT_MISSING``), its message naming the setting and the package.
A font found unusable is tried again once its file changes, so installing the package needs no restart.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFError, TTFont

from teleread.errors import TelereadError

FONT_SETTING = "TELEREAD_REPORT__FONT"
FONT_PACKAGE = "fonts-wqy-zenhei"
# where Debian (and a few other distributions) put WenQuanYi Zen Hei, first found wins
FONT_SEARCH = (
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/truetype/wqy-zenhei/wqy-zenhei.ttc"),
    Path("/usr/local/share/fonts/wqy-zenhei.ttc"),
)
FC_MATCH_PATTERN = "WenQuanYi Zen Hei:lang=zh-cn:fontformat=TrueType"
# the report's fixed Chinese text (labels, the critical banner, the amended note)
REQUIRED_CHARS = (
    "危急值请立即处理并确认更正报告检查所见诊断意见"
    "患者姓名编号性别年龄出生日期就诊类型送检单位医生时间签发版本男女其他门住院急・"
)


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
    """The font file the report is set in: ``configured`` (the ``report.font`` setting) when set,
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


def load_report_font(configured: Path | None = None) -> str:
    """Find and register the report font now (in the process that will render); its reportlab name.
    Raises :class:`ReportFontMissing` when there is none."""
    return register_report_font(find_report_font(configured))
