"""The patient context's value rules: what is kept, what is dropped (never an error), how long a
value may be; age and sex from WFDB header comments as PhysioNet's databases write them; the age at
a date in DICOM AS; and a repr that never shows a value."""

from __future__ import annotations

from datetime import date

import pytest

from teleread.patient import (
    MAX_LENGTH,
    PatientContext,
    age_at,
    clean_age,
    clean_birth_date,
    clean_patient_class,
    clean_sex,
    cleaned,
    from_wfdb_comments,
    age_from_text,
)

TODAY = date(2026, 12, 3)


@pytest.mark.parametrize(
    "raw, kept",
    [("M", "M"), ("f", "F"), (" O ", "O"), ("male", "M"), ("FEMALE", "F"), ("Other", "O"), ("男", "M"), ("女", "F"),
     ("", ""), ("U", ""), ("unknown", ""), ("X", ""), ("MF", ""), ("1", "")],
)  # fmt: skip
def test_sex_is_m_f_o_or_nothing(raw: str, kept: str) -> None:
    assert clean_sex(raw) == kept


@pytest.mark.parametrize(
    "raw, kept",
    [("19630201", "19630201"), ("1963.02.01", "19630201"), ("1963-02-01", "19630201"), ("20261204", "20261204"),
     ("19630231", ""), ("19631301", ""), ("abc", ""), ("1963", ""), ("196302011", ""), ("01/02/1963", ""),
     ("18491231", ""), ("20261205", ""), ("", "")],
)  # fmt: skip
def test_birth_date_is_a_real_past_date_or_nothing(raw: str, kept: str) -> None:
    assert clean_birth_date(raw, today=TODAY) == kept


@pytest.mark.parametrize(
    "raw, kept",
    [("045Y", "045Y"), ("045y", "045Y"), ("003M", "003M"), ("012W", "012W"), ("010D", "010D"), ("000Y", "000Y"),
     ("150Y", "150Y"), ("151Y", ""), ("45", ""), ("45Y", ""), ("045", ""), ("045 Y", ""), ("-45Y", ""),
     ("045X", ""), ("forty", ""), ("", "")],
)  # fmt: skip
def test_age_is_dicom_as_or_nothing(raw: str, kept: str) -> None:
    assert clean_age(raw) == kept


@pytest.mark.parametrize(
    "raw, kept",
    [("outpatient", "outpatient"), ("Inpatient", "inpatient"), ("EMERGENCY", "emergency"), ("ward", ""), ("", "")],
)
def test_patient_class_is_the_vocabulary_or_nothing(raw: str, kept: str) -> None:
    assert clean_patient_class(raw) == kept


def test_invalid_values_are_dropped_and_named_never_refused() -> None:
    context, dropped = cleaned(id="P-1", sex="male?", birth_date="1963-02-31", age="63", patient_class="ward")
    assert context == PatientContext(id="P-1")
    assert sorted(dropped) == ["age", "birth_date", "patient_class", "sex"]
    with pytest.raises(TypeError):
        cleaned(nickname="x")


def test_text_is_one_line_kept_as_given_and_cut_to_its_column() -> None:
    pn = "Wang^Xiaoming=王^小明"
    context = PatientContext.of(name=f" {pn} \x00", referring_physician="Li^Wei\r\nX", id="A" * 100)
    assert context.name == pn  # the PN's groups (alphabetic = ideographic) as given, DICOM padding gone
    assert context.referring_physician == "Li^Wei  X"  # no line break reaches a column
    assert PatientContext.of(name="Li\u2028Lei\u202e^Wei").name == "Li Lei^Wei"  # nor a reordering of what is shown
    assert context.id == "A" * MAX_LENGTH["id"]
    long = PatientContext.of(name="张" * 300, referring_physician="x" * 300)
    assert len(long.name) == MAX_LENGTH["name"] and len(long.referring_physician) == MAX_LENGTH["referring_physician"]


def test_the_files_values_win_and_the_request_fills_the_rest() -> None:
    file = PatientContext(id="F-1", name="File^Name", sex="F")
    request = PatientContext(id="R-1", name="Request^Name", age="063Y", patient_class="emergency")
    assert file.over(request) == PatientContext(
        id="F-1", name="File^Name", sex="F", age="063Y", patient_class="emergency"
    )
    assert PatientContext().over(request) == request
    row = {**file.columns(), "id": "exam-id"}
    assert PatientContext.from_row(row) == file


def test_the_repr_names_fields_never_values() -> None:
    context = PatientContext(id="PHI-ID-1", name="PHI_CANARY", birth_date="19500101")
    text = repr(context) + str(context) + f"{context}"
    assert "PHI" not in text and "1950" not in text
    assert "name" in text and "birth_date" in text
    assert not PatientContext() and context


@pytest.mark.parametrize(
    "comments, age, sex",
    [
        (["<age>: 63  <sex>: M  <diagnoses>: none"], "063Y", "M"),  # PhysioNet long-term databases
        (["Age: 63 Sex: male"], "063Y", "M"),
        (["age: 81", "sex: female", "ECG date: 01/10/1990"], "081Y", "F"),  # PTB (ptbdb)
        (["Age: 74", "Sex: Male", "Dx: 164889003"], "074Y", "M"),  # challenge data
        (["69 M 1085 1629 x1", "Aldomet, Inderal"], "069Y", "M"),  # MIT-BIH's first line
        (["?? F 1085 1629 x1"], "", "F"),
        (["gender=F age=045Y"], "045Y", "F"),
        (["age: 8 months", "sex: f"], "008M", "F"),
        (["age: 12d"], "012D", ""),
        (["Age: 63 M"], "063Y", ""),  # a bare letter after a space is not a unit, nor a keyed sex
        (["age: 300", "sex: M"], "", "M"),  # PTB-XL's 300: above 89, not an age
        (["Age: NaN", "Sex: Unknown", "age: 55"], "055Y", ""),  # the first valid value of each
        (["age: -5", "sex: 2"], "", ""),
        (["Reason for admission: Myocardial infarction"], "", ""),
        ([], "", ""),
    ],
)
def test_age_and_sex_from_wfdb_comments(comments: list[str], age: str, sex: str) -> None:
    found = from_wfdb_comments(comments)
    assert (found.age, found.sex) == (age, sex)
    assert found.present() == [f for f, v in (("sex", sex), ("age", age)) if v]  # nothing else is read


def test_age_from_texts_in_words_and_letters() -> None:
    assert [age_from_text(t) for t in ("63", "63 years", "63.9", "2 weeks", "3mo", "063Y", "", "?", "1000")] == [
        "063Y", "063Y", "063Y", "002W", "003M", "063Y", "", "", "",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "born, on, age",
    [
        ("19630201", date(2026, 12, 3), "063Y"),
        ("19631204", date(2026, 12, 3), "062Y"),  # the birthday is tomorrow
        ("19631203", date(2026, 12, 3), "063Y"),
        ("20250101", date(2026, 12, 3), "023M"),  # under two years: months
        ("20261101", date(2026, 12, 3), "001M"),
        ("20261110", date(2026, 12, 3), "023D"),  # under a month: days
        ("20261203", date(2026, 12, 3), "000D"),
        ("20240229", date(2026, 2, 28), "023M"),
        ("20261204", date(2026, 12, 3), ""),  # born after the exam
        ("", date(2026, 12, 3), ""),
        ("19630231", date(2026, 12, 3), ""),
    ],
)
def test_the_age_at_the_exam_date(born: str, on: date, age: str) -> None:
    assert age_at(born, on) == age
