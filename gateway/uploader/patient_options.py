"""What a technician says of the patient when uploading: the ``teleread upload`` options and the
request's ``Patient`` message. The values describe one patient (the command refuses them for files
that make several exams); at the hub the files' own values win and these fill what they lack (all a
WFDB record carries is age and sex). Nothing here prints or logs a value.
"""

from __future__ import annotations

import argparse

from teleread.patient import PatientContext, age_from_text, clean_birth_date
from teleread.v1 import common_pb2
from teleread.vocab import PatientClass, Sex

# Patient field -> its option's dest.
PATIENT_OPTIONS = {
    "id": "patient_id",
    "name": "patient_name",
    "sex": "patient_sex",
    "birth_date": "patient_birth_date",
    "age": "patient_age",
    "referring_physician": "referring_physician",
    "patient_class": "patient_class",
}


def patient_message(patient: PatientContext) -> common_pb2.Patient:
    return common_pb2.Patient(**{name: getattr(patient, name) for name in patient.present()})


def patient_from_args(args: argparse.Namespace) -> PatientContext | None:
    """The patient options given (None when none was)."""
    context = PatientContext.of(**{name: getattr(args, dest, None) or "" for name, dest in PATIENT_OPTIONS.items()})
    return context or None


def _birth_date(text: str) -> str:
    value = clean_birth_date(text)
    if not value:
        raise argparse.ArgumentTypeError("not a past date (YYYYMMDD)")
    return value


def _age(text: str) -> str:
    value = age_from_text(text)
    if not value:
        raise argparse.ArgumentTypeError("not an age (63, 63Y; 8M for months, 2W weeks, 12D days)")
    return value


def add_patient_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "patient (one exam's files only; values in the files win, these fill what they lack, e.g. for WFDB)"
    )
    group.add_argument("--patient-id", dest="patient_id", help="the clinic's patient ID")
    group.add_argument("--patient-name", dest="patient_name", help="as DICOM writes it, e.g. Wang^Xiaoming=王^小明")
    group.add_argument("--patient-sex", dest="patient_sex", choices=[str(s) for s in Sex])
    group.add_argument("--patient-birth-date", dest="patient_birth_date", type=_birth_date, metavar="YYYYMMDD")
    group.add_argument("--patient-age", dest="patient_age", type=_age, help="e.g. 63, 63Y, 8M, 12D")
    group.add_argument("--referring-physician", dest="referring_physician", help="the requesting clinician")
    group.add_argument("--patient-class", dest="patient_class", choices=[str(c) for c in PatientClass])
