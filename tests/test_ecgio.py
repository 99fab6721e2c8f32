"""The ECG loading adapter (teleread.ecgio): WFDB pairs stored under hash names, DICOM waveforms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import wfdb
from pydicom.data import get_testdata_file

from helpers import datasets_dir, needs_datasets
from teleread import ecgio
from teleread.ecgio import EcgSignal, load_ecg_dicom, load_ecg_wfdb, normalise_lead_name
from teleread.errors import InvalidInput

SHARED = datasets_dir()
STANDARD_12 = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
needs_wfdb = needs_datasets("wfdb")


def bundled(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert found is not None
    return Path(str(found))


def stored_pair(tmp_path: Path, header: Path, signal: Path) -> tuple[Path, Path]:
    """Copy a record the way the hub keeps it: under hash-like names, in a read-only folder."""
    store = tmp_path / "objects"
    store.mkdir()
    stored_header, stored_signal = store / "3f2a9c", store / "b71e04"
    shutil.copy(header, stored_header)
    shutil.copy(signal, stored_signal)
    return stored_header, stored_signal


def write_record(folder: Path, *, units: list[str], name: str = "rec01") -> tuple[Path, Path]:
    digital = np.array([[1000, -500], [2000, 250], [0, 0], [-1000, 125]], dtype=np.int32)
    wfdb.wrsamp(
        name,
        fs=250,
        units=units,
        sig_name=["lead ii", "AVF"],
        d_signal=digital,
        fmt=["16", "16"],
        adc_gain=[1.0, 1.0],
        baseline=[0, 0],
        write_dir=str(folder),
    )
    return folder / f"{name}.hea", folder / f"{name}.dat"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("AVR", "aVR"),
        ("avl", "aVL"),
        ("Lead I", "I"),
        ("Lead I (Einthoven)", "I"),
        ("Lead aVF", "aVF"),
        ("lead_v1", "V1"),
        ("v6", "V6"),
        ("II", "II"),
        ("iii", "III"),
        ("MLII", "MLII"),
        ("ECG", "ECG"),
        ("vx", "vx"),
        ("  V5 ", "V5"),
    ],
)
def test_lead_names_are_normalised(raw: str, expected: str) -> None:
    assert normalise_lead_name(raw) == expected


@needs_wfdb
def test_ptbxl_record_under_hash_names_matches_the_eval_arrays(tmp_path: Path) -> None:
    folder = SHARED / "wfdb" / "ptbxl-records100"
    header, signal = stored_pair(tmp_path, folder / "00009_lr.hea", folder / "00009_lr.dat")
    ecg = load_ecg_wfdb(header, signal)
    evaluation = np.load(SHARED / "ptbxl-fold10-eval.npz")
    index = int(np.flatnonzero(evaluation["ecg_id"] == 9)[0])
    expected_mv = evaluation["X"][index].astype(np.float32) / 1000.0  # stored in microvolts
    assert ecg.lead_names == STANDARD_12
    assert ecg.fs == 100.0 and ecg.duration_s == 10.0 and not ecg.units_assumed
    assert ecg.signal_mv.dtype == np.float32 and ecg.signal_mv.shape == (1000, 12)
    np.testing.assert_allclose(ecg.signal_mv, expected_mv, atol=1e-6)
    assert sorted(p.name for p in header.parent.iterdir()) == ["3f2a9c", "b71e04"]


@needs_wfdb
def test_mitdb_format_212_record_loads(tmp_path: Path) -> None:
    folder = SHARED / "wfdb" / "mitdb-100-60s"
    ecg = load_ecg_wfdb(*stored_pair(tmp_path, folder / "100.hea", folder / "100.dat"))
    assert ecg.lead_names == ["MLII", "V5"] and ecg.fs == 360.0
    assert ecg.signal_mv.shape == (21600, 2)
    # MIT-BIH 100 starts at -0.145 mV (MLII) and -0.065 mV (V5).
    np.testing.assert_allclose(ecg.signal_mv[0], [-0.145, -0.065], atol=1e-6)


@needs_wfdb
def test_cinc_mat_signal_file_with_byte_offset_loads(tmp_path: Path) -> None:
    folder = SHARED / "wfdb" / "cinc2017"
    ecg = load_ecg_wfdb(*stored_pair(tmp_path, folder / "A06100.hea", folder / "A06100.mat"))
    evaluation = np.load(SHARED / "cinc2017-eval.npz")
    i = int(np.flatnonzero(evaluation["record"] == "A06100")[0])
    start, end = evaluation["offsets"][i], evaluation["offsets"][i + 1]
    expected_mv = evaluation["signal"][start:end].astype(np.float32) / 1000.0
    assert ecg.lead_names == ["ECG"] and ecg.fs == 300.0 and ecg.duration_s == 30.0
    np.testing.assert_allclose(ecg.signal_mv[:, 0], expected_mv, atol=1e-6)


@needs_wfdb
def test_two_signal_file_record_is_refused(tmp_path: Path) -> None:
    folder = SHARED / "wfdb" / "ptbdb-s0010_re"
    pair = stored_pair(tmp_path, folder / "s0010_re.hea", folder / "s0010_re.dat")
    with pytest.raises(InvalidInput) as caught:
        load_ecg_wfdb(*pair)
    assert caught.value.reason == "WFDB_UNSUPPORTED_FORMAT"


@pytest.mark.parametrize(
    "units, scale, assumed",
    [
        (["uV", "uV"], 1e-3, False),
        (["mV", "mV"], 1.0, False),
        (["V", "V"], 1000.0, False),
        (["mmHg", "mV"], 1.0, True),
        (["NU", "NU"], 1.0, True),
    ],
)
def test_units_are_converted_to_millivolts(tmp_path: Path, units: list[str], scale: float, assumed: bool) -> None:
    ecg = load_ecg_wfdb(*write_record(tmp_path, units=units))
    assert ecg.units_assumed is assumed
    assert ecg.lead_names == ["II", "aVF"]
    expected = np.array([[1000, -500], [2000, 250], [0, 0], [-1000, 125]], dtype=np.float32)
    np.testing.assert_allclose(ecg.signal_mv, expected * np.float32(scale), rtol=1e-6)


def test_signal_size_is_checked_before_reading(tmp_path: Path) -> None:
    header, signal = write_record(tmp_path, units=["mV", "mV"])
    signal.write_bytes(signal.read_bytes()[:-2])
    with pytest.raises(InvalidInput) as caught:
        load_ecg_wfdb(header, signal)
    assert caught.value.reason == "WFDB_SIGNAL_SIZE_MISMATCH"


@pytest.mark.parametrize(
    "signal_line",
    [
        "../x.dat 16 200 16 0 0 0 0 I",
        "/etc/x.dat 16 200 16 0 0 0 0 I",
        "rec.hea 16 200 16 0 0 0 0 I",
        ".hidden 16 200 16 0 0 0 0 I",
    ],
)
def test_signal_file_names_with_path_parts_are_refused(tmp_path: Path, signal_line: str) -> None:
    header = tmp_path / "h"
    header.write_text(f"rec 1 100 4\n{signal_line}\n")
    signal = tmp_path / "s"
    signal.write_bytes(bytes(8))
    with pytest.raises(InvalidInput) as caught:
        load_ecg_wfdb(header, signal)
    assert caught.value.reason == "WFDB_BAD_HEADER"
    assert not (tmp_path.parent / "x.dat").exists()


def test_read_wfdb_header_maps_wfdb_failures(tmp_path: Path) -> None:
    header = tmp_path / "h"
    header.write_text("rec 1 500 1000 10:00:00 2024-03-01\nrec.dat 16 200 16 0 0 0 0 I\n")
    with pytest.raises(InvalidInput) as caught:
        ecgio.read_wfdb_header(header)
    assert caught.value.reason == "WFDB_BAD_HEADER" and caught.value.__cause__ is None
    header.write_text("rec 1 500 1000 10:00:00 01/03/2024\nrec.dat 16 200 16 0 0 0 0 I\n")
    record = ecgio.read_wfdb_header(header)
    assert (record.record_name, record.n_sig, record.sig_len) == ("rec", 1, 1000)


def test_dicom_waveform_ecg_loads_twelve_leads_in_millivolts() -> None:
    path = bundled("waveform_ecg.dcm")
    ecg = load_ecg_dicom(path)
    raw = pydicom.dcmread(path).waveform_array(0)  # microvolts (ChannelSensitivityUnits uV)
    assert ecg.lead_names == STANDARD_12
    assert ecg.fs == 1000.0 and ecg.signal_mv.shape == (10000, 12) and ecg.duration_s == 10.0
    assert ecg.signal_mv.dtype == np.float32 and not ecg.units_assumed
    np.testing.assert_allclose(ecg.signal_mv, raw / 1000.0, rtol=1e-6, atol=1e-7)


def test_dicom_without_waveform_or_unreadable_gives_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_ecg_dicom(bundled("CT_small.dcm"))
    assert caught.value.reason == "ECG_NO_WAVEFORM"
    junk = tmp_path / "junk"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InvalidInput) as caught:
        load_ecg_dicom(junk)
    assert caught.value.reason == "ECG_UNREADABLE"


def test_dicom_waveform_with_truncated_data_is_unreadable(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("waveform_ecg.dcm"))
    group = ds.WaveformSequence[0]
    group.WaveformData = group.WaveformData[:1000]
    path = tmp_path / "cut.dcm"
    ds.save_as(path)
    with pytest.raises(InvalidInput) as caught:
        load_ecg_dicom(path)
    assert caught.value.reason == "ECG_UNREADABLE"


def test_ecg_signal_checks_its_shape() -> None:
    with pytest.raises(ValueError):
        EcgSignal(signal_mv=np.zeros((10, 2), dtype=np.float32), fs=100.0, lead_names=["I"])
    with pytest.raises(ValueError):
        EcgSignal(signal_mv=np.zeros((10, 1), dtype=np.float32), fs=0.0, lead_names=["I"])
