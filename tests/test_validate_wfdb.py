"""WFDB validation at ingest (RELIABILITY F18): header bounds, the header/signal pair, sniffing."""

from __future__ import annotations

import random
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import wfdb

from helpers import datasets_dir, needs_datasets
from teleread.errors import InvalidInput
from teleread.gateway.validate import (
    WfdbHeaderInfo,
    check_wfdb_pair,
    inspect_wfdb_header,
    sniff_kind,
)

DATASETS = datasets_dir() / "wfdb"
CANARY = "PHI_CANARY_ZHANGSAN"
needs_wfdb = needs_datasets("wfdb")


def write_record(
    folder: Path,
    *,
    name: str = "rec01",
    fmt: str = "16",
    n_sig: int = 3,
    n_samples: int = 500,
    units: str = "mV",
) -> tuple[Path, Path]:
    """A WFDB record written by wfdb.wrsamp (format 61, which wfdb cannot write, is converted)."""
    t = np.arange(n_samples) / 500.0
    digital = np.stack([100 * np.sin(2 * np.pi * (k + 1) * t) for k in range(n_sig)], axis=1)
    wfdb.wrsamp(
        name,
        fs=500,
        units=[units] * n_sig,
        sig_name=[f"V{k + 1}" for k in range(n_sig)],
        d_signal=digital.round().astype(np.int32),
        fmt=["16" if fmt == "61" else fmt] * n_sig,
        adc_gain=[200.0] * n_sig,
        baseline=[0] * n_sig,
        comments=[f"patient: {CANARY}"],
        write_dir=str(folder),
    )
    header, signal = folder / f"{name}.hea", folder / f"{name}.dat"
    if fmt == "61":  # same samples, big-endian
        signal.write_bytes(np.fromfile(signal, dtype="<i2").astype(">i2").tobytes())
        header.write_text(header.read_text().replace(f"{name}.dat 16 ", f"{name}.dat 61 "))
    return header, signal


def write_header(folder: Path, text: str, name: str = "stored-header") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def rejection(path: Path) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        inspect_wfdb_header(path)
    assert CANARY not in str(caught.value)
    return caught.value


SIGNAL_LINE = "rec.dat 16 200/mV 16 0 0 0 0 I\n"


@needs_wfdb
@pytest.mark.parametrize(
    "header, signal, n_sig, fs, sig_len",
    [
        ("mitdb-100-60s/100.hea", "mitdb-100-60s/100.dat", 2, 360, 21600),
        ("ptbxl-records100/00009_lr.hea", "ptbxl-records100/00009_lr.dat", 12, 100, 1000),
        ("ptbxl-records100/00336_lr.hea", "ptbxl-records100/00336_lr.dat", 12, 100, 1000),
        ("cinc2017/A06100.hea", "cinc2017/A06100.mat", 1, 300, 9000),
    ],
)
def test_shared_records_pass(header: str, signal: str, n_sig: int, fs: int, sig_len: int) -> None:
    info = inspect_wfdb_header(DATASETS / header)
    assert (info.n_sig, info.fs, info.sig_len) == (n_sig, fs, sig_len)
    assert info.signal_file_names == (Path(signal).name,)
    assert info.expected_signal_bytes == (DATASETS / signal).stat().st_size
    check_wfdb_pair(info, DATASETS / signal)
    assert sniff_kind(DATASETS / header) == "wfdb_header"
    assert sniff_kind(DATASETS / signal) == "unknown"


@needs_wfdb
def test_shared_ptbxl_lead_names_are_normalised() -> None:
    info = inspect_wfdb_header(DATASETS / "ptbxl-records100/00009_lr.hea")
    assert info.lead_names == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert info.fmt == ("16",) * 12 and info.gains == (1000.0,) * 12


@needs_wfdb
def test_record_with_two_signal_files_is_unsupported() -> None:
    err = rejection(DATASETS / "ptbdb-s0010_re/s0010_re.hea")
    assert err.reason == "WFDB_UNSUPPORTED_FORMAT"


@pytest.mark.parametrize("fmt", ["16", "212", "80", "61", "24", "32"])
@pytest.mark.parametrize("n_samples", [500, 333])
def test_generated_records_of_every_supported_format(tmp_path: Path, fmt: str, n_samples: int) -> None:
    header, signal = write_record(tmp_path, fmt=fmt, n_samples=n_samples)
    stored = tmp_path / "by-hash"
    shutil.copy(header, stored)  # the hub keeps headers under hash names
    info = inspect_wfdb_header(stored)
    assert isinstance(info, WfdbHeaderInfo)
    assert info.expected_signal_bytes == signal.stat().st_size
    assert info.fmt == (fmt,) * 3 and info.lead_names == ("V1", "V2", "V3")
    check_wfdb_pair(info, signal)


