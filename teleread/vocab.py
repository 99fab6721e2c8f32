"""The network's vocabulary: one string enum per kind of name that crosses modules, the database or
the wire, and the one rule for what counts as an ECG.

The enums are ``StrEnum``: a member equals its value (``Priority.STAT == "stat"``), so rows, JSON
and settings keep plain strings, and code that compares or stores them names a member instead of
spelling a string.
"""

from __future__ import annotations

from enum import StrEnum


class Priority(StrEnum):
    """The priority the requesting clinician asked for."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """0 for stat, 1 urgent, 2 routine: sorts most urgent first."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}


class PatientClass(StrEnum):
    """Where the patient is being seen (HL7 PV1-2's classes that a clinic sends); '' when not said."""

    OUTPATIENT = "outpatient"
    INPATIENT = "inpatient"
    EMERGENCY = "emergency"


class Sex(StrEnum):
    """The patient's sex as DICOM (0010,0040) spells it; '' when not recorded."""

    MALE = "M"
    FEMALE = "F"
    OTHER = "O"


class Level(StrEnum):
    """Urgency of an exam after triage."""

    ROUTINE = "routine"
    URGENT = "urgent"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """Severity: 0 routine, 1 urgent, 2 critical (higher is more urgent)."""
        return _SEVERITY[self]

    @property
    def queue_rank(self) -> int:
        """Place in the reading queue, as stored in ``exams.level_rank``: 1 critical, 2 urgent,
        3 routine (9 for an exam not yet triaged); sorts most urgent first."""
        return 3 - _SEVERITY[self]


_SEVERITY = {Level.ROUTINE: 0, Level.URGENT: 1, Level.CRITICAL: 2}


class ExamKind(StrEnum):
    """Decides the specialty that reads an exam."""

    ECG = "ecg"
    IMAGING = "imaging"


class ObjectRole(StrEnum):
    """What one stored object of an exam is."""

    DICOM = "dicom"
    WFDB_HEADER = "wfdb_header"
    WFDB_SIGNAL = "wfdb_signal"


class ExamState(StrEnum):
    """Where an exam is in its life cycle (``teleread.lifecycle`` owns the moves between them)."""

    RECEIVING = "receiving"
    RECEIVED = "received"
    TRIAGED = "triaged"
    QUEUED = "queued"
    IN_READING = "in_reading"
    REPORTED = "reported"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    REJECTED = "rejected"
    EXPIRED = "expired"


class ReportStatus(StrEnum):
    """The status of a report's latest version."""

    DRAFT = "draft"
    PRELIMINARY = "preliminary"
    AWAITING_COUNTERSIGNATURE = "awaiting_countersignature"
    SECOND_READER_CHECK = "second_reader_check"
    FINAL = "final"
    AMENDED = "amended"


class CriticalState(StrEnum):
    """A critical result version's communication to the clinic."""

    NOTIFIED = "notified"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"


class TimerStatus(StrEnum):
    """A durable deadline (``reader/hub/timers.py``)."""

    PENDING = "pending"
    FIRED = "fired"
    FAILED = "failed"  # its handler failed every attempt: logged, left for a person


class NotificationStatus(StrEnum):
    """A notification to a hook (``reader/hub/notify.py``)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # every attempt failed, or no hook is configured: logged


class UploadStatus(StrEnum):
    """One object's upload into an exam."""

    PARTIAL = "partial"
    STORED = "stored"
    DUPLICATE = "duplicate"
    REFUSED = "refused"  # the bytes were refused (a refusal record says why)
    REJECTED = "rejected"  # refused at begin, before any byte (a refusal record says why)
    EXPIRED = "expired"


class OutboxState(StrEnum):
    """An exam in a clinic gateway's outbox (its own SQLite ledger, not the hub's database)."""

    COLLECTING = "collecting"  # objects still arriving
    READY = "ready"  # complete, waiting for the forwarder (or for its next try)
    UPLOADING = "uploading"  # the forwarder's claim: being sent to the hub
    COMMITTED = "committed"  # the hub committed it
    REJECTED = "rejected"  # the hub refused it for good; kept for a person to look at


class Grade(StrEnum):
    """A reader's grade on the roster: a trainee's report needs an attending's countersignature; a
    department head also sees the department's whole queue, its breaches and its register."""

    ATTENDING = "attending"
    TRAINEE = "trainee"
    DEPARTMENT_HEAD = "department_head"


class ShiftKind(StrEnum):
    """A roster shift: on duty (offered exams, alerted) or on call (reached by escalations)."""

    DUTY = "duty"
    ON_CALL = "on_call"


class Role(StrEnum):
    """What a person or a machine identity may do."""

    SITE = "site"  # a clinic's machine identity: upload and pull results for its site
    TECHNICIAN = "technician"
    RESULT_PULLER = "result_puller"
    CARDIOLOGIST = "cardiologist"
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


# Cardiac waveforms, read by cardiologists: 12-lead, general and ambulatory ECG, hemodynamic, and
# basic cardiac electrophysiology. Audio, arterial pulse and respiratory waveforms are not ECGs.
ECG_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG
        "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG
        "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG
        "1.2.840.10008.5.1.4.1.1.9.2.1",  # Hemodynamic waveform
        "1.2.840.10008.5.1.4.1.1.9.3.1",  # Basic cardiac electrophysiology waveform
    }
)
ECG_MODALITIES = frozenset({"ECG", "HD"})


def is_ecg(*, sop_class_uid: str = "", modality: str = "") -> bool:
    """The one rule: an ECG is a cardiac waveform SOP class, or says modality ECG (or HD)."""
    return sop_class_uid in ECG_SOP_CLASSES or modality.strip().upper() in ECG_MODALITIES
