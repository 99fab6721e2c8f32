"""Reports and results on the in-memory repository and a fake clock: draft, sign and publish in one
unit of work; a lapsed claim cannot sign; amendments as new versions under the signer's or an
amendment claim's authority; each site's gapless result cursor; and a refused step that leaves
nothing behind."""

from __future__ import annotations

from datetime import timedelta

import pytest

from teleread.auth import Principal
from teleread.clock import EPOCH, FakeClock
from teleread.errors import Conflict, InvalidInput, LeaseLost, NotFound, PermissionDenied
from teleread.events import EventBus
from teleread.reader.hub.queue import QueueService
from teleread.reader.hub.reports import ReportService, content_hash
from teleread.reader.hub.repository import MemoryStore, MemoryUnitOfWork
from teleread.reader.hub.results import ResultsService
from teleread.vocab import CriticalState, ExamState, Level, ReportStatus, Role

LI = Principal(id=1, name="dr-li", role=Role.CARDIOLOGIST, site_id=None, site_code=None, hospital="county",
               specialty="cardiology")  # fmt: skip
WANG = Principal(id=2, name="dr-wang", role=Role.CARDIOLOGIST, site_id=None, site_code=None, hospital="county",
                 specialty="cardiology")  # fmt: skip
CLINIC_A = Principal(id=10, name="clinic-a", role=Role.SITE, site_id=1, site_code="clinic-a", hospital=None,
                     specialty=None)  # fmt: skip
CLINIC_B = Principal(id=11, name="clinic-b", role=Role.SITE, site_id=2, site_code="clinic-b", hospital=None,
                     specialty=None)  # fmt: skip


class Rig:
    def __init__(self) -> None:
        self.store, self.clock = MemoryStore(names={1: "dr-li", 2: "dr-wang"}), FakeClock()
        uow, bus = MemoryUnitOfWork(self.store), EventBus()
        self.queue = QueueService(
            engine=None, store=None, bus=bus, lease_seconds=600, max_lease_seconds=3600, clock=self.clock, uow=uow
        )
        self.reports = ReportService(queue=self.queue, bus=bus)
        self.results = ResultsService(uow=uow, bus=bus)

    def exam(self, exam_id: str, *, site_id: int = 1) -> None:
        self.store.add(
            id=exam_id, site_id=site_id, state=ExamState.QUEUED, hospital="county", specialty="cardiology",
            level_rank=Level.ROUTINE.queue_rank, deadline=EPOCH + timedelta(hours=1), received_at=EPOCH,
        )  # fmt: skip

    def signed(self, exam_id: str, reader: Principal = LI, *, critical: bool = False) -> int:
        claim = self.queue.claim(reader, exam_id=exam_id)
        self.reports.save(reader, exam_id=exam_id, fence=claim["fence"], text="Sinus rhythm.", critical=critical)
        self.reports.sign(reader, exam_id=exam_id, fence=claim["fence"])
        return int(claim["fence"])

    def types(self) -> list[str]:
        return [e["type"] for e in self.store.events]


@pytest.fixture()
def rig() -> Rig:
    return Rig()


def test_draft_saved_twice_then_signed_publishes_one_result_and_reports_the_exam(rig: Rig) -> None:
    rig.exam("e1")
    claim = rig.queue.claim(LI, exam_id="e1")
    first = rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="draft one")
    again = rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="Sinus rhythm.", impression="Normal ECG")
    assert again.id == first.id, "a second save of a draft updates it in place"
    assert (first.version, again.version, again.status) == (1, 1, ReportStatus.DRAFT)
    assert again.text == "Sinus rhythm." and again.signed_at is None
    rig.clock.advance(30)
    signed = rig.reports.sign(LI, exam_id="e1", fence=claim["fence"])
    assert signed.status == ReportStatus.FINAL and signed.signed_by == 1 and signed.signed_at == rig.clock.now()
    assert signed.sha256 == content_hash(
        exam_id="e1", version=1, text="Sinus rhythm.", impression="Normal ECG", critical=False, signer="dr-li"
    )
    exam = rig.store.exams["e1"]
    assert (exam["state"], exam["claimed_by"], exam["lease_expires_at"]) == (ExamState.REPORTED, None, None)
    assert rig.types() == ["claimed", "drafted", "draft_saved", "reported"]
    assert rig.store.events[-1]["detail"] == {"cursor": 1}
    [result] = rig.results.list_after(CLINIC_A, after=0)
    assert (result.seq, result.critical, result.critical_state, result.signer_name) == (1, False, "", "dr-li")
    assert result.report == signed and result.exam["state"] == ExamState.REPORTED
    with pytest.raises(LeaseLost) as err:  # signing ended the claim
        rig.reports.sign(LI, exam_id="e1", fence=claim["fence"])
    assert err.value.reason == "LEASE_LOST" and len(rig.store.results) == 1


