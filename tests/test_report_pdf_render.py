"""The hub's printed report on its own (no servers): the header a clinic files, Chinese text with its
line breaks, amendments, markup characters, several numbered pages, its embedded font subset (and
a missing one, as a typed error naming the setting and the package), the same bytes every time,
the time zone, and the render time."""

from __future__ import annotations

import io
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast
from zoneinfo import ZoneInfo

import pypdf
import pytest

from teleread.patient import PatientContext
from teleread.reader.hub import report_font
from teleread.reader.hub.report_pdf import PrintedReport, report_pdf_bytes

pytestmark = pytest.mark.timeout(120)
SHANGHAI = ZoneInfo("Asia/Shanghai")


def printed(**changes: object) -> PrintedReport:
    report = PrintedReport(
        exam_id="ex-0001",
        site_code="clinic-a",
        site_name="Township clinic A",
        version=1,
        status="final",
        text="Sinus rhythm.",
        impression="Normal ECG.",
        critical=False,
        sha256="0123456789abcdef" * 4,
        reader="dr-heart",
        signer="dr-heart",
        signed_at=datetime(2025, 3, 1, 8, 30, tzinfo=UTC),
        exam_time=datetime(2025, 3, 1, 7, 55, tzinfo=UTC),
        kind="ecg",
        modality="ECG",
        priority="stat",
        specialty="cardiology",
        indication="胸闷 2 小时",
        patient=PatientContext(
            id="MRN-0042",
            name="Zhang^San=张^三",
            sex="F",
            birth_date="19620304",
            referring_physician="Li^Wei=李^伟",
            patient_class="outpatient",
        ),  # fmt: skip
        patient_age="062Y",
    )
    return replace(report, **changes)  # type: ignore[arg-type]


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(data)).pages)


def flat(data: bytes) -> str:
    return " ".join(pdf_text(data).split())


def font_names(data: bytes) -> set[str]:
    names: set[str] = set()
    for page in pypdf.PdfReader(io.BytesIO(data)).pages:
        resources = cast(pypdf.generic.DictionaryObject, page["/Resources"].get_object())
        fonts = cast(pypdf.generic.DictionaryObject, resources["/Font"].get_object())
        names.update(str(font.get_object()["/BaseFont"]) for font in fonts.values())
    return names


def test_the_header_a_clinic_files() -> None:
    text = flat(report_pdf_bytes(printed(), zone=SHANGHAI))
    for expected in (
        "姓名 Name 张三 (Zhang San)", "患者编号 Patient ID MRN-0042", "性别 Sex Female 女", "年龄 Age 62 y",
        "出生日期 Born 1962-03-04", "就诊类型 Class Outpatient 门诊", "送检单位 Clinic Township clinic A (clinic-a)",
        "送检医生 Clinician 李伟 (Li Wei)", "检查时间 Exam 2025-03-01 15:55 CST (Asia/Shanghai)",
        "报告时间 Signed 2025-03-01 16:30 CST (Asia/Shanghai)", "诊断医生 Reader dr-heart",
        "签发医生 Signer dr-heart", "报告版本 Version 1 (final)",
        "Signed by dr-heart at 2025-03-01 16:30 CST (Asia/Shanghai)",
    ):  # fmt: skip
        assert expected in text, expected


def test_times_are_printed_in_the_configured_zone_with_the_zone_named() -> None:
    text = flat(report_pdf_bytes(printed(), zone=ZoneInfo("Europe/London")))
    assert "2025-03-01 07:55 GMT (Europe/London)" in text and "CST" not in text
    assert "2025-03-01 08:30 UTC (UTC)" in flat(report_pdf_bytes(printed()))  # no zone given: UTC


def test_unknown_patient_values_print_as_a_dash_and_a_reader_apart_from_the_signer_is_named() -> None:
    text = flat(report_pdf_bytes(printed(patient=PatientContext(), patient_age="", reader="dr-rhythm"), zone=SHANGHAI))
    assert "姓名 Name - 患者编号 Patient ID -" in text and "年龄 Age -" in text
    assert "诊断医生 Reader dr-rhythm 签发医生 Signer dr-heart" in text and "Written by dr-rhythm" in text


def test_chinese_findings_keep_their_line_breaks_in_an_embedded_font_subset() -> None:
    data = report_pdf_bytes(
        printed(text="窦性心律，心率 72 次/分。\nQRS 波群正常。\n\n  ST 段无明显改变。", impression="正常心电图。"),
        zone=SHANGHAI,
    )
    lines = [line.strip() for line in pdf_text(data).splitlines()]
    findings = lines.index("Findings 检查所见")
    assert lines[findings + 1 : findings + 4] == ["窦性心律，心率 72 次/分。", "QRS 波群正常。", "ST 段无明显改变。"]
    assert "正常心电图。" in lines and "胸闷 2 小时" in lines
    fonts = font_names(data)  # one embedded subset of the report font, nothing else
    assert fonts and all(re.fullmatch(r"/[A-Z]{6}\+WenQuanYiZenHei-0", name) for name in fonts), fonts
    reader = pypdf.PdfReader(io.BytesIO(data))
    descriptor = reader.pages[0]["/Resources"]["/Font"]  # the subset holds its glyphs, not the whole font
    (font,) = [f.get_object() for f in descriptor.values()]
    embedded = font["/FontDescriptor"]["/FontFile2"].get_object().get_data()
    assert 1000 < len(embedded) < 200_000  # WenQuanYi Zen Hei's file is over 10 MB
    text = "\n".join(lines)
    assert "Site clinic-a   Exam ex-0001" in text
    assert "Report SHA-256: " + "0123456789abcdef" * 4 in text and "page 1 of 1" in text
    assert "CRITICAL" not in text and "Amended" not in text


