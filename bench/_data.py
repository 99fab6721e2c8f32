"""Synthetic input data of the spine benchmark, generated into a temporary folder (never committed).

Owns the datasets the benchmark uploads: CT studies (512x512 int16 slices built from pydicom's
``CT_small.dcm``), DX images (one study each, uint16, ~15 MB), DICOM ECGs (pydicom's
``waveform_ecg.dcm``, each its own study) and the "1 GB study" (thin-slice CT, one study UID). Every
file gets fresh Study/Series/SOP Instance UIDs, synthetic patient identifiers and random pixel data,
and is written as explicit VR little endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CT_SIDE = 512
SLICE_MM = 0.625


@dataclass(frozen=True)
class Sizes:
    """How much data one benchmark run generates."""

    ct_slices: int = 200  # per CT study (each client gets its own study)
    ct_studies: int = 4  # one per concurrent client; the 1-client run uses the first
    dx_images: int = 20
    dx_rows: int = 2800
    dx_columns: int = 2700
    ecgs: int = 500
    big_slices: int = 2048  # the "1 GB study": 2048 x 512 KiB slices = 1 GiB of pixel data


QUICK_SIZES = Sizes(ct_slices=16, dx_images=4, dx_rows=1400, dx_columns=1350, ecgs=24, big_slices=128)


@dataclass(frozen=True)
class Datasets:
    """Folders of generated files: each CT study, each DX image, each ECG, the big study."""

    ct_studies: list[Path]
    dx_images: list[Path]
    ecgs: list[Path]
    big_study: Path


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise RuntimeError(f"pydicom test file {name} is missing")
    return path


def _anonymous(ds: Dataset, *, patient: str) -> None:
    """Synthetic identifiers only; private tags and other IDs of the template dropped."""
    ds.remove_private_tags()
    for keyword in ("OtherPatientIDsSequence", "DataSetTrailingPadding", "InstitutionName"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = patient
    ds.PatientBirthDate = ""


def _set_uids(ds: Dataset, *, study: str, series: str) -> str:
    sop = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    return sop


def _save(ds: Dataset, path: Path) -> None:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _ct_template() -> Dataset:
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    _anonymous(ds, patient="BENCH-CT")
    ds.Rows = ds.Columns = CT_SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SliceThickness = ds.SpacingBetweenSlices = SLICE_MM
    return ds


def write_ct_study(folder: Path, *, slices: int, rng: np.random.Generator) -> Path:
    """One CT study of ``slices`` 512x512 int16 slices (one series) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _ct_template()
    study, series = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    for number in range(1, slices + 1):
        _set_uids(ds, study=study, series=series)
        z = -number * SLICE_MM
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-160.0, -180.0, z]
        ds.SliceLocation = z
        pixels = rng.integers(-1024, 3072, size=(CT_SIDE, CT_SIDE), dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        _save(ds, folder / f"ct-{number:05d}.dcm")
    return folder


def write_dx_image(folder: Path, *, rows: int, columns: int, rng: np.random.Generator) -> Path:
    """One DX study holding one uint16 image of ``rows`` x ``columns``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _ct_template()
    ds.PatientID = "BENCH-DX"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    ds.Modality = "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword in ("RescaleIntercept", "RescaleSlope", "PixelPaddingValue", "SliceLocation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    _set_uids(ds, study=generate_uid(), series=generate_uid())
    ds.InstanceNumber = 1
    ds.PixelData = rng.integers(0, 1 << 14, size=(rows, columns), dtype=np.uint16).tobytes()
    path = folder / "dx.dcm"
    _save(ds, path)
    return path


def write_ecgs(folder: Path, *, count: int) -> list[Path]:
    """``count`` copies of waveform_ecg.dcm, each with its own Study/Series/SOP UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(_testdata("waveform_ecg.dcm"))
    _anonymous(ds, patient="BENCH-ECG")
    paths = []
    for number in range(count):
        _set_uids(ds, study=generate_uid(), series=generate_uid())
        path = folder / f"ecg-{number:05d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def generate(root: Path, sizes: Sizes, *, seed: int = 20261) -> Datasets:
    """Write every dataset of a run under ``root``."""
    rng = np.random.default_rng(seed)
    cts = [write_ct_study(root / "ct" / f"study-{i}", slices=sizes.ct_slices, rng=rng) for i in range(sizes.ct_studies)]
    dxs = [
        write_dx_image(root / "dx" / f"image-{i:03d}", rows=sizes.dx_rows, columns=sizes.dx_columns, rng=rng)
        for i in range(sizes.dx_images)
    ]
    ecgs = write_ecgs(root / "ecg", count=sizes.ecgs)
    big = write_ct_study(root / "big", slices=sizes.big_slices, rng=rng)
    return Datasets(ct_studies=cts, dx_images=dxs, ecgs=ecgs, big_study=big)


def folder_bytes(paths: list[Path]) -> int:
    """Total size of the files in (or under) ``paths``."""
    total = 0
    for path in paths:
        files = path.rglob("*") if path.is_dir() else [path]
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total
