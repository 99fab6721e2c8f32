"""DICOM validation at ingest (RELIABILITY F12, F14-F17, R26-R29): teleread.gateway.validate."""

from __future__ import annotations

import logging
import random
import struct
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

from teleread.errors import InvalidInput
from teleread.gateway.validate import check_uid, inspect_dicom, sniff_kind, zero_preamble_in_place

CANARY = "PHI_CANARY_张三"
ASCII_CANARY = "PHICANARY19"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Names from RELIABILITY.md "Corpora" (pydicom 3.0.2 wheel); ExplVR_*NoMeta expanded.
CORPUS_NAMES = [
    "MR_truncated.dcm",
    "rtplan_truncated.dcm",
    "badVR.dcm",
    "no_meta.dcm",
    "no_meta_group_length.dcm",
    "meta_missing_tsyntax.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "ExplVR_LitEndNoMeta.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "UN_sequence.dcm",
    "empty_charset_LEI.dcm",
    "waveform_ecg.dcm",
]


def bundled(name: str) -> Path:
    """A file bundled in the installed pydicom wheel (never downloaded)."""
    found = get_testdata_file(name, download=False)
    assert found is not None, f"{name} is not bundled with this pydicom"
    return Path(str(found))


def inspect_or_reject(path: Path) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        inspect_dicom(path)
        outcome = "accepted"
    except InvalidInput as err:
        outcome = err.reason
    return outcome, time.perf_counter() - start


