"""Compressed DICOM pushed to the gateway's receiver by real peers (dcmtk's storescu and pynetdicom):
JPEG baseline and extended, JPEG lossless, JPEG-LS lossless and near-lossless, JPEG 2000 lossless
and lossy, RLE. Each is accepted, stored as received, forwarded, and decoded at the hub where
triage needs its pixels (the chest model runs on it). The same instance sent again losslessly in
another transfer syntax is a duplicate, not a conflict; sent again lossily, the first copy is kept
and the resend recorded; a different instance under the same UID is still a conflict."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from helpers import wait_for, write_chest_dx
from receivers import ENGINES, running_receiver
from teleread.client import RetryPolicy
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.uploader.scan import scan_paths
from teleread.gateway.clinic.scp import DUPLICATE_CONFLICT, SUCCESS, StoreScp
from teleread.gateway.uploader.client import upload_exams
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=ENGINES)
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreScp]:
    """The receiver on each engine (this module's tests run on both)."""
    with running_receiver(tmp_path / "outbox", request.param) as server:
        yield server


FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
# storescu's option proposing each syntax (JPEG lossless process 14, .57, has none: a profile of a
# storescu configuration file proposes it, see _storescu_config)
STORESCU_PROPOSES = {
    "1.2.840.10008.1.2.4.57": "config",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}

# transfer syntax -> how the test makes it from an uncompressed 8- or 12-bit DX
SYNTAXES = {
    "1.2.840.10008.1.2.4.50": ("dcmcjpeg", ["+eb", "+un"], 8),  # JPEG baseline (lossy)
    "1.2.840.10008.1.2.4.51": ("dcmcjpeg", ["+ee", "+un"], 12),  # JPEG extended (lossy)
    "1.2.840.10008.1.2.4.57": ("dcmcjpeg", ["+el"], 12),  # JPEG lossless
    "1.2.840.10008.1.2.4.70": ("dcmcjpeg", ["+e1"], 12),  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": ("dcmcjpls", ["+el"], 12),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ("dcmcjpls", ["+en", "+un"], 12),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ("pydicom", [], 12),  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ("pydicom", ["lossy"], 12),  # JPEG 2000
    "1.2.840.10008.1.2.5": ("dcmcrle", [], 12),  # RLE lossless
}
LOSSLESS = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5")  # fmt: skip


def _image(seed: int = 0) -> np.ndarray:
    """A smooth 28-px picture (compresses like a radiograph, not like noise)."""
    y, x = np.mgrid[0:28, 0:28]
    return (96 + 60 * np.sin(x / 4.0 + seed) * np.cos(y / 5.0) + 2 * y).clip(0, 255).astype(np.uint8)


def _dx(path: Path, *, bits: int, seed: int = 0) -> Path:
    write_chest_dx(path, _image(seed), size=256)
    if bits == 8:
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = (ds.pixel_array >> 4).astype(np.uint8).tobytes()
        ds.WindowCenter, ds.WindowWidth = 128, 256
        ds.save_as(path, enforce_file_format=True)
    return path


def _encode(source: Path, syntax: str, out: Path) -> Path:
    tool, args, _bits = SYNTAXES[syntax]
    if tool == "pydicom":
        ds = pydicom.dcmread(source)
        if args == ["lossy"]:
            ds.compress(JPEG2000, j2k_cr=[15], use_mct=False, generate_instance_uid=False)
        else:
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(out, enforce_file_format=True)
    else:
        assert shutil.which(tool), f"{tool} comes with dcmtk (scripts/test.sh and .ci/run install it)"
        done = subprocess.run([tool, *args, str(source), str(out)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-400:]
    assert str(pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return out


def _dataset_bytes(path: Path) -> bytes:
    """The file's bytes after its file meta group: what the modality sends, byte for byte."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def _send_pynetdicom(port: int, paths: list[Path]) -> list[int]:
    from pynetdicom import AE

    ae = AE()
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="TELEREAD_GW")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def _storescu_config(path: Path, syntax: str) -> Path:
    """A storescu configuration whose profile ``P`` proposes ``syntax`` for DX images."""
    path.write_text(
        "[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = " + syntax + "\n\n"
        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = 1.2.840.10008.5.1.4.1.1.1.1\\TS\n\n"
        "[[Profiles]]\n[P]\nPresentationContexts = PC\n",
        encoding="ascii",
    )
    return path


def _storescu(port: int, path: Path, propose: str) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu proposing the file's compressed syntax (and, after it, the uncompressed ones,
    as a modality does): it sends the file as it is only if the receiver accepts that syntax."""
    if propose == "config":
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        options = ["-xf", str(_storescu_config(path.with_suffix(".cfg"), syntax)), "P"]
    else:
        options = [propose]
    return subprocess.run(
        ["storescu", "-v", *options, "-aec", "TELEREAD_GW", "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per transfer syntax, two distinct compressed DX instances (one per sender)."""
    folder = tmp_path_factory.mktemp("compressed")
    out: dict[str, dict[str, Path]] = {}
    for n, syntax in enumerate(SYNTAXES):
        bits = SYNTAXES[syntax][2]
        out[syntax] = {
            who: _encode(_dx(folder / f"{n}-{who}-src.dcm", bits=bits, seed=n), syntax, folder / f"{n}-{who}.dcm")
            for who in ("dcmtk", "pynetdicom")
        }
    return out


def test_every_compressed_syntax_is_accepted_stored_as_received_and_read_at_the_hub(
    scp: Any, embedded_stack: Any, compressed: dict[str, dict[str, Path]]
) -> None:
    for syntax, propose in STORESCU_PROPOSES.items():
        sent = _storescu(scp.port, compressed[syntax]["dcmtk"], propose)
        assert sent.returncode == 0, sent.stdout[-1500:] + sent.stderr[-1500:]
        name = pydicom.uid.UID(syntax).name.replace("Lossless", "").split()[0]
        assert "Received Store Response (Success)" in sent.stdout + sent.stderr
        assert "Converting transfer syntax: Little Endian" not in sent.stdout + sent.stderr, name
    by_pynetdicom = [files["pynetdicom"] for files in compressed.values()]
    assert _send_pynetdicom(scp.port, by_pynetdicom) == [SUCCESS] * len(by_pynetdicom)
    box: Outbox = scp.outbox
    stored = {}
    for exam in box.exams(state="collecting"):
        (obj,) = box.objects_of(exam.id)
        stored[obj.instance_key] = obj.path
    for syntax, files in compressed.items():
        for original in files.values():
            sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
            kept = stored[sop]
            assert str(pydicom.dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
            assert _dataset_bytes(kept) == _dataset_bytes(original)  # stored as received
    for exam in box.exams(state="collecting"):
        box.complete(exam.group_key)
    results = Forwarder(box, ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a")), retry=FAST).drain()
    assert sorted(r.outcome for r in results) == ["committed"] * 2 * len(compressed)
    site = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    reader = worklist_pb2_grpc.WorklistStub(embedded_stack.channel("radio"))
    for r in results:
        wait_for(
            lambda r=r: site.GetExam(ingest_pb2.GetExamRequest(exam_id=r.detail), timeout=10).state == "queued",
            timeout=120,
        )
        details = reader.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=r.detail), timeout=10)
        codes = [f.code for f in details.exam.triage.findings]
        # the chest model ran on the decoded pixels: no "could not be decoded", no "model not used"
        assert any(c in ("image.model.chest", "image.model.pneumonia") for c in codes), codes
        assert "model.unavailable" not in codes


def _same_instance(source: Path, syntax: str, out: Path) -> Path:
    """``source`` encoded in ``syntax`` under its own SOP Instance UID (the same instance sent again)."""
    _encode(source, syntax, out)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (source, out)}
    assert len(uids) == 1
    return out


def test_the_same_instance_resent_in_another_syntax_is_a_duplicate_at_the_receiver(scp: Any, tmp_path: Path) -> None:
    first = _dx(tmp_path / "first.dcm", bits=12)
    j2k = _same_instance(first, "1.2.840.10008.1.2.4.90", tmp_path / "j2k.dcm")
    rle = _same_instance(first, "1.2.840.10008.1.2.5", tmp_path / "rle.dcm")
    near = _same_instance(first, "1.2.840.10008.1.2.4.81", tmp_path / "near.dcm")
    other = pydicom.dcmread(first)
    other.PixelData = bytes(len(other.PixelData))  # another image under the same UID
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    statuses = _send_pynetdicom(scp.port, [first, j2k, rle, near, tmp_path / "other.dcm"])
    assert statuses == [SUCCESS, SUCCESS, SUCCESS, SUCCESS, DUPLICATE_CONFLICT]
    box: Outbox = scp.outbox
    (exam,) = box.exams(state="collecting")
    (obj,) = box.objects_of(exam.id)
    assert _dataset_bytes(obj.path) == _dataset_bytes(first)  # the first copy, untouched
    assert len(list(box.objects_dir.iterdir())) == 1
    with box._lock:  # the lossy resend is on record; the conflict is a receiver refusal
        rows = box._db.execute("SELECT source, reason FROM refusals ORDER BY id").fetchall()
    assert rows == [("kept_first", "LOSSY_RESEND"), ("receiver", "INSTANCE_CONFLICT")]


def test_the_same_instance_resent_in_another_syntax_is_a_duplicate_at_the_hub(hub_stack: Any, tmp_path: Path) -> None:
    first = _dx(tmp_path / "src" / "first.dcm", bits=12)
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))

    def upload(path: Path, folder: str) -> Any:
        target = tmp_path / folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        exam = scan_paths([target]).exams[0]
        exam.client_exam_key = f"{folder}-{generate_uid()[-20:]}"  # separate exams, as separate sends
        (outcome,) = upload_exams(ingest, [exam], retry=FAST)
        return outcome

    assert upload(first, "a").objects_stored == 1
    lossless = upload(_same_instance(first, "1.2.840.10008.1.2.4.70", tmp_path / "sv1.dcm"), "b")
    assert lossless.ok and lossless.objects_duplicate == 1 and not lossless.refused
    lossy = upload(_same_instance(first, "1.2.840.10008.1.2.4.91", tmp_path / "lossy.dcm"), "c")
    assert lossy.ok and lossy.objects_duplicate == 1 and not lossy.refused
    other = pydicom.dcmread(first)
    other.PixelData = bytes(len(other.PixelData))
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    conflict = upload(tmp_path / "other.dcm", "d")
    assert [r.reason for r in conflict.refused] == ["INSTANCE_UID_CONFLICT"]
    from sqlalchemy import select

    from teleread.db.schema import events, objects

    with hub_stack.hub.engine.connect() as conn:
        kinds = [r[0] for r in conn.execute(select(events.c.detail).where(events.c.type == "instance_resent"))]
        assert len(conn.execute(select(objects.c.id)).all()) == 1  # one copy: the first
    assert [json.loads(k)["kind"] for k in kinds] == ["lossless_resend", "lossy_resend"]


def test_an_uncompressed_image_still_round_trips_byte_identical(scp: Any, tmp_path: Path) -> None:
    path = _dx(tmp_path / "plain.dcm", bits=12)
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian
    assert _send_pynetdicom(scp.port, [path]) == [SUCCESS]
    (exam,) = scp.outbox.exams(state="collecting")
    (obj,) = scp.outbox.objects_of(exam.id)
    assert _dataset_bytes(obj.path) == _dataset_bytes(path)
    assert obj.path.read_bytes()[128:132] == b"DICM"
