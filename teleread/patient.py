"""The patient context of an exam: who the patient is and who asked for the exam, as the site knows
it. Owns the rule for each value (what is kept, what is dropped, how long it may be), the reading of
age and sex from WFDB header comments, and the age at a date in DICOM's AS form.

Values come from untrusted files and requests: an invalid sex, date, age or patient class becomes ''
(never an error: the exam is still read), text loses its control characters and is cut to its
column's length. Nothing here logs; a :class:`PatientContext`'s repr names the fields that are set,
never their values, so one that reaches a log line or a traceback carries no patient data.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from teleread.vocab import PatientClass, Sex

# field -> exams column
COLUMNS = {
    "id": "patient_id",
    "name": "patient_name",
    "sex": "patient_sex",
    "birth_date": "patient_birth_date",
    "age": "patient_age",
    "referring_physician": "referring_physician",
    "patient_class": "patient_class",
}
MAX_LENGTH = {"id": 64, "name": 200, "referring_physician": 200}  # the columns' lengths, in characters
MAX_AGE_YEARS = 150
EARLIEST_BIRTH_YEAR = 1850

_SEX = {
    "M": Sex.MALE, "MALE": Sex.MALE, "男": Sex.MALE,
    "F": Sex.FEMALE, "FEMALE": Sex.FEMALE, "女": Sex.FEMALE,
    "O": Sex.OTHER, "OTHER": Sex.OTHER,
}  # fmt: skip
_AS = re.compile(r"(\d{3})([DWMY])", re.ASCII)
_DATE = re.compile(r"(\d{4})[-.]?(\d{2})[-.]?(\d{2})", re.ASCII)  # DA; also ACR-NEMA's yyyy.mm.dd and ISO
_AS_LIMITS = {"D": MAX_AGE_YEARS * 366, "W": MAX_AGE_YEARS * 53, "M": MAX_AGE_YEARS * 12, "Y": MAX_AGE_YEARS}

# WFDB header comments: "<age>: 63 <sex>: M" (PhysioNet long-term databases), "age: 81" and
# "sex: female" on lines of their own (PTB), "Age: 63 Sex: male" (challenge data), and MIT-BIH's
# first comment line "69 M 1085 1629 x1" (age and sex first).
# A unit written after a space is a word ("8 months"); a letter only when attached ("8m"), so a sex
# after an age ("63 M") is never read as months.
_WORD_UNITS = r"years?|yrs?|months?|mo|weeks?|wk|days?"
_WFDB_AGE = re.compile(rf"(\d{{1,3}})(?:\.\d+)?(?:([ymwd])\b|\s*({_WORD_UNITS})\b)?", re.IGNORECASE)
_KEYED = re.compile(
    rf"<?\b(age|sex|gender)\b>?\s*[:=]\s*(\d{{1,3}}(?:\.\d+)?(?:[ymwd]\b|\s*(?:{_WORD_UNITS})\b)?|[^\s<>,;:]+)",
    re.IGNORECASE,
)
_MIT_FIRST_LINE = re.compile(r"\s*(\d{1,3}|\?+)\s+([MF?])(?:\s|$)")
_UNIT_LETTER = {"y": "Y", "m": "M", "w": "W", "d": "D"}


@dataclass(frozen=True, repr=False)
class PatientContext:
    """The patient context of one exam; '' where unknown. Build it with :meth:`of` (which cleans
    every value) unless the values are already clean (read back from the database)."""

    id: str = ""
    name: str = ""
    sex: str = ""
    birth_date: str = ""
    age: str = ""
    referring_physician: str = ""
    patient_class: str = ""

    def __repr__(self) -> str:  # never the values
        return f"PatientContext(set={self.present()})"

    def __bool__(self) -> bool:
        return bool(self.present())

    def present(self) -> list[str]:
        """The names of the fields that hold a value."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @classmethod
    def of(cls, **raw: Any) -> PatientContext:
        """The context with each value cleaned (see :func:`cleaned`)."""
        return cleaned(**raw)[0]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PatientContext:
        """The context an exam row holds (its patient columns)."""
        return cls(**{name: str(row.get(column) or "") for name, column in COLUMNS.items()})

    def columns(self) -> dict[str, str]:
        """The exam row's patient columns with these values."""
        return {column: getattr(self, name) for name, column in COLUMNS.items()}

    def over(self, fallback: PatientContext) -> PatientContext:
        """These values, and ``fallback``'s where these are ''."""
        return replace(fallback, **{name: getattr(self, name) for name in self.present()})


def cleaned(**raw: Any) -> tuple[PatientContext, list[str]]:
    """A context from raw values (files, requests), and the names of the fields whose value was
    dropped as invalid. Unknown keywords raise TypeError (a programming error, not input)."""
    out: dict[str, str] = {}
    dropped = []
    for name, value in raw.items():
        if name not in COLUMNS:
            raise TypeError(f"no patient field {name}")
        text = _text(value)
        clean = _CLEANERS[name](text)
        if text and not clean:
            dropped.append(name)
        out[name] = clean
    return PatientContext(**out), dropped


_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})  # control characters, line and paragraph separators
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder shown text


