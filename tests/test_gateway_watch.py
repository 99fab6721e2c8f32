"""The clinic gateway's watch folder with real files and a real outbox: only complete exams are
taken (stable for the settle time and structurally whole), DICOM grouped by study, a WFDB record as
one exam ready at once; refused files land in rejected/ with a reason; a full disk leaves files in
place; temporary and hidden files are never touched; no patient data in logs or reason files."""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest

from helpers import copy_testdata, write_synthetic_wfdb
from teleread.errors import ResourceExhausted
from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.clinic.watch import REASON_SUFFIX, WatchFolder, WatchReport
from teleread.gateway.clinic.service import refused_files

CANARY = "PHI_CANARY_ZHANGSAN"
SETTLE = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.box = Outbox(tmp / "outbox")
        self.folder = tmp / "watch"
        self.clock = Clock()
        self.watch = WatchFolder(self.box, self.folder, settle_seconds=SETTLE, clock=self.clock)

    def scan(self, *, after: float = 0.0) -> WatchReport:
        self.clock.now += after
        return self.watch.scan_once()

    def settled_scan(self) -> WatchReport:
        """A first look at the files, then a look once the settle time has passed."""
        self.scan()
        return self.scan(after=SETTLE)

    def exams(self) -> list[Any]:
        rows = self.box._db.execute("SELECT id FROM exams ORDER BY rowid").fetchall()
        return [self.box.exam(r[0]) for r in rows]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.box.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reasons(items: list[Any]) -> dict[str, str]:
    return {item.name: item.reason for item in items}


def with_canary(path: Path, **changes: str) -> Path:
    """Rewrite a DICOM file with patient data we can look for, plus any attribute changes."""
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID = f"{CANARY}^Test", CANARY
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


# ---------------------------------------------------------------------- DICOM


def test_ct_and_ecg_are_taken_grouped_by_study_byte_identical(rig: Rig) -> None:
    ct, ecg = copy_testdata(rig.folder, "CT_small.dcm", "waveform_ecg.dcm")
    second = rig.folder / "ct-second.dcm"  # another instance of the same CT study
    ds = pydicom.dcmread(ct)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(second)
    dropped = {p.name: p.read_bytes() for p in (ct, ecg, second)}
    ct_study = str(ds.StudyInstanceUID)
    ecg_study = str(pydicom.dcmread(ecg, stop_before_pixels=True).StudyInstanceUID)

    first = rig.scan()
    assert first.taken == [] and set(reasons(first.waiting).values()) == {"SETTLING"}
    assert rig.exams() == [] and all(p.exists() for p in (ct, ecg, second))

    report = rig.scan(after=SETTLE)
    assert sorted(t.name for t in report.taken) == sorted(dropped) and report.refused == [] and report.waiting == []
    assert not any(p.exists() for p in (ct, ecg, second))  # removed once the outbox holds them
    by_key = {e.group_key: e for e in rig.exams()}
    assert set(by_key) == {ct_study, ecg_study}
    assert (by_key[ct_study].kind, by_key[ecg_study].kind) == ("image", "ecg")
    # DICOM studies wait for the outbox's quiet period (more instances may follow)
    assert {e.state for e in by_key.values()} == {"collecting"}
    ct_objects = rig.box.objects_of(by_key[ct_study].id)
    assert len(ct_objects) == 2 and {o.role for o in ct_objects} == {"dicom"}
    for taken in report.taken:
        data = dropped[taken.name]
        (obj,) = [o for o in rig.box.objects_of(taken.exam_id) if o.instance_key == taken.instance_key]
        assert obj.sha256 == taken.sha256 == sha256(data) and sha256(obj.path.read_bytes()) == sha256(data)
        assert taken.instance_key == str(pydicom.dcmread(obj.path, stop_before_pixels=True).SOPInstanceUID)


