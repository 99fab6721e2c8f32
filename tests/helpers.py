"""Helpers shared by the tests: the datasets folder, input files, waiting, rich error decoding."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def datasets_dir() -> Path:
    """The shared datasets folder (evaluation files, WFDB records): the one place every test gets it
    from. ``../shared/datasets`` beside the checkout, found as ``teleread models`` finds it."""
    from teleread.models.training.evaluate import default_datasets

    return default_datasets()


def needs_datasets(*names: str) -> pytest.MarkDecorator:
    """Skip a test whose files (relative to :func:`datasets_dir`) are not on this machine, naming them."""
    missing = [name for name in names if not (datasets_dir() / name).exists()]
    return pytest.mark.skipif(
        bool(missing), reason=f"not in the datasets folder {datasets_dir()}: {', '.join(missing)}"
    )


def copy_testdata(folder: Path, *names: str) -> list[Path]:
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        dest = folder / name
        shutil.copy(str(get_testdata_file(name)), dest)
        out.append(dest)
    return out


def write_synthetic_wfdb(folder: Path, *, rhythm: str, name: str = "ecg-0001", seed: int = 1) -> tuple[Path, Path]:
    from teleread.models.inference.synthetic import synthetic_ecg, write_wfdb_record

    signal, leads = synthetic_ecg(rhythm=rhythm, fs=500, seconds=10.0, seed=seed)
    return write_wfdb_record(folder, name, signal, 500, leads)


def write_chest_dx(
    path: Path,
    image28: Any,
    *,
    size: int = 512,
    body_part: str = "CHEST",
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
) -> Path:
    """A synthetic DX/CR DICOM file from a 28-px PneumoniaMNIST image (upsampled, 12-bit, windowed)."""
    import numpy as np
    from PIL import Image
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    big = np.asarray(Image.fromarray(np.asarray(image28, np.uint8)).resize((size, size), Image.BICUBIC), np.uint16) * 16
    if photometric == "MONOCHROME1":
        big = 4095 - big
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.StudyDescription = modality, body_part, "CHEST PA"
    ds.PatientID, ds.PatientName = "SYNTH-0001", "Synthetic^Chest"
    ds.StudyDate, ds.StudyTime = "20261123", "101500"
    ds.Rows, ds.Columns = size, size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = big.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def wait_for_state(
    ingest: Any, exam_id: str, state: str = "queued", *, timeout: float = 60.0, interval: float = 0.05
) -> Any:
    """Poll the site's ``GetExam`` until the exam is in ``state`` and return it. An exam is not in
    the reading queue at commit: triage queues it a moment later, so a test that reads or claims an
    exam right after its commit waits here first. Fails at once if the exam was rejected or expired
    instead, and names the last state seen when the deadline passes."""
    from teleread.v1 import ingest_pb2
    from teleread.vocab import ExamState

    wanted = ExamState(state)  # a real state, or ValueError
    deadline = time.monotonic() + timeout
    while True:
        exam = ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10)
        if exam.state == wanted:
            return exam
        assert exam.state not in (ExamState.REJECTED, ExamState.EXPIRED), f"exam {exam_id} {exam.state}, not {state}"
        if time.monotonic() > deadline:
            raise AssertionError(f"exam {exam_id} still {exam.state} after {timeout} s, not {state}")
        time.sleep(interval)


def error_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def run_coroutine(coro: Any) -> Any:
    """``asyncio.run`` on a thread of its own. A pytest-xdist worker that ran a browser test keeps
    Playwright's event loop running on its main thread for the rest of the session (the one
    browser is session-scoped), where ``asyncio.run`` refuses to start another."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def signed_critical_ecg(stack: Any, folder: Path, *, text: str = "Sinus arrest, 3.5 s pause.") -> str:
    """A synthetic ECG with a >= 3 s pause uploaded by site A (critical on triage), claimed by the
    cardiologist and signed with a critical report; its exam id."""
    from teleread.gateway.uploader.client import scan_paths, upload_exams
    from teleread.v1 import ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

    write_synthetic_wfdb(folder, rhythm="pause")
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    (outcome,) = upload_exams(ingest, scan_paths([folder]).exams)
    wait_for_state(ingest, outcome.exam_id, "queued")
    cardio = worklist_pb2_grpc.WorklistStub(stack.channel("cardio"))
    claim = cardio.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=120), timeout=10)
    assert claim.exam.exam_id == outcome.exam_id
    draft = worklist_pb2.SaveReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence, text=text, critical=True)
    cardio.SaveReport(draft, timeout=10)
    cardio.SignReport(worklist_pb2.SignReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10)
    return str(outcome.exam_id)