def test_short_and_long_signal_files_are_size_mismatches(tmp_path: Path) -> None:
    header, signal = write_record(tmp_path)
    info = inspect_wfdb_header(header)
    data = signal.read_bytes()
    for altered in (data[:-1], data + b"\x00\x00"):
        signal.write_bytes(altered)
        with pytest.raises(InvalidInput) as caught:
            check_wfdb_pair(info, signal)
        assert caught.value.reason == "WFDB_SIGNAL_SIZE_MISMATCH"
        assert caught.value.message == (f"signal file has {len(altered)} bytes, header implies {len(data)}")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("rec 3 500 1000\n" + SIGNAL_LINE * 2, "WFDB_BAD_HEADER"),  # fewer signal lines than n_sig
        ("rec 1 500 1000\n" + SIGNAL_LINE * 2, "WFDB_BAD_HEADER"),  # more signal lines
        ("rec 1 500 1000 10:00:00 2024-03-01\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("rec 1 500 1000 10:00:00 2024\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("rec 1 500 1000 2024\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("rec 1 500 1000\nrec.dat 16 1e12/mV 16 0 0 0 0 I\n", "WFDB_BAD_HEADER"),
        ("rec 1 500 1000\nrec.dat 16 -200/mV 16 0 0 0 0 I\n", "WFDB_BAD_HEADER"),
        ("rec 1 0 1000\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("rec 1 50000 1000\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("rec 1 500\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),  # no signal length
        ("rec 1 500 0\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("rec 0 500 1000\n", "WFDB_BAD_HEADER"),
        (f"rec {10**6} 500 1000\n" + SIGNAL_LINE * 3, "WFDB_TOO_LARGE"),
        ("rec 65 500 1000\n" + SIGNAL_LINE * 65, "WFDB_TOO_LARGE"),
        (f"rec 2 500 {2**30}\n" + SIGNAL_LINE * 2, "WFDB_TOO_LARGE"),
        ("rec 1 500 1000\nrec.dat 310 200/mV 12 0 0 0 0 I\n", "WFDB_UNSUPPORTED_FORMAT"),
        ("rec 2 500 1000\nrec.dat 16 200 16 0 0 0 0 I\nrec.xyz 16 200 16 0 0 0 0 II\n", "WFDB_UNSUPPORTED_FORMAT"),
        ("rec/2 0 500 2000\nseg1 1000\nseg2 1000\n", "WFDB_UNSUPPORTED_FORMAT"),
        ("rec 1 500 1000\n../evil.dat 16 200 16 0 0 0 0 I\n", "WFDB_BAD_HEADER"),
        ("rec 1 500 1000\nrec.hea 16 200 16 0 0 0 0 I\n", "WFDB_BAD_HEADER"),
        ("../rec 1 500 1000\n" + SIGNAL_LINE, "WFDB_BAD_HEADER"),
        ("# only a comment\n", "WFDB_BAD_HEADER"),
        ("", "WFDB_BAD_HEADER"),
        ("rec 1 500 1000\nrec.dat 16 200 16 0 0 0 0 I\nrec.dat 16 200 16 0 0 0 0 II\n", "WFDB_BAD_HEADER"),
    ],
)
def test_malformed_headers_give_typed_errors(tmp_path: Path, text: str, reason: str) -> None:
    path = write_header(tmp_path, f"# {CANARY}\n" + text)
    assert rejection(path).reason == reason


def test_huge_signal_count_is_bounded_in_memory(tmp_path: Path) -> None:
    path = write_header(tmp_path, f"rec {10**6} 500 1000\n" + SIGNAL_LINE)
    tracemalloc.start()
    try:
        err = rejection(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.reason == "WFDB_TOO_LARGE"
    assert peak < 64 * 1024**2


def test_oversized_and_binary_headers_are_rejected(tmp_path: Path) -> None:
    big = write_header(tmp_path, "rec 1 500 1000\n" + SIGNAL_LINE + "# pad\n" * 12000, "big")
    assert rejection(big).reason == "WFDB_TOO_LARGE"
    binary = tmp_path / "binary"
    binary.write_bytes(b"rec 1 500 1000\n\x00\x01\x02")
    assert rejection(binary).reason == "WFDB_BAD_HEADER"


def test_random_header_mutations_only_raise_typed_errors(tmp_path: Path) -> None:
    header, _ = write_record(tmp_path)
    seed_text = header.read_text()
    alphabet = "0123456789 ./-:()+x#\n\tabcXYZ\x7f"
    rng = random.Random(20240611)
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(400):
        chars = list(seed_text)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(chars) + 1)
            action = rng.random()
            if action < 0.4 and chars:
                chars[min(pos, len(chars) - 1)] = rng.choice(alphabet)
            elif action < 0.7:
                chars.insert(pos, rng.choice(alphabet) * rng.randint(1, 12))
            elif chars:
                del chars[min(pos, len(chars) - 1)]
        path = write_header(tmp_path, "".join(chars), f"mutant-{i}")
        try:
            inspect_wfdb_header(path)
            outcomes["accepted"] += 1
        except InvalidInput as err:
            assert CANARY not in str(err)
            outcomes["rejected"] += 1
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > 0