def test_a_file_still_growing_is_not_taken_until_it_stops(rig: Rig) -> None:
    (source,) = copy_testdata(rig.folder.parent / "cart", "CT_small.dcm")
    data = source.read_bytes()
    target = rig.folder / "CT_small.dcm"
    target.write_bytes(data[: len(data) // 2])
    assert reasons(rig.scan().waiting) == {"CT_small.dcm": "SETTLING"}
    rig.clock.now += SETTLE - 0.5
    with target.open("ab") as f:  # the copy goes on just before the settle time runs out
        f.write(data[len(data) // 2 :])
    report = rig.scan()
    assert reasons(report.waiting) == {"CT_small.dcm": "SETTLING"} and report.refused == []
    assert reasons(rig.scan(after=SETTLE - 0.1).waiting) == {"CT_small.dcm": "SETTLING"}
    report = rig.scan(after=0.1)
    assert [t.name for t in report.taken] == ["CT_small.dcm"] and report.refused == []
    (exam,) = rig.exams()
    (obj,) = rig.box.objects_of(exam.id)
    assert obj.path.read_bytes() == data


@pytest.mark.parametrize("name, keep", [("CT_small.dcm", 0.6), ("waveform_ecg.dcm", 0.5), ("CT_small.dcm", 0.1)])
def test_a_stable_truncated_dicom_is_refused_with_a_reason_file(
    rig: Rig, name: str, keep: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    (source,) = copy_testdata(rig.folder.parent / "cart", name)
    data = with_canary(source).read_bytes()
    dropped = rig.folder / f"{CANARY}.dcm"  # staff name files after the patient
    dropped.write_bytes(data[: int(len(data) * keep)])

    report = rig.settled_scan()
    assert [(r.name, r.reason) for r in report.refused] == [(dropped.name, "TRUNCATED")] and report.taken == []
    assert report.refused[0].moved_to == f"rejected/{dropped.name}"
    assert not dropped.exists() and rig.exams() == []
    moved = rig.folder / "rejected" / dropped.name
    assert moved.read_bytes() == data[: int(len(data) * keep)]
    reason_text = (rig.folder / "rejected" / (dropped.name + REASON_SUFFIX)).read_text()
    assert reason_text.startswith("TRUNCATED\n") and "cut short" in reason_text
    # never retried while it sits in rejected/
    again = rig.scan(after=SETTLE * 10)
    assert again.refused == [] and again.waiting == [] and moved.exists()
    # the same name refused again keeps the first one and its reason
    dropped.write_bytes(data[:1000])
    assert [r.moved_to for r in rig.settled_scan().refused] == [f"rejected/2/{dropped.name}"]
    assert (rig.folder / "rejected" / "2" / (dropped.name + REASON_SUFFIX)).exists() and moved.exists()
    for text in [reason_text, caplog.text, *(str(r.__dict__) for r in caplog.records)]:
        assert CANARY not in text


def test_a_bad_uid_is_refused(rig: Rig) -> None:
    (path,) = copy_testdata(rig.folder, "CT_small.dcm")
    with pytest.warns(UserWarning):  # pydicom warns while writing the bad value
        with_canary(path, StudyInstanceUID="1.2.840/../../etc")
    report = rig.settled_scan()
    assert [(r.name, r.reason) for r in report.refused] == [("CT_small.dcm", "BAD_UID")]
    assert "UID" in report.refused[0].message and ".." not in report.refused[0].message
    assert rig.exams() == [] and (rig.folder / "rejected" / "CT_small.dcm").exists()


def test_an_instance_resent_with_other_bytes_is_refused(rig: Rig) -> None:
    (path,) = copy_testdata(rig.folder, "CT_small.dcm")
    original = path.read_bytes()
    assert [t.name for t in rig.settled_scan().taken] == ["CT_small.dcm"]
    copy_testdata(rig.folder, "CT_small.dcm")
    with_canary(rig.folder / "CT_small.dcm")  # same SOP Instance UID, different content
    report = rig.settled_scan()
    assert [(r.name, r.reason) for r in report.refused] == [("CT_small.dcm", "INSTANCE_CONFLICT")]
    (exam,) = rig.exams()
    (obj,) = rig.box.objects_of(exam.id)
    assert obj.path.read_bytes() == original


def test_files_that_are_neither_dicom_nor_wfdb(rig: Rig) -> None:
    (rig.folder / "notes.txt").write_text("call the clinic back")
    (rig.folder / "orphan.dat").write_bytes(b"\x00" * 100)  # a signal file whose header is still coming
    report = rig.settled_scan()
    assert [(r.name, r.reason) for r in report.refused] == [("notes.txt", "NOT_DICOM")]
    assert reasons(report.waiting) == {"orphan.dat": "WFDB_HEADER_MISSING"}
    assert (rig.folder / "orphan.dat").exists() and (rig.folder / "rejected" / "notes.txt").exists()


def test_garbage_after_a_dicom_preamble_is_refused_never_crashes(rig: Rig) -> None:
    (ct,) = copy_testdata(rig.folder.parent / "cart", "CT_small.dcm")
    data = ct.read_bytes()
    rng = random.Random(7)
    rig.folder.joinpath("noise.dcm").write_bytes(bytes(128) + b"DICM" + rng.randbytes(4000))
    rig.folder.joinpath("empty.dcm").write_bytes(b"")
    for n in range(8):  # bytes flipped here and there in a real file
        mangled = bytearray(data)
        for _ in range(20):
            mangled[rng.randrange(132, 3000)] = rng.randrange(256)
        rig.folder.joinpath(f"mangled-{n}.dcm").write_bytes(bytes(mangled))
    report = rig.settled_scan()
    assert report.waiting == []
    assert all(r.reason and r.message and r.moved_to for r in report.refused)
    dropped = {"noise.dcm", "empty.dcm", *(f"mangled-{n}.dcm" for n in range(8))}
    assert {r.name for r in report.refused} | {t.name for t in report.taken} == dropped
    assert reasons(report.refused)["noise.dcm"] in ("TRUNCATED", "DICOM_UNREADABLE", "DICOM_NO_META")
    assert reasons(report.refused)["empty.dcm"] == "NOT_DICOM"


def test_a_missing_folder_is_an_empty_scan(rig: Rig) -> None:
    rig.folder.rmdir()
    report = rig.scan()
    assert (report.taken, report.waiting, report.refused) == ([], [], [])


# ---------------------------------------------------------------------- WFDB


def test_a_wfdb_pair_is_one_exam_ready_for_upload(rig: Rig) -> None:
    header, signal = write_synthetic_wfdb(rig.folder, rhythm="normal", name="ecg001")
    dropped = {"ecg001.hea": header.read_bytes(), "ecg001.dat": signal.read_bytes()}
    assert rig.scan().taken == []
    report = rig.scan(after=SETTLE)
    assert sorted(t.name for t in report.taken) == sorted(dropped) and report.refused == []
    assert not header.exists() and not signal.exists()
    (exam,) = rig.exams()
    assert exam.kind == "ecg" and exam.state == "ready" and exam.group_key.startswith("wfdb:")
    assert report.group_keys == [exam.group_key]
    objects = {o.role: o for o in rig.box.objects_of(exam.id)}
    assert set(objects) == {"wfdb_header", "wfdb_signal"}
    assert objects["wfdb_header"].path.read_bytes() == dropped["ecg001.hea"]
    assert objects["wfdb_signal"].path.read_bytes() == dropped["ecg001.dat"]
    claimed = rig.box.claim_next()
    assert claimed is not None and claimed.id == exam.id


def test_a_header_whose_signal_never_comes_is_set_aside_after_the_wait(rig: Rig, tmp_path: Path) -> None:
    header, signal = write_synthetic_wfdb(tmp_path / "cart", rhythm="normal", name="ecg001")
    shutil.copy(header, rig.folder / header.name)
    (rig.folder / "lone.dat").write_bytes(signal.read_bytes())  # and a signal file whose header never comes
    rig.scan()
    report = rig.scan(after=rig.watch.wait_seconds - 1)
    assert reasons(report.waiting) == {"ecg001.hea": "WFDB_SIGNAL_MISSING", "lone.dat": "WFDB_HEADER_MISSING"}
    report = rig.scan(after=1)
    refused = {r.name: (r.reason, r.message) for r in report.refused}
    assert refused == {
        "ecg001.hea": ("WFDB_SIGNAL_MISSING", "the signal file the header names did not arrive within 30 min"),
        "lone.dat": ("WFDB_HEADER_MISSING", "no WFDB header naming this signal file arrived within 30 min"),
    }
    reason = (rig.folder / "rejected" / "ecg001.hea.reason.txt").read_text(encoding="utf-8")
    assert reason.startswith("WFDB_SIGNAL_MISSING\n")
    assert refused_files(rig.folder) == 2  # counted in `gateway status`, which then needs a person
    assert rig.exams() == [] and not (rig.folder / "ecg001.hea").exists()


def test_a_header_waits_for_its_signal_file(rig: Rig, tmp_path: Path) -> None:
    header, signal = write_synthetic_wfdb(tmp_path / "cart", rhythm="normal", name="ecg001")
    shutil.copy(header, rig.folder / header.name)
    rig.scan()
    for _ in range(3):  # within the wait, a header without its signal waits
        report = rig.scan(after=SETTLE * 5)
        assert reasons(report.waiting) == {"ecg001.hea": "WFDB_SIGNAL_MISSING"} and report.refused == []
    assert rig.exams() == [] and (rig.folder / "ecg001.hea").exists()
    shutil.copy(signal, rig.folder / signal.name)
    assert reasons(rig.scan().waiting) == {"ecg001.hea": "SETTLING", "ecg001.dat": "SETTLING"}
    report = rig.scan(after=SETTLE)
    assert sorted(t.name for t in report.taken) == ["ecg001.dat", "ecg001.hea"]
    (exam,) = rig.exams()
    assert exam.state == "ready"


@pytest.mark.parametrize("change, reason", [(-1000, "WFDB_SHORT_SIGNAL"), (+10, "WFDB_SIGNAL_SIZE_MISMATCH")])
def test_a_signal_file_of_the_wrong_size_is_refused_with_its_header(
    rig: Rig, change: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    header, signal = write_synthetic_wfdb(rig.folder, rhythm="normal", name="ecg001")
    header.write_text(header.read_text() + f"# patient: {CANARY}\n")
    data = signal.read_bytes()
    signal.write_bytes(data[:change] if change < 0 else data + bytes(change))
    report = rig.settled_scan()
    assert sorted((r.name, r.reason) for r in report.refused) == [("ecg001.dat", reason), ("ecg001.hea", reason)]
    assert str(len(data)) in report.refused[0].message  # names the size the header implies
    assert rig.exams() == [] and not header.exists() and not signal.exists()
    rejected = rig.folder / "rejected"
    assert {p.name for p in rejected.iterdir()} == {
        "ecg001.hea",
        "ecg001.dat",
        "ecg001.hea" + REASON_SUFFIX,
        "ecg001.dat" + REASON_SUFFIX,
    }
    reason_text = (rejected / ("ecg001.dat" + REASON_SUFFIX)).read_text()
    assert reason_text.startswith(reason + "\n")
    for text in [reason_text, caplog.text, *(str(r.__dict__) for r in caplog.records)]:
        assert CANARY not in text


def test_a_bad_header_is_refused_with_its_signal(rig: Rig) -> None:
    (rig.folder / "ecg001.hea").write_text("this is not a WFDB header\n")
    (rig.folder / "ecg001.dat").write_bytes(bytes(2400))
    report = rig.settled_scan()
    assert sorted((r.name, r.reason) for r in report.refused) == [
        ("ecg001.dat", "WFDB_BAD_HEADER"),
        ("ecg001.hea", "WFDB_BAD_HEADER"),
    ]
    assert rig.exams() == [] and report.waiting == []


def test_the_same_record_dropped_twice_is_one_exam(rig: Rig, tmp_path: Path) -> None:
    header, signal = write_synthetic_wfdb(tmp_path / "cart", rhythm="normal", name="ecg001")
    keys = []
    for _ in range(2):
        for f in (header, signal):
            shutil.copy(f, rig.folder / f.name)
        report = rig.settled_scan()
        assert len(report.taken) == 2 and not (rig.folder / "ecg001.hea").exists()
        keys.append(report.group_keys)
    assert keys[0] == keys[1]
    (exam,) = rig.exams()
    assert len(rig.box.objects_of(exam.id)) == 2


def test_two_carts_records_with_the_same_name_stay_apart(rig: Rig) -> None:
    write_synthetic_wfdb(rig.folder / "cart-a", rhythm="normal", name="ecg001", seed=1)
    write_synthetic_wfdb(rig.folder / "cart-b", rhythm="normal", name="ecg001", seed=2)
    report = rig.settled_scan()
    assert sorted(t.name for t in report.taken) == [
        "cart-a/ecg001.dat",
        "cart-a/ecg001.hea",
        "cart-b/ecg001.dat",
        "cart-b/ecg001.hea",
    ]
    exams = rig.exams()
    assert len(exams) == 2 and len({e.group_key for e in exams}) == 2
    assert all(len(rig.box.objects_of(e.id)) == 2 and e.state == "ready" for e in exams)


# ---------------------------------------------------------------------- the folder itself


def test_a_full_disk_leaves_the_files_in_place(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_testdata(rig.folder, "CT_small.dcm", "waveform_ecg.dcm")
    write_synthetic_wfdb(rig.folder, rhythm="normal", name="ecg001")
    before = {p.name: p.read_bytes() for p in rig.folder.iterdir()}
    calls = []

    def full(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["group_key"])
        raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL")

    monkeypatch.setattr(rig.box, "receive", full)
    report = rig.settled_scan()
    assert report.disk_full and report.taken == [] and report.refused == []
    assert set(reasons(report.waiting).values()) == {"GATEWAY_DISK_FULL"} and len(report.waiting) == 4
    assert len(calls) == 1  # once the disk is full, the rest of the scan does not try
    assert {p.name: p.read_bytes() for p in rig.folder.iterdir()} == before
    monkeypatch.undo()
    report = rig.scan(after=1.0)  # the disk has room again: taken on the next scan
    assert not report.disk_full and len(report.taken) == 4 and list(rig.folder.iterdir()) == []


def test_temporary_and_hidden_files_are_never_touched(rig: Rig) -> None:
    (ct,) = copy_testdata(rig.folder, "CT_small.dcm")
    ignored = [
        rig.folder / ".CT_small.dcm",
        rig.folder / "CT_small.dcm.part",
        rig.folder / "exam.tmp",
        rig.folder / "~CT_small.dcm",
        rig.folder / ".staging" / "CT_small.dcm",
        rig.folder / "rejected" / "CT_small.dcm",
    ]
    for path in ignored:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ct, path)
    ct.unlink()
    report = rig.settled_scan()
    assert report.taken == [] and report.refused == [] and report.waiting == []
    assert all(p.exists() for p in ignored) and rig.exams() == []
    # a cart that copies under a temporary name and renames: taken once renamed and settled
    (rig.folder / "CT_small.dcm.part").rename(rig.folder / "CT_small.dcm")
    assert [t.name for t in rig.settled_scan().taken] == ["CT_small.dcm"]
    assert len(rig.exams()) == 1


def test_links_are_refused_not_followed(rig: Rig, tmp_path: Path) -> None:
    (outside,) = copy_testdata(tmp_path / "elsewhere", "CT_small.dcm")
    (rig.folder / "link.dcm").symlink_to(outside)
    report = rig.scan()
    assert [(r.name, r.reason) for r in report.refused] == [("link.dcm", "NOT_A_REGULAR_FILE")]
    assert rig.exams() == [] and outside.exists() and (rig.folder / "rejected" / "link.dcm").is_symlink()
