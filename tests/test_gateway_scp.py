"""The gateway's DICOM receiver with real peers on loopback: dcmtk's echoscu/storescu and a
pynetdicom SCU push CT, DX-like and ECG instances; they land in the outbox (durable before Success)
and reach the hub with the same pixel data; bad instances get a failure status, nothing stored.
Every test runs on both receiver engines (the event-driven reactor and pynetdicom's stock acceptor)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from helpers import copy_testdata, wait_for
from receivers import ENGINES, running_receiver
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.clinic.scp import CANNOT_UNDERSTAND, StoreScp
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(120)

DCMTK = shutil.which("storescu") and shutil.which("echoscu")


@pytest.fixture(params=ENGINES)
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreScp]:
    """The receiver on each engine (this module's tests run on both)."""
    with running_receiver(tmp_path / "outbox", request.param) as server:
        yield server


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    assert DCMTK, "dcmtk (storescu, echoscu) is installed by scripts/test.sh and .ci/run"
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"}
    )


def test_dcmtk_echo_and_store_land_in_the_outbox_and_reach_the_hub(scp, embedded_stack, tmp_path: Path) -> None:
    files = copy_testdata(tmp_path / "in", "CT_small.dcm", "MR_small.dcm", "waveform_ecg.dcm")
    port = str(scp.port)
    assert _dcmtk("echoscu", "-aec", "TELEREAD_GW", "127.0.0.1", port).returncode == 0
    sent = _dcmtk("storescu", "-aec", "TELEREAD_GW", "127.0.0.1", port, *map(str, files))
    assert sent.returncode == 0, sent.stderr[-500:]
    box: Outbox = scp.outbox
    assert box.status().by_state["collecting"] == 3  # three studies, each durable before Success
    for f in files:
        box.complete(str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID))
    results = Forwarder(box, ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))).drain()
    assert sorted(r.outcome for r in results) == ["committed"] * 3
    # the pixel data / waveform that reached the hub is the one the modality sent
    reader = {"CT": "radio", "MR": "radio", "ECG": "cardio"}
    originals = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    site = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    for r in results:
        wait_for(
            lambda r=r: site.GetExam(ingest_pb2.GetExamRequest(exam_id=r.detail), timeout=10).state == "queued",
            timeout=60,
        )
        ecg = box.exam(r.exam_id).kind == "ecg"
        stub = worklist_pb2_grpc.WorklistStub(embedded_stack.channel(reader["ECG" if ecg else "CT"]))
        details = stub.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=r.detail), timeout=10)
        (obj,) = details.objects
        data = b"".join(
            c.data
            for c in stub.StreamObject(
                worklist_pb2.StreamObjectRequest(exam_id=r.detail, object_id=obj.object_id), timeout=10
            )
        )
        got = pydicom.dcmread(__import__("io").BytesIO(data))
        want = originals[str(got.SOPInstanceUID)]
        key = "WaveformSequence" if ecg else "PixelData"
        assert got[key].value == want[key].value


def test_pynetdicom_scu_gets_a_failure_for_a_bad_uid_and_nothing_is_stored(scp) -> None:
    from pynetdicom import AE

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = "1.2.3.../x"
    ae = AE()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TELEREAD_GW")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == CANNOT_UNDERSTAND
    assert sum(scp.outbox.status().by_state.values()) == 0
    assert not any(scp.outbox.objects_dir.iterdir())


def _bad_instances(folder: Path) -> dict[str, Path]:
    """Three instances of one CT study that the hub refuses, beside one valid instance of it."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    study = generate_uid()

    def variant(name: str, **attrs: str) -> Path:
        ds = base.copy()
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    files = {"valid": variant("valid"), "bad_series": variant("bad_series", SeriesInstanceUID="1.2.03.4")}
    files["truncated"] = variant("truncated")
    whole = files["truncated"].read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) - 5000])  # cut inside the pixel data
    # pixel data whose declared length runs past the end of the file (a corrupt length)
    long_px = bytearray(variant("pixels_past_end").read_bytes())
    at = long_px.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) OW: tag, VR, 2 reserved, 4-byte length
    length = int.from_bytes(long_px[at + 8 : at + 12], "little")
    long_px[at + 8 : at + 12] = (length + 4096).to_bytes(4, "little")
    (folder / "pixels_past_end.dcm").write_bytes(bytes(long_px))
    files["pixels_past_end"] = folder / "pixels_past_end.dcm"
    return files


def test_the_receiver_refuses_what_the_hub_would_refuse_naming_the_problem(scp, tmp_path: Path) -> None:
    """An invalid SeriesInstanceUID, a truncated file and pixel data running past the end of the file
    get a failure status whose Error Comment names the problem, not Success; the study's valid
    instance on the same association is stored."""
    from pynetdicom import AE, _config

    files = _bad_instances(tmp_path / "in")
    ae = AE()
    ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    sending = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are, as a modality's queue sends them
    try:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="TELEREAD_GW")
        assert assoc.is_established
        try:
            answers = {name: assoc.send_c_store(path) for name, path in files.items()}
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = sending
    assert answers["valid"].Status == 0x0000
    comments = {name: (int(a.Status), str(a.get("ErrorComment", ""))) for name, a in answers.items() if name != "valid"}
    assert comments["bad_series"][0] == CANNOT_UNDERSTAND and comments["bad_series"][1].startswith("BAD_UID")
    assert comments["truncated"][0] == CANNOT_UNDERSTAND and comments["truncated"][1].startswith("TRUNCATED")
    assert comments["pixels_past_end"][0] == CANNOT_UNDERSTAND
    assert comments["pixels_past_end"][1].startswith("TRUNCATED")
    box: Outbox = scp.outbox
    (exam,) = box.exams(state="collecting")
    (stored,) = box.objects_of(exam.id)
    got, want = pydicom.dcmread(stored.path), pydicom.dcmread(files["valid"])
    assert got.SOPInstanceUID == want.SOPInstanceUID and got.PixelData == want.PixelData
    assert len(list(box.objects_dir.iterdir())) == 1 and not any(box.incoming_dir.iterdir())
    status = box.status()
    assert status.refused_recent == 3 and status.last_refusal == "TRUNCATED"


def test_dcmtk_storescu_is_told_the_reason_of_a_refused_instance(scp, tmp_path: Path) -> None:
    files = _bad_instances(tmp_path / "in")
    sent = _dcmtk("storescu", "-d", "-aec", "TELEREAD_GW", "127.0.0.1", str(scp.port), str(files["bad_series"]))
    out = sent.stdout + sent.stderr
    assert "DIMSE Status                  : 0xc000" in out, out[-1500:]
    (comment,) = [line for line in out.splitlines() if line.endswith("ErrorComment")]
    assert "BAD_UID: SeriesInstanceUID is not a valid DICOM UID" in comment
    assert sum(scp.outbox.status().by_state.values()) == 0