def test_a_lapsed_claim_cannot_save_or_sign_and_changes_nothing(rig: Rig) -> None:
    rig.exam("e1")
    claim = rig.queue.claim(LI, exam_id="e1", lease_seconds=60)
    rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="Sinus rhythm.")
    rig.clock.advance(61)
    before = (dict(rig.store.exams["e1"]), dict(rig.store.reports), list(rig.store.events))
    with pytest.raises(LeaseLost) as err:
        rig.reports.sign(LI, exam_id="e1", fence=claim["fence"])
    assert err.value.reason == "LEASE_LOST"
    with pytest.raises(LeaseLost):
        rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="changed")
    assert (rig.store.exams["e1"], rig.store.reports, rig.store.events) == before
    assert rig.store.results == [] and rig.results.list_after(CLINIC_A, after=0) == []


def test_an_empty_or_oversized_report_is_refused_before_anything_is_read(rig: Rig) -> None:
    rig.exam("e1")
    claim = rig.queue.claim(LI, exam_id="e1")
    with pytest.raises(InvalidInput) as err:
        rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="   ")
    assert err.value.reason == "EMPTY_REPORT"
    with pytest.raises(InvalidInput) as err:
        rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="x" * 20001)
    assert err.value.reason == "REPORT_TOO_LONG"
    with pytest.raises(Conflict) as no_draft:
        rig.reports.sign(LI, exam_id="e1", fence=claim["fence"])
    assert no_draft.value.reason == "NO_DRAFT" and rig.store.reports == {}


def test_a_critical_result_starts_its_track_at_notified(rig: Rig) -> None:
    rig.exam("e1")
    rig.signed("e1", critical=True)
    [row] = rig.store.results
    assert (row["critical"], row["critical_state"]) == (True, CriticalState.NOTIFIED)
    assert rig.types()[-1] == "critical_result"
    assert rig.results.get(CLINIC_A, exam_id="e1").critical_state == CriticalState.NOTIFIED


def test_a_critical_result_is_acknowledged_once_by_a_named_person_with_a_read_back(rig: Rig) -> None:
    rig.exam("e1")
    rig.signed("e1", critical=True)
    rig.exam("e2")
    rig.signed("e2")
    [critical, plain] = rig.results.list_after(CLINIC_A, after=0)
    ack = {"name": "Dr Wang Li", "role": "attending physician", "method": "in_person", "read_back": "3.5 s pause"}
    for bad in ({"method": "fax"}, {"name": ""}, {"role": "x" * 51}, {"read_back": "a\x07b"}):
        with pytest.raises(InvalidInput) as refused:
            rig.results.acknowledge(CLINIC_A, cursor=critical.seq, **{**ack, **bad})
        assert refused.value.reason == "BAD_ACKNOWLEDGEMENT", bad
    with pytest.raises(Conflict) as not_critical:
        rig.results.acknowledge(CLINIC_A, cursor=plain.seq, **ack)
    assert not_critical.value.reason == "NOT_CRITICAL"
    with pytest.raises(NotFound):
        rig.results.acknowledge(CLINIC_A, cursor=99, **ack)
    done = rig.results.acknowledge(CLINIC_A, cursor=critical.seq, **ack)
    assert done.critical_state == CriticalState.ACKNOWLEDGED and done.acknowledgement is not None
    assert done.acknowledgement["name"] == "Dr Wang Li" and done.acknowledgement["method"] == "in_person"
    with pytest.raises(Conflict) as twice:
        rig.results.acknowledge(CLINIC_A, cursor=critical.seq, **ack)
    assert twice.value.reason == "CRITICAL_ALREADY_ACKNOWLEDGED"
    assert rig.types()[-1] == "critical_acknowledged"