# --- UIDs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1.2.840.10008.1.2", "1.2.840.10008.1.2"),
        ("1.2.3\x00", "1.2.3"),
        ("1.2.3 ", "1.2.3"),
        ("0.0", "0.0"),
        ("1.20.3", "1.20.3"),
        ("1." + "2" * 62, "1." + "2" * 62),
    ],
)
def test_check_uid_accepts_valid_uids(value: str, expected: str) -> None:
    assert check_uid(value, field="SOPInstanceUID") == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../x",
        "/abs",
        "1" * 65,
        "1.2.abc",
        "1..2",
        ".1",
        "1.",
        "01.2",
        "1.02",
        "1.2\n",
        "1.2.3\x00\x00",
        "１.２",
        "1.2 .3",
        "1.2\\1.3",
    ],
)
def test_check_uid_rejects_bad_uids_without_echoing_them(value: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_uid(value, field="StudyInstanceUID")
    assert caught.value.reason == "BAD_UID"
    assert caught.value.message == "StudyInstanceUID is not a valid DICOM UID"


# --- Corpus --------------------------------------------------------------------------------------


def test_reliability_corpus_files_are_accepted_or_rejected_with_a_typed_error() -> None:
    outcomes = {name: inspect_or_reject(bundled(name)) for name in CORPUS_NAMES}
    assert all(seconds < 2.0 for _, seconds in outcomes.values()), outcomes
    assert outcomes["MR_truncated.dcm"][0] == "TRUNCATED"
    assert outcomes["no_meta.dcm"][0] == "DICOM_NO_META"
    assert outcomes["ExplVR_LitEndNoMeta.dcm"][0] == "DICOM_NO_META"
    assert outcomes["meta_missing_tsyntax.dcm"][0] == "DICOM_MISSING_ATTRIBUTE"
    assert outcomes["waveform_ecg.dcm"][0] == "accepted"


def test_every_bundled_pydicom_file_is_accepted_or_rejected_within_two_seconds() -> None:
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 80
    outcomes = {p.relative_to(TEST_FILES).as_posix(): inspect_or_reject(p) for p in files}
    slow = {name: s for name, (_, s) in outcomes.items() if s >= 2.0}
    assert not slow
    accepted = {name for name, (outcome, _) in outcomes.items() if outcome == "accepted"}
    assert {"CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "waveform_ecg.dcm"} <= accepted
    assert outcomes["README.txt"][0] == "DICOM_NO_META"


@pytest.mark.parametrize(
    "name, frames, waveform",
    [
        ("CT_small.dcm", 1, False),
        ("MR_small.dcm", 1, False),
        ("waveform_ecg.dcm", 1, True),
        ("JPEG2000.dcm", 1, False),
        ("MR_small_jp2klossless.dcm", 1, False),
        ("examples_ybr_color.dcm", 30, False),
        ("SC_rgb_rle_2frame.dcm", 2, False),
        ("MR_small_bigendian.dcm", 1, False),
        ("image_dfl.dcm", 1, False),
    ],
)
def test_valid_files_are_accepted_with_their_uids(name: str, frames: int, waveform: bool) -> None:
    path = bundled(name)
    info = inspect_dicom(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.sop_class_uid == ds.SOPClassUID
    assert info.study_instance_uid == ds.StudyInstanceUID
    assert info.series_instance_uid == ds.SeriesInstanceUID
    assert info.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert info.modality == ds.get("Modality")
    assert info.number_of_frames == frames
    assert info.is_waveform is waveform
    if not waveform:
        bits = ds.BitsAllocated
        expected = ds.Rows * ds.Columns * frames * ds.SamplesPerPixel * bits // 8
        assert (info.rows, info.columns, info.pixel_bytes) == (ds.Rows, ds.Columns, expected)
    assert info.preamble_flag is None


def test_validation_mode_is_restored_and_parallel_inspections_agree() -> None:
    names = [
        "CT_small.dcm",
        "MR_truncated.dcm",
        "badVR.dcm",
        "waveform_ecg.dcm",
        "JPEG2000.dcm",
        "rtdose_rle.dcm",
        "no_meta_group_length.dcm",
        "image_dfl.dcm",
    ] * 4
    before = pydicom_config.settings.reading_validation_mode
    serial = [inspect_or_reject(bundled(n))[0] for n in names]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda n: inspect_or_reject(bundled(n))[0], names))
    assert parallel == serial
    assert pydicom_config.settings.reading_validation_mode == before
    assert "accepted" in serial and "DICOM_UNREADABLE" in serial


# --- Crafted files -------------------------------------------------------------------------------


@pytest.fixture
def lenient_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pydicom write the invalid values these tests need."""
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.IGNORE)


def make_dataset(**attributes: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.10"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.11"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12"
    ds.Modality = "CT"
    ds.PatientName = CANARY
    ds.PatientID = CANARY
    ds.Rows = ds.Columns = 2  # an image needs its pixel data
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(4)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def write(ds: Dataset, path: Path, *, preamble: bytes | None = None) -> Path:
    ds.preamble = (preamble or b"").ljust(128, b"\x00")
    ds.save_as(path, enforce_file_format=True)
    return path


def reason_of(path: Path, **kwargs: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        inspect_dicom(path, **kwargs)
    return caught.value


def test_crafted_valid_file_is_accepted(tmp_path: Path) -> None:
    info = inspect_dicom(write(make_dataset(), tmp_path / "ok.dcm"))
    assert info.sop_instance_uid == "1.2.826.0.1.3680043.8.498.10"
    assert (info.rows, info.columns, info.pixel_bytes, info.modality) == (2, 2, 4, "CT")


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_identifying_uid_is_named(tmp_path: Path, keyword: str) -> None:
    err = reason_of(write(make_dataset(**{keyword: None}), tmp_path / "x.dcm"))
    assert err.reason == "DICOM_MISSING_ATTRIBUTE"
    assert keyword in err.message


@pytest.mark.parametrize("bad", ["../x", "/abs", "1" * 65, "1.2.abc"])
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_bad_uids_are_rejected_without_echo(tmp_path: Path, lenient_writing: None, keyword: str, bad: str) -> None:
    ds = make_dataset(**{keyword: bad})
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = bad
    err = reason_of(write(ds, tmp_path / "x.dcm"))
    assert err.reason == "BAD_UID"
    assert err.message == f"{keyword} is not a valid DICOM UID"
    assert bad not in str(err)


def test_file_meta_instance_uid_must_match(tmp_path: Path) -> None:
    data = write(make_dataset(), tmp_path / "x.dcm").read_bytes()
    meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]
    uid = b"1.2.826.0.1.3680043.8.498.10"
    assert data[meta_end:].count(uid) == 1
    altered = data[:meta_end] + data[meta_end:].replace(uid, uid[:-1] + b"3")
    (tmp_path / "x.dcm").write_bytes(altered)
    assert reason_of(tmp_path / "x.dcm").reason == "DICOM_UID_MISMATCH"
    assert reason_of(bundled("rtdose.dcm")).reason == "DICOM_UID_MISMATCH"


def test_files_without_part10_header_are_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert reason_of(empty).reason == "DICOM_NO_META"
    ds = make_dataset()
    ds.save_as(tmp_path / "raw.dcm", enforce_file_format=False)  # no preamble, no file meta
    assert reason_of(tmp_path / "raw.dcm").reason == "DICOM_NO_META"


@pytest.mark.parametrize("magic, flag", [(b"MZ\x90\x00", "pe"), (b"\x7fELF\x02\x01", "elf")])
def test_executable_preamble_is_flagged_and_zeroed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, magic: bytes, flag: str
) -> None:
    path = write(make_dataset(), tmp_path / "polyglot.dcm", preamble=magic + b"\xcc" * 60)
    original = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="teleread"):
        assert inspect_dicom(path).preamble_flag == flag
    assert any(getattr(r, "reason", "") == "DICOM_PREAMBLE_EXECUTABLE" for r in caplog.records)
    assert zero_preamble_in_place(path) is True
    zeroed = path.read_bytes()
    assert zeroed[:128] == bytes(128) and zeroed[128:] == original[128:]
    assert zero_preamble_in_place(path) is False
    assert inspect_dicom(path).preamble_flag is None


def test_zeroing_refuses_non_dicom_files(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_bytes(b"MZ" + b"x" * 200)
    with pytest.raises(InvalidInput):
        zero_preamble_in_place(other)
    assert other.read_bytes() == b"MZ" + b"x" * 200


def explicit_element(group: int, element: int, vr: bytes, *, length: int) -> bytes:
    return struct.pack("<HH", group, element) + vr + b"\x00\x00" + struct.pack("<L", length)


def measure(path: Path) -> tuple[InvalidInput, float, int]:
    inspect_dicom(bundled("CT_small.dcm"))  # warm imports and caches
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidInput) as caught:
            inspect_dicom(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return caught.value, elapsed, peak


def pad_to_1k(data: bytes) -> bytes:
    assert len(data) <= 1024
    return data + b"\x00" * (1024 - len(data))


def test_huge_length_in_dataset_fails_fast_with_bounded_memory(tmp_path: Path) -> None:
    head = write(make_dataset(), tmp_path / "base.dcm").read_bytes()
    path = tmp_path / "huge.dcm"
    path.write_bytes(pad_to_1k(head + explicit_element(0x0029, 0x1010, b"OB", length=0xFFFFFFF0)))
    assert path.stat().st_size == 1024
    err, elapsed, peak = measure(path)
    assert err.reason == "TRUNCATED"  # the length runs past the end of the file
    assert elapsed < 0.1
    assert peak < 64 * 1024**2


def test_huge_length_in_file_meta_fails_fast_with_bounded_memory(tmp_path: Path) -> None:
    data = write(make_dataset(), tmp_path / "base.dcm").read_bytes()
    meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]
    huge = explicit_element(0x0002, 0x0102, b"OB", length=0xFFFFFFF0)
    path = tmp_path / "huge-meta.dcm"
    path.write_bytes(pad_to_1k(data[:meta_end] + huge + data[meta_end:]))
    err, elapsed, peak = measure(path)
    assert err.reason in {"TRUNCATED", "DICOM_UNREADABLE", "DICOM_MISSING_ATTRIBUTE"}
    assert elapsed < 0.1
    assert peak < 64 * 1024**2


def test_truncated_small_element_is_rejected(tmp_path: Path) -> None:
    head = write(make_dataset(), tmp_path / "base.dcm").read_bytes()
    path = tmp_path / "short.dcm"
    short = struct.pack("<HH", 0x0008, 0x103E) + b"LO" + struct.pack("<H", 40) + b"abc"
    path.write_bytes(head + short)
    assert reason_of(path).reason == "TRUNCATED"


def test_truncated_pixel_data_is_rejected_without_decoding(tmp_path: Path) -> None:
    ds = make_dataset(
        Rows=4,
        Columns=4,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        SamplesPerPixel=1,
        PixelRepresentation=0,
        PhotometricInterpretation="MONOCHROME2",
        PixelData=bytes(16),
    )
    data = write(ds, tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:-6])
    assert reason_of(path).reason == "TRUNCATED"


def test_declared_65535_square_image_is_rejected_before_any_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a pixel decoder was started")

    monkeypatch.setattr(pydicom.pixels.decoders.base.DecodeRunner, "__init__", no_decode)
    monkeypatch.setattr(Dataset, "pixel_array", property(no_decode))
    # A J2K codestream header (SOC + SIZ) claiming 65535 x 65535 as the only frame.
    siz = (
        b"\xff\x4f\xff\x51"
        + struct.pack(">HHIIIIIIIIH", 41, 0, 65535, 65535, 0, 0, 65535, 65535, 0, 0, 1)
        + b"\x0f\x01\x01"
    )
    ds = make_dataset(
        Rows=65535,
        Columns=65535,
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        SamplesPerPixel=1,
        PixelRepresentation=0,
        PhotometricInterpretation="MONOCHROME2",
        PixelData=encapsulate([siz]),
    )
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds["PixelData"].VR = "OB"
    path = write(ds, tmp_path / "bomb.dcm")
    tracemalloc.start()
    try:
        err = reason_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.reason == "DICOM_TOO_LARGE"
    assert peak < 64 * 1024**2


def test_frame_count_bomb_and_custom_pixel_bound(tmp_path: Path) -> None:
    many = make_dataset(Rows=512, Columns=512, BitsAllocated=16, SamplesPerPixel=1, NumberOfFrames=100_000)
    assert reason_of(write(many, tmp_path / "frames.dcm")).reason == "DICOM_TOO_LARGE"
    assert reason_of(bundled("CT_small.dcm"), max_pixel_bytes=1000).reason == "DICOM_TOO_LARGE"
    zero = make_dataset(Rows=8, Columns=8, BitsAllocated=8, SamplesPerPixel=1, NumberOfFrames=0)
    assert reason_of(write(zero, tmp_path / "zero.dcm")).reason == "DICOM_BAD_ATTRIBUTE"


def test_deflated_dataset_is_bounded_before_inflation() -> None:
    assert inspect_dicom(bundled("image_dfl.dcm")).transfer_syntax_uid.endswith(".1.2.1.99")
    err = reason_of(bundled("image_dfl.dcm"), max_inflated_bytes=4096)
    assert err.reason == "DICOM_TOO_LARGE"


def test_deeply_nested_sequences_are_rejected(tmp_path: Path) -> None:
    ds = make_dataset()
    item = Dataset()
    ds.ContentSequence = Sequence([item])
    for _ in range(40):
        inner = Dataset()
        item.ContentSequence = Sequence([inner])
        item = inner
    assert reason_of(write(ds, tmp_path / "nested.dcm")).reason == "DICOM_UNREADABLE"


def test_pathologically_nested_undefined_length_sequences_do_not_crash(tmp_path: Path) -> None:
    head = write(make_dataset(), tmp_path / "base.dcm").read_bytes()
    depth = 5000
    opening = explicit_element(0x0040, 0xA730, b"SQ", length=0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path = tmp_path / "deep.dcm"
    path.write_bytes(head + opening * depth + closing * depth)
    outcome, seconds = inspect_or_reject(path)
    assert outcome == "DICOM_UNREADABLE"
    assert seconds < 2.0


def test_rejections_and_logs_carry_no_patient_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lenient_writing: None
) -> None:
    bad_uid = write(make_dataset(StudyInstanceUID="1.2.x9", StudyDescription=CANARY), tmp_path / "uid.dcm")
    # A too-long patient ID holding the canary: pydicom's own exception text quotes it.
    bad_id = write(make_dataset(PatientID=ASCII_CANARY + "X" * 60), tmp_path / "id.dcm")
    with caplog.at_level(logging.DEBUG):
        errors = [reason_of(bad_uid), reason_of(bad_id)]
        accepted = inspect_dicom(write(make_dataset(), tmp_path / "ok.dcm"))
    assert accepted.sop_instance_uid
    assert [err.reason for err in errors] == ["BAD_UID", "DICOM_UNREADABLE"]
    for err in errors:
        assert CANARY not in str(err) and ASCII_CANARY not in str(err)
        assert err.__cause__ is None
    for record in caplog.records:
        assert CANARY not in record.getMessage() and ASCII_CANARY not in record.getMessage()


def test_random_mutations_of_seed_files_only_raise_typed_errors(tmp_path: Path) -> None:
    """A small, seeded F13 run (20,000 mutations ran clean when this was written)."""
    names = ("CT_small.dcm", "MR_small_implicit.dcm", "waveform_ecg.dcm", "JPEG2000.dcm", "image_dfl.dcm")
    seeds = [bundled(name).read_bytes() for name in names]
    rng = random.Random(20240611)
    path = tmp_path / "mutant.dcm"
    outcomes: dict[str, int] = {}
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(132, min(len(data), rng.choice([400, 2000, len(data)])))
            action = rng.random()
            if action < 0.35:
                data[pos : pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xf0\xff\xff\xff", rng.randbytes(4)])
            elif action < 0.55:
                del data[pos:]
            elif action < 0.8:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
            else:
                del data[pos : pos + rng.randint(1, 16)]
            if len(data) <= 140:
                break
        path.write_bytes(bytes(data))
        outcome, seconds = inspect_or_reject(path)
        assert seconds < 2.0
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("accepted", 0) > 0 and outcomes.get("DICOM_UNREADABLE", 0) > 0


# --- Sniffing ------------------------------------------------------------------------------------


def test_sniff_kind(tmp_path: Path) -> None:
    assert sniff_kind(bundled("CT_small.dcm")) == "dicom"
    assert sniff_kind(bundled("no_meta.dcm")) == "unknown"
    assert sniff_kind(bundled("README.txt")) == "unknown"
    header = tmp_path / "blob"
    header.write_text("# comment\n\nrec01 2 500 5000 10:00:00 01/02/2020\nrec01.dat 16 200 16 0 0 0 0 I\n")
    assert sniff_kind(header) == "wfdb_header"
    (tmp_path / "empty").write_bytes(b"")
    assert sniff_kind(tmp_path / "empty") == "unknown"
    (tmp_path / "bin").write_bytes(bytes(range(256)) * 4)
    assert sniff_kind(tmp_path / "bin") == "unknown"


def test_values_accepted_before_never_hide_an_invalid_value(tmp_path: Path) -> None:
    """Values pydicom accepted once are not converted again (the same attributes recur in every slice):
    that must never let a bad value through, in any order: an invalid UID inside a sequence stored as
    UN, met after a file with the very same bytes, is still refused."""
    from teleread.gateway import validate

    for names in (("rtdose_rle.dcm", "rtdose_rle_1frame.dcm"), ("rtdose_rle_1frame.dcm", "rtdose_rle.dcm")):
        validate._PASSED.clear()
        outcomes = [inspect_or_reject(bundled(name))[0] for name in names for _ in range(2)]
        assert outcomes == ["DICOM_UNREADABLE"] * 4
    ok = write(make_dataset(), tmp_path / "ok.dcm")
    assert inspect_dicom(ok).sop_instance_uid and inspect_dicom(ok).sop_instance_uid  # accepted twice
    assert validate._PASSED  # and remembered