def test_a_critical_result_carries_the_boxed_banner() -> None:
    text = pdf_text(report_pdf_bytes(printed(critical=True)))
    assert "CRITICAL RESULT — act now and acknowledge" in text and "危急值 — 请立即处理并确认" in text


def test_an_amended_report_says_so_with_its_reason() -> None:
    text = flat(report_pdf_bytes(printed(version=2, status="amended", amends_reason="导联接错 (limb leads swapped)")))
    assert "Amended report 更正报告 (version 2)" in text and "Reason: 导联接错 (limb leads swapped)" in text
    assert "报告版本 Version 2 (amended)" in text


def test_markup_and_control_characters_are_printed_as_written() -> None:
    text = pdf_text(
        report_pdf_bytes(printed(text="<b>&amp; Q < 40 ms & R > 2 mV</b> <para>", impression="A&B <i>x</i>"))
    )
    assert "<b>&amp; Q < 40 ms & R > 2 mV</b> <para>" in text and "A&B <i>x</i>" in text
    odd = pdf_text(report_pdf_bytes(printed(text="PR\x00 160\x1b ms\r\n· QT 400\u00a0ms\tend", site_name="A<&>")))
    assert "PR 160 ms" in odd and "・ QT 400 ms" in odd and "\x00" not in odd and "A<&> (clinic-a)" in odd


def test_a_long_report_runs_over_several_numbered_pages() -> None:
    lines = [f"第 {n} 行：leads V1-V6 reviewed, no acute change." for n in range(1, 201)]
    data = report_pdf_bytes(printed(text="\n".join(lines), impression="END-OF-IMPRESSION", critical=True))
    pages = [page.extract_text() for page in pypdf.PdfReader(io.BytesIO(data)).pages]
    total = len(pages)
    assert total > 1
    for number, page in enumerate(pages, start=1):
        assert f"page {number} of {total}" in page and "Exam ex-0001" in page and "CRITICAL RESULT" in page
    assert "第 1 行" in pages[0] and "第 200 行" in "".join(pages) and "END-OF-IMPRESSION" in pages[-1]


def test_the_same_report_always_renders_the_same_bytes_in_well_under_100_ms() -> None:
    first = report_pdf_bytes(printed(), zone=SHANGHAI)  # the font is loaded once, here
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        assert report_pdf_bytes(printed(), zone=SHANGHAI) == first
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[2] < 0.1, timings  # the median; about 15-25 ms on the 2-core CI machine


def _no_default_font(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without fonts-wqy-zenhei: nothing in the usual places, nothing from fc-match."""
    monkeypatch.setattr(report_font, "FONT_SEARCH", ())
    monkeypatch.setattr(report_font, "_fc_match", lambda: None)


def test_a_missing_font_is_a_typed_error_naming_the_setting_and_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_default_font(monkeypatch)
    with pytest.raises(report_font.ReportFontMissing) as missing:
        report_pdf_bytes(printed())
    assert missing.value.code == "FAILED_PRECONDITION" and missing.value.reason == "REPORT_FONT_MISSING"
    assert "TELEREAD_REPORT__FONT" in missing.value.message and "fonts-wqy-zenhei" in missing.value.message
    assert missing.value.metadata == {"setting": "TELEREAD_REPORT__FONT", "package": "fonts-wqy-zenhei"}
    not_a_font = tmp_path / "not-a-font.ttf"
    not_a_font.write_bytes(b"OTTO" + bytes(200))  # an OpenType/CFF header: reportlab cannot embed it
    for configured in (not_a_font, tmp_path / "absent.ttc"):
        with pytest.raises(report_font.ReportFontMissing) as refused:
            report_pdf_bytes(printed(), font=configured)
        assert str(configured) in refused.value.message and "TELEREAD_REPORT__FONT" in refused.value.message
        assert "fonts-wqy-zenhei" in refused.value.message


def test_the_font_and_zone_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = report_font.find_report_font()
    _no_default_font(monkeypatch)
    copy = tmp_path / "fonts" / "report.ttc"
    copy.parent.mkdir()
    copy.symlink_to(installed)
    monkeypatch.setenv("TELEREAD_REPORT__FONT", str(copy))
    monkeypatch.setenv("TELEREAD_REPORT__TIMEZONE", "Asia/Urumqi")
    from teleread.settings import ReportSettings, Settings

    configured = Settings().report
    assert configured.font == copy and configured.timezone == "Asia/Urumqi"
    assert ReportSettings().timezone == "Asia/Shanghai"
    text = flat(report_pdf_bytes(printed(text="窦性停搏 3.5 秒"), font=configured.font, zone=ZoneInfo("Asia/Urumqi")))
    assert "窦性停搏 3.5 秒" in text and "(Asia/Urumqi)" in text
    monkeypatch.setenv("TELEREAD_REPORT__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValueError, match="time zone"):
        Settings()
