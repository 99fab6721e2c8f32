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
from typing import Any

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
    if not ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian).is_compressed:
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
    ds.ImagePositionPatient = [-160.0, -180.0, 0.0]
    _write_slices(ds, folder, generate_uid(), slices,
                  lambda _: rng.integers(-1024, 3072, size=(CT_SIDE, CT_SIDE), dtype=np.int16))  # fmt: skip
    return folder


def _write_slices(ds: Dataset, folder: Path, study: str, slices: int, pixels: Any) -> list[Path]:
    """``slices`` files of one new series from ``ds``, slice ``n`` (from 1) holding ``pixels(n)``,
    stacked down the z axis from ``ds``'s position; the files in slice order."""
    series = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    x, y = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])
    paths = []
    for number in range(1, slices + 1):
        _set_uids(ds, study=study, series=series)
        z = -number * SLICE_MM
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [x, y, z]
        ds.SliceLocation = z
        ds.PixelData = pixels(number).tobytes()
        paths.append(folder / f"ct-{number:05d}.dcm")
        _save(ds, paths[-1])
    return paths


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


# ---- phantoms: images a person can look at (the viewer's tests and benchmark) -------------------
def phantom_slice(number: int, side: int) -> np.ndarray:
    """One int16 CT slice in HU: air, a body of soft tissue with a smooth gradient, two lungs, a
    spine, and a marker disc whose position around the body tells the slice's number."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    hu = np.full((side, side), -1000.0, np.float32)
    body = (x / 0.45) ** 2 + (y / 0.34) ** 2 <= 1
    hu[body] = 20.0 + 60.0 * (x[body] + 0.5)  # soft tissue, 20..80 HU across the body
    for cx in (-0.2, 0.2):
        lung = ((x - cx) / 0.14) ** 2 + ((y + 0.02) / 0.2) ** 2 <= 1
        hu[lung] = -870.0 + 120.0 * (y[lung] + 0.5)  # lungs, denser towards the back
    hu[(x**2 + (y - 0.22) ** 2) <= 0.05**2] = 700.0  # the spine
    angle = 2 * np.pi * (number % 36) / 36
    hu[((x - 0.33 * np.cos(angle)) ** 2 + (y - 0.25 * np.sin(angle)) ** 2) <= 0.03**2] = 300.0
    return np.round(hu).astype(np.int16)


def write_phantom_ct(
    folder: Path,
    *,
    slices: int,
    side: int = CT_SIDE,
    patient: str = "PHANTOM-CT",
    study: str | None = None,
    date: str = "20261203",
    description: str = "CT CHEST",
) -> list[Path]:
    """One CT study of ``slices`` phantom slices (one series, explicit VR little endian, HU stored
    as signed 16-bit with an identity rescale); returns the files in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _ct_template()
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.SeriesDate = patient, "Phantom^CT", date, date
    ds.StudyDescription, ds.SeriesDescription, ds.SeriesNumber = description, "Axial 5mm", 2
    ds.Rows = ds.Columns = side
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelSpacing = [round(350.0 / side, 4)] * 2
    ds.ImagePositionPatient = [-175.0, -175.0, 0.0]
    return _write_slices(ds, folder, study or generate_uid(), slices, lambda n: phantom_slice(n, side))


def phantom_chest(rows: int, columns: int, *, noise: int = 0, seed: int = 7) -> np.ndarray:
    """A uint16 (12-bit) frontal chest radiograph phantom: bright mediastinum and bone, dark lungs;
    ``noise`` adds that much uniform noise (a realistic compressed size)."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    y, x = y / rows - 0.5, x / columns - 0.5
    img = np.full((rows, columns), 3000.0, np.float32)
    for cx in (-0.2, 0.2):
        lung = ((x - cx) / 0.16) ** 2 + ((y + 0.02) / 0.33) ** 2 <= 1
        img[lung] = 900.0 + 600.0 * (y[lung] + 0.5)
    img[(np.abs(x) < 0.06) & (y > -0.35)] = 3600.0
    for rib in np.linspace(-0.3, 0.25, 7):
        img[np.abs(y - rib - 0.05 * np.abs(x)) < 0.008] += 500.0
    if noise:
        img += np.random.default_rng(seed).integers(0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


def write_phantom_dx(path: Path, *, rows: int, columns: int, syntax: str | None = None, noise: int = 0,
                     patient: str = "PHANTOM-DX", monochrome1: bool = False) -> Path:  # fmt: skip
    """One DX study with one phantom chest image, stored in ``syntax`` (a compressed transfer
    syntax pydicom can encode: JPEG 2000 or JPEG-LS lossless, RLE) or uncompressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _ct_template()
    ds.PatientID, ds.PatientName = patient, "Phantom^DX"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    ds.Modality, ds.ImageType, ds.BodyPartExamined = "DX", ["ORIGINAL", "PRIMARY"], "CHEST"
    ds.StudyDescription, ds.SeriesDescription, ds.SeriesNumber = "CHEST PA", "PA", 1
    dropped = ("RescaleIntercept", "RescaleSlope", "PixelPaddingValue", "SliceLocation", "ImagePositionPatient",
               "ImageOrientationPatient", "SliceThickness", "SpacingBetweenSlices", "FrameOfReferenceUID")  # fmt: skip
    for keyword in dropped:
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    pixels = phantom_chest(rows, columns, noise=noise)
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
        pixels = (4095 - pixels).astype(np.uint16)
    _set_uids(ds, study=generate_uid(), series=generate_uid())
    ds.InstanceNumber = 1
    ds.PixelData = pixels.tobytes()
    if syntax:
        ds.compress(syntax, pixels, encoding_plugin="pylibjpeg" if syntax.startswith("1.2.840.10008.1.2.4.9") else "")
    _save(ds, path)
    return path