def _text(value: Any) -> str:
    """A value as one line of text: control characters (NUL and DICOM padding too) and line
    separators become spaces, bidirectional overrides go (they could make a name show as another),
    surrounding spaces go."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    kept = (" " if unicodedata.category(ch) in _LINE_BREAKING else ch for ch in text if ch not in _BIDI_CONTROLS)
    return "".join(kept).strip()


def _bounded(name: str) -> Callable[[str], str]:
    limit = MAX_LENGTH[name]
    return lambda text: text[:limit].rstrip()


def clean_sex(text: str) -> str:
    """M, F or O (also from male/female/other and 男/女, in any case); '' otherwise."""
    return str(_SEX.get(text.strip().upper(), ""))


def clean_birth_date(text: str, *, today: date | None = None) -> str:
    """A real calendar date as YYYYMMDD (also read from yyyy.mm.dd and yyyy-mm-dd), not before 1850
    and not after today (UTC, with a day's slack for time zones); '' otherwise."""
    match = _DATE.fullmatch(text.strip())
    if match is None:
        return ""
    try:
        born = date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:  # 31 February and the like
        return ""
    latest = (today or datetime.now(UTC).date()) + timedelta(days=1)
    if born.year < EARLIEST_BIRTH_YEAR or born > latest:
        return ""
    return born.strftime("%Y%m%d")


def clean_age(text: str) -> str:
    """A DICOM AS age (three digits and D, W, M or Y; the letter in either case) up to 150 years;
    '' otherwise."""
    match = _AS.fullmatch(text.strip().upper())
    if match is None or int(match[1]) > _AS_LIMITS[match[2]]:
        return ""
    return match[0]


def clean_patient_class(text: str) -> str:
    """outpatient, inpatient or emergency (in any case); '' otherwise."""
    value = text.strip().lower()
    return value if value in set(PatientClass) else ""


_CLEANERS: dict[str, Callable[[str], str]] = {
    "sex": clean_sex,
    "birth_date": clean_birth_date,
    "age": clean_age,
    "patient_class": clean_patient_class,
    **{name: _bounded(name) for name in MAX_LENGTH},
}


# ---- WFDB header comments ------------------------------------------------------------------------
def age_from_text(text: str) -> str:
    """An age as WFDB comments and people write it ("63", "63 years", "8 months", "12d", "063Y") in
    DICOM AS; '' when it is not one (unknown, negative, above 150 years: PTB-XL writes 300 for ages
    above 89)."""
    match = _WFDB_AGE.fullmatch(text.strip())
    if match is None:
        return ""
    unit = _UNIT_LETTER[(match[2] or match[3] or "y")[0].lower()]
    return clean_age(f"{int(match[1]):03d}{unit}")


def from_wfdb_comments(comments: Sequence[str]) -> PatientContext:
    """Age and sex from a WFDB header's comment lines (the text after each '#'); the first value of
    each wins. Anything else in the comments (diagnoses, medication) is not read."""
    found: dict[str, str] = {}
    for line in comments:
        for key, value in _KEYED.findall(str(line)):
            field = "age" if key.lower() == "age" else "sex"
            if field not in found:
                clean = age_from_text(value) if field == "age" else clean_sex(value)
                if clean:
                    found[field] = clean
    if comments and ("age" not in found or "sex" not in found):
        first = _MIT_FIRST_LINE.match(str(comments[0]))
        if first is not None:
            found.setdefault("age", age_from_text(first[1]))
            found.setdefault("sex", clean_sex(first[2]))
    return PatientContext(age=found.get("age", ""), sex=found.get("sex", ""))


# ---- as a reader reads them ------------------------------------------------------------------
_AGE_UNITS = {"D": "d", "W": "wk", "M": "mo", "Y": "y"}


def person_name(pn: str) -> str:
    """A DICOM PN as a reader reads it (as the reading station shows it): the ideographic group's
    components joined, the alphabetic one's in brackets after it ("Wang^Xiaoming=王^小明" ->
    "王小明 (Wang Xiaoming)"); only the alphabetic group, its components with spaces."""
    groups = (pn or "").split("=")
    latin = " ".join(part for part in groups[0].split("^") if part)
    cjk = "".join(part for part in (groups[1] if len(groups) > 1 else "").split("^") if part)
    if cjk:
        return f"{cjk} ({latin})" if latin else cjk
    return latin


def age_text(age: str) -> str:
    """A DICOM AS age as people write it ("063Y" -> "63 y", "008M" -> "8 mo", "012D" -> "12 d")."""
    match = _AS.fullmatch(age or "")
    return f"{int(match[1])} {_AGE_UNITS[match[2]]}" if match else (age or "")


# ---- the age at a date -----------------------------------------------------------------------
def age_at(birth_date: str, on: date) -> str:
    """The age on ``on`` of someone born on ``birth_date`` (YYYYMMDD) in DICOM AS: days under one
    month, months under two years, years from two; '' when the birth date is not a date or is after ``on``."""
    match = _DATE.fullmatch(birth_date or "")
    if match is None:
        return ""
    try:
        born = date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return ""
    if born > on:
        return ""
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    months = (on.year - born.year) * 12 + on.month - born.month - (on.day < born.day)
    if months < 1:
        return f"{(on - born).days:03d}D"
    if years < 2:
        return f"{months:03d}M"
    return f"{years:03d}Y" if years <= MAX_AGE_YEARS else ""


def age_on(context: PatientContext, on: date | None) -> str:
    """The patient's age at an exam: the recorded one, or with only a birth date the age on ``on``
    (the exam's date); '' when neither is known."""
    if context.age or not context.birth_date or on is None:
        return context.age
    return age_at(context.birth_date, on)
