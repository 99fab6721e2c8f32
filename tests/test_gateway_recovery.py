"""The gateway starts again whatever its outbox holds: a refused instance leaves no file behind, a
file that start-up recovery cannot place is set aside with its reason and counted in ``status``
(NEEDS ATTENTION), and a full disk never stops the gateway from starting."""

from __future__ import annotations

import copy
import hashlib
import io
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from teleread.app.cli import main
from teleread.gateway.clinic.outbox import SET_ASIDE_DIR, Outbox
from teleread.gateway.clinic.scp import DUPLICATE_CONFLICT, SUCCESS, identify
from teleread.gateway.clinic.service import Gateway
from teleread.settings import GatewaySettings, Settings

pytestmark = pytest.mark.timeout(120)


def _send(port: int, ds: pydicom.Dataset) -> int:
    from pynetdicom import AE

    ae = AE()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="TELEREAD_GW")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(dicom_host="127.0.0.1", dicom_port=0, hub="127.0.0.1:9", quiet_seconds=3600),
    )


def _start_offline(settings: Settings) -> Gateway:
    """A gateway whose hub never answers (nothing leaves the outbox)."""
    return Gateway(settings, ingest=object(), results=None)


def test_a_conflicting_instance_leaves_no_file_and_the_gateway_starts_again(tmp_path: Path, capsys: Any) -> None:
    settings = _settings(tmp_path)
    gw = _start_offline(settings)
    gw.scp.start()
    try:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert _send(gw.scp.port, ds) == SUCCESS
        other = copy.deepcopy(ds)
        other.PixelData = bytes(len(ds.PixelData))  # same SOP Instance UID, other bytes
        assert _send(gw.scp.port, other) == DUPLICATE_CONFLICT
        stored = sorted(p.name for p in gw.outbox.objects_dir.iterdir())
        assert len(stored) == 1  # only the instance that was acknowledged
    finally:
        gw.scp.stop()
        gw.outbox.close()
    again = _start_offline(settings)  # start-up recovery finds nothing to stop on
    try:
        assert sorted(p.name for p in again.outbox.objects_dir.iterdir()) == stored
        assert again.outbox.status().set_aside == 0
    finally:
        again.outbox.close()
    assert main(["gateway", "status", "--outbox", str(tmp_path / "gateway"), "--watch-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "refused by the receiver: 1" in out and "INSTANCE_CONFLICT" in out


def test_recovery_sets_aside_a_file_it_cannot_place_counts_it_and_goes_on(tmp_path: Path, capsys: Any) -> None:
    box = Outbox(tmp_path / "gateway")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    first = io.BytesIO()
    ds.save_as(first, enforce_file_format=True)
    box.receive(io.BytesIO(first.getvalue()), group_key=ds.StudyInstanceUID, instance_key=ds.SOPInstanceUID)
    # what an earlier gateway left: an unreferenced file of the same instance with other bytes,
    # and one whose row a power cut took back (it must still be rebuilt)
    conflicting, orphan = copy.deepcopy(ds), copy.deepcopy(ds)
    conflicting.PixelData = bytes(len(ds.PixelData))
    orphan.SOPInstanceUID = orphan.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for item in (conflicting, orphan):
        buf = io.BytesIO()
        item.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        (box.objects_dir / hashlib.sha256(data).hexdigest()).write_bytes(data)
    box.close()

    gw = _start_offline(_settings(tmp_path))  # used to stop: "same instance UID with different content"
    try:
        status = gw.outbox.status()
        assert status.set_aside == 1
        (exam,) = gw.outbox.exams(state="collecting")
        assert sum(status.by_state.values()) == 1 and len(gw.outbox.objects_of(exam.id)) == 2
    finally:
        gw.outbox.close()
    aside = tmp_path / "gateway" / SET_ASIDE_DIR
    (reason,) = aside.glob("*.reason.txt")
    assert reason.read_text(encoding="utf-8").startswith("INSTANCE_CONFLICT")
    assert main(["gateway", "status", "--outbox", str(tmp_path / "gateway"), "--watch-dir", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    assert "set aside: 1" in out and "NEEDS ATTENTION: 1 file(s) set aside" in out


def test_an_unreadable_orphan_is_set_aside_not_left_in_objects(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw")
    junk = b"\x00" * 128 + b"DICM" + b"\xff" * 64
    (box.objects_dir / hashlib.sha256(junk).hexdigest()).write_bytes(junk)
    assert box.adopt_orphans(identify) == 0
    assert not any(box.objects_dir.iterdir())
    assert box.status().set_aside == 1
    box.close()


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 2 MB tmpfs: a real ENOSPC when it fills."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"mounting a tmpfs needs root (CI runs as root): {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_outbox_opens_and_the_gateway_starts_on_a_full_disk(tmp_path: Path, tiny_disk: Path) -> None:
    root = tiny_disk / "gateway"
    box = Outbox(root)
    obj = box.receive(io.BytesIO(b"x" * 1000), group_key="1.2", instance_key="1.2.1")
    box.complete("1.2")
    assert box.claim_next() is not None  # left uploading by a crash
    box.close()
    ballast = tiny_disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    settings = Settings(
        data_dir=tmp_path / "data",
        gateway=GatewaySettings(outbox=root, dicom_host="127.0.0.1", dicom_port=0, hub="127.0.0.1:9"),
    )
    gw = _start_offline(settings)  # used to fail: "database or disk is full"
    try:
        assert gw.outbox.exam(obj.exam_id).state in ("uploading", "ready")
        ballast.unlink()
        gw.outbox.recover_pending()  # what the forwarding loop does once the disk has room
        assert gw.outbox.exam(obj.exam_id).state == "ready"
    finally:
        gw.outbox.close()


def test_the_outbox_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw")
    obj = box.receive(io.BytesIO(b"patient data"), group_key="1.2", instance_key="1.2.1")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (box.root, box.objects_dir, box.incoming_dir, obj.path)}
    modes["outbox.db"] = (box.root / "outbox.db").stat().st_mode & 0o777
    modes["outbox.db-wal"] = (box.root / "outbox.db-wal").stat().st_mode & 0o777  # while open
    box.close()
    assert modes == {
        "gw": 0o700, "objects": 0o700, "incoming": 0o700, obj.path.name: 0o600, "outbox.db": 0o600,
        "outbox.db-wal": 0o600,
    }  # fmt: skip
