"""The gateway's DICOM receiver with real peers on loopback: dcmtk's echoscu/storescu and a
pynetdicom SCU push CT, DX-like and ECG instances; they land in the outbox (durable before Success)
and reach the hub with the same pixel data; bad instances get a failure status, nothing stored."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from helpers import copy_testdata, wait_for
from teleread.gateway.forward import Forwarder
from teleread.gateway.outbox import Outbox
from teleread.gateway.scp import CANNOT_UNDERSTAND
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(120)

DCMTK = shutil.which("storescu") and shutil.which("echoscu")


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