def test_amendments_are_new_versions_by_the_signer_or_an_amendment_claim(rig: Rig) -> None:
    rig.exam("e1")
    rig.signed("e1")
    with pytest.raises(PermissionDenied) as denied:  # not the signer, and no claim
        rig.reports.amend(WANG, exam_id="e1", reason="typo", text="Sinus rhythm, LAD.")
    assert denied.value.reason == "AMENDMENT_NEEDS_CLAIM"
    with pytest.raises(InvalidInput) as no_reason:
        rig.reports.amend(LI, exam_id="e1", reason=" ", text="Sinus rhythm, LAD.")
    assert no_reason.value.reason == "NO_REASON"
    v2 = rig.reports.amend(LI, exam_id="e1", reason="axis", text="Sinus rhythm, LAD.")
    assert (v2.version, v2.status, v2.amends_reason, v2.signed_by) == (2, ReportStatus.AMENDED, "axis", 1)
    claim = rig.queue.claim(WANG, exam_id="e1", for_amendment=True)
    with pytest.raises(Conflict) as held:  # the signer may not amend past a live amendment claim
        rig.reports.amend(LI, exam_id="e1", reason="again", text="Sinus rhythm.")
    assert held.value.reason == "AMENDMENT_CLAIMED"
    v3 = rig.reports.amend(
        WANG, exam_id="e1", reason="ST", text="Sinus rhythm, LAD, ST depression.", critical=True, fence=claim["fence"]
    )
    assert (v3.version, v3.signed_by, v3.critical) == (3, 2, True)
    assert rig.store.exams["e1"]["claimed_by"] is None  # the amendment ends the claim
    with rig.queue.uow.read() as tx:
        versions = tx.reports.versions("e1")
    assert [(r.version, r.status) for r in versions] == [
        (1, ReportStatus.FINAL), (2, ReportStatus.AMENDED), (3, ReportStatus.AMENDED),
    ]  # fmt: skip
    assert versions[0].text == "Sinus rhythm."  # a signed version is never changed
    assert rig.types()[-5:] == ["amended", "reported", "amendment_claimed", "amended", "critical_result"]
    assert [r.seq for r in rig.results.list_after(CLINIC_A, after=0)] == [1, 2, 3]
    latest = rig.results.get(CLINIC_A, exam_id="e1")
    assert (latest.seq, latest.report.version, latest.critical, latest.signer_name) == (3, 3, True, "dr-wang")
    with pytest.raises(LeaseLost):  # that claim ended with the amendment
        rig.reports.amend(WANG, exam_id="e1", reason="again", text="x", fence=claim["fence"])


def test_each_site_has_its_own_gapless_cursor_and_sees_only_its_results(rig: Rig) -> None:
    for exam_id, site in (("a1", 1), ("b1", 2), ("a2", 1), ("b2", 2), ("a3", 1)):
        rig.exam(exam_id, site_id=site)
        rig.signed(exam_id)
    assert [(r.seq, r.exam["id"]) for r in rig.results.list_after(CLINIC_A, after=0)] == [
        (1, "a1"), (2, "a2"), (3, "a3"),
    ]  # fmt: skip
    assert [(r.seq, r.exam["id"]) for r in rig.results.list_after(CLINIC_B, after=1)] == [(2, "b2")]
    assert [r.seq for r in rig.results.list_after(CLINIC_A, after=1, limit=1)] == [2]
    with pytest.raises(NotFound) as nf:
        rig.results.get(CLINIC_B, exam_id="a1")
    assert nf.value.reason == "RESULT_NOT_FOUND"
    with pytest.raises(InvalidInput) as bad:
        rig.results.list_after(CLINIC_A, after=-1)
    assert bad.value.reason == "BAD_CURSOR"


def test_a_failure_after_the_report_moved_rolls_back_the_whole_sign(rig: Rig, monkeypatch) -> None:
    rig.exam("e1")
    claim = rig.queue.claim(LI, exam_id="e1")
    rig.reports.save(LI, exam_id="e1", fence=claim["fence"], text="Sinus rhythm.")
    before = (dict(rig.store.exams["e1"]), {k: dict(v) for k, v in rig.store.reports.items()}, list(rig.store.events))

    def broken(*args, **kwargs):
        raise OSError("the database went away")

    monkeypatch.setattr("teleread.reader.hub.repository.MemoryResultRepository.publish", broken)
    with pytest.raises(OSError):
        rig.reports.sign(LI, exam_id="e1", fence=claim["fence"])
    assert (rig.store.exams["e1"], rig.store.reports, rig.store.events) == before
    assert rig.store.reports[1]["status"] == ReportStatus.DRAFT and rig.store.result_seq == {}
